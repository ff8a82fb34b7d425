//! `mesh-probe`: the workload the testbed runs in pods. A small TCP echo server and client.
//!
//! - `mesh-probe serve <addr> [--count N]`: echoes each connection until EOF; prints
//!   `listening <addr>` once bound; exits after N connections when given.
//! - `mesh-probe connect <addr> <message>`: sends the message, half-closes, reads the echo,
//!   prints `echo ok <local> -> <peer>` and exits 0 when it matches.
#![forbid(unsafe_code)]

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", addr] => serve(addr, None),
        ["serve", addr, "--count", n] => match n.parse() {
            Ok(n) => serve(addr, Some(n)),
            Err(e) => Err(format!("--count {n}: {e}")),
        },
        ["connect", addr, message] => connect(addr, message),
        _ => Err("usage: mesh-probe serve <addr> [--count N] | connect <addr> <message>".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(addr: &str) -> Result<SocketAddr, String> {
    addr.parse().map_err(|e| format!("address {addr:?}: {e}"))
}

fn serve(addr: &str, count: Option<usize>) -> Result<(), String> {
    let listener = TcpListener::bind(parse(addr)?).map_err(|e| format!("bind {addr}: {e}"))?;
    println!(
        "listening {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let mut served = 0;
    while count.is_none_or(|n| served < n) {
        let (mut stream, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let mut buf = Vec::new();
        stream
            .read_to_end(&mut buf)
            .map_err(|e| format!("read from {peer}: {e}"))?;
        stream
            .write_all(&buf)
            .map_err(|e| format!("write to {peer}: {e}"))?;
        println!("echoed {} bytes to {peer}", buf.len());
        served += 1;
    }
    Ok(())
}

fn connect(addr: &str, message: &str) -> Result<(), String> {
    let addr = parse(addr)?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(message.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut echo = String::new();
    stream
        .read_to_string(&mut echo)
        .map_err(|e| format!("read: {e}"))?;
    if echo != message {
        return Err(format!("echo mismatch: sent {message:?}, got {echo:?}"));
    }
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    println!("echo ok {local} -> {addr}");
    Ok(())
}
