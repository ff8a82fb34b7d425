//! One HTTP request from inside a testbed node, with `mesh-probe http` (for the agent's admin,
//! metrics and readiness servers, which listen in the node's namespace).

use crate::{agent::binary, process::run, Error, Node, Result};

/// Sends `method path` to `addr` (`host:port`) from inside `node`'s namespace, with
/// `Connection: close`, and returns the status code and the body. Any response is `Ok`, whatever
/// its status; failing to connect or to read a response is an error.
pub fn http(node: &Node, method: &str, addr: &str, path: &str) -> Result<(u16, String)> {
    let bin = binary("mesh-probe", "mesh-tests")?;
    let out = run(node.command(bin).args(["http", method, addr, path]))?;
    parse(&out).ok_or_else(|| Error::Output {
        what: format!("mesh-probe http {method} {addr} {path}"),
        detail: format!("expected the status code on the first line, got {out:?}"),
    })
}

/// `mesh-probe http`'s output: the status code on the first line, then the body.
fn parse(out: &str) -> Option<(u16, String)> {
    let (status, body) = out.split_once('\n')?;
    Some((status.trim().parse().ok()?, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_probe_output() {
        assert_eq!(parse("200\nready\n"), Some((200, "ready\n".into())));
        assert_eq!(parse("503\n"), Some((503, String::new())));
        assert_eq!(parse("404\na\nb"), Some((404, "a\nb".into())));
        assert_eq!(parse(""), None);
        assert_eq!(parse("200"), None);
        assert_eq!(parse("ok\nbody"), None);
    }
}
