//! `loop-pair`: an application's own loopback connection, which every pod can open with the same
//! addresses and ports, so a hostile neighbour can mimic another pod's exactly.
//!
//! Listens on `127.0.0.1:<port>`, connects to it from `127.0.0.1:<client-port>`, and for
//! `--duration-ms` each side sends a 16-byte block every few milliseconds (`<token>:c2s` from the
//! client, `<token>:s2c` from the server) and reads what arrives. Every block received is either
//! its own pair's (own) or not (foreign): any foreign block is another pod's byte. Prints
//! `ready <client> -> <server>` once connected, then
//! `result c2s_own=<n> c2s_foreign=<n> s2c_own=<n> s2c_foreign=<n>`.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use super::{flag, flags, positive};

const BLOCK: usize = 16;
/// How often each side sends a block.
const EVERY: Duration = Duration::from_millis(5);
/// How long the readers wait after the writers stop.
const GRACE: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct Options {
    port: u16,
    client_port: u16,
    token: String,
    duration: Duration,
}

pub fn parse(rest: &[&str]) -> Result<Options, String> {
    let flags = flags(
        rest,
        &["--port", "--client-port", "--token", "--duration-ms"],
    )?;
    let token: String = flag(&flags, "--token")?.ok_or("--token is required")?;
    if token.is_empty() || token.len() + 4 > BLOCK {
        return Err(format!("--token must be 1 to {} bytes", BLOCK - 4));
    }
    Ok(Options {
        port: positive(&flags, "--port")?.ok_or("--port is required")?,
        client_port: positive(&flags, "--client-port")?.ok_or("--client-port is required")?,
        token,
        duration: Duration::from_millis(
            positive(&flags, "--duration-ms")?.ok_or("--duration-ms is required")?,
        ),
    })
}

/// `<token>:<dir>` padded with `.` to a block.
fn block(token: &str, dir: &str) -> [u8; BLOCK] {
    let mut b = [b'.'; BLOCK];
    let text = format!("{token}:{dir}");
    b[..text.len()].copy_from_slice(text.as_bytes());
    b
}

pub fn run(o: &Options) -> Result<(), String> {
    let server_addr = SocketAddr::from(([127, 0, 0, 1], o.port));
    let client_addr = SocketAddr::from(([127, 0, 0, 1], o.client_port));
    let listener =
        TcpListener::bind(server_addr).map_err(|e| format!("bind {server_addr}: {e}"))?;
    let client = connect_from(client_addr, server_addr)?;
    let (server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    println!("ready {client_addr} -> {server_addr}");
    let deadline = Instant::now() + o.duration;
    let c2s = block(&o.token, "c2s");
    let s2c = block(&o.token, "s2c");
    let readers = [
        spawn_reader(&server, c2s, deadline + GRACE)?,
        spawn_reader(&client, s2c, deadline + GRACE)?,
    ];
    let writers = [
        spawn_writer(&client, c2s, deadline)?,
        spawn_writer(&server, s2c, deadline)?,
    ];
    for w in writers {
        w.join().map_err(|_| "writer panicked")??;
    }
    let [from_client, from_server] = readers;
    let (c2s_own, c2s_foreign) = from_client.join().map_err(|_| "reader panicked")??;
    let (s2c_own, s2c_foreign) = from_server.join().map_err(|_| "reader panicked")??;
    println!(
        "result c2s_own={c2s_own} c2s_foreign={c2s_foreign} s2c_own={s2c_own} s2c_foreign={s2c_foreign}"
    );
    Ok(())
}

/// A client socket bound to `from` (address reuse on), connected to `to`.
fn connect_from(from: SocketAddr, to: SocketAddr) -> Result<TcpStream, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        socket
            .set_reuseaddr(true)
            .map_err(|e| format!("SO_REUSEADDR: {e}"))?;
        socket.bind(from).map_err(|e| format!("bind {from}: {e}"))?;
        let stream = socket
            .connect(to)
            .await
            .map_err(|e| format!("connect {to}: {e}"))?;
        let stream = stream.into_std().map_err(|e| e.to_string())?;
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        Ok(stream)
    })
}

type Counts = Result<(u64, u64), String>;

fn spawn_reader(
    stream: &TcpStream,
    own: [u8; BLOCK],
    until: Instant,
) -> Result<thread::JoinHandle<Counts>, String> {
    let mut stream = stream.try_clone().map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    Ok(thread::spawn(move || {
        let (mut own_n, mut foreign) = (0, 0);
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
            let whole = pending.len() / BLOCK * BLOCK;
            for b in pending[..whole].chunks_exact(BLOCK) {
                if b == own {
                    own_n += 1;
                } else {
                    foreign += 1;
                    eprintln!("foreign block {:?}", String::from_utf8_lossy(b));
                }
            }
            pending.drain(..whole);
        }
        Ok((own_n, foreign))
    }))
}

fn spawn_writer(
    stream: &TcpStream,
    block: [u8; BLOCK],
    until: Instant,
) -> Result<thread::JoinHandle<Result<(), String>>, String> {
    let mut stream = stream.try_clone().map_err(|e| e.to_string())?;
    Ok(thread::spawn(move || {
        while Instant::now() < until {
            stream
                .write_all(&block)
                .map_err(|e| format!("write: {e}"))?;
            thread::sleep(EVERY);
        }
        let _ = stream.shutdown(Shutdown::Write);
        Ok(())
    }))
}
