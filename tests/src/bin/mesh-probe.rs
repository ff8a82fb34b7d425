//! `mesh-probe`: the workload the testbed runs in pods. A small TCP server and client.
//!
//! Server: `mesh-probe serve <addr> [--mode echo|sink|greet] [--count N]`. Prints
//! `listening <addr>` once bound and `accepted <peer> on <local>` per connection (tests read the
//! peer to check the application sees the original client). Modes:
//! - `echo` (default): echoes bytes as they arrive; after the client's EOF, closes its side.
//! - `sink`: reads to EOF, then answers `<bytes> <crc32>`.
//! - `greet`: speaks first (`hello <peer>`), then echoes.
//!
//! Client:
//! - `connect <addr> <message>`: sends, half-closes, reads the echo; `echo ok <local> -> <peer>`.
//! - `send <addr> <bytes>`: streams that many pseudo-random bytes, half-closes, checks the sink's
//!   count and CRC-32; prints `sent <n> bytes crc=<crc> in <secs>s`.
//! - `greeted <addr> <message>`: reads the server's greeting before sending anything, then
//!   behaves like `connect`.
#![forbid(unsafe_code)]

use std::{
    io::{BufRead as _, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

const CHUNK: usize = 64 * 1024;
/// Read timeout of the client's blocking socket.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Counts `EAGAIN`s a *blocking* read returned before its timeout. On a socket in a sockmap,
/// the kernel's `tcp_bpf_recvmsg` returns `EAGAIN` when a blocking reader is woken without data
/// (typically by its own FIN being acknowledged after a half-close). Nothing is lost: the next
/// read returns the data. The client retries like a robust application would and reports how
/// often it had to (`spurious_eagain=N`).
struct Reader<'a> {
    stream: &'a TcpStream,
    spurious_eagain: u32,
}

impl Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let started = Instant::now();
        loop {
            match (&mut &*self.stream).read(buf) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && started.elapsed() < READ_TIMEOUT =>
                {
                    self.spurious_eagain += 1;
                }
                other => return other,
            }
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["serve", addr, rest @ ..] => parse_serve(rest).and_then(|(mode, n)| serve(addr, mode, n)),
        ["connect", addr, message] => connect(addr, message, false),
        ["greeted", addr, message] => connect(addr, message, true),
        ["send", addr, bytes] => bytes
            .parse()
            .map_err(|e| format!("bytes {bytes:?}: {e}"))
            .and_then(|n| send(addr, n)),
        _ => Err(
            "usage: mesh-probe serve <addr> [--mode echo|sink|greet] [--count N] \
                  | connect <addr> <message> | greeted <addr> <message> | send <addr> <bytes>"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Echo,
    Sink,
    Greet,
}

fn parse_serve(mut rest: &[&str]) -> Result<(Mode, Option<usize>), String> {
    let (mut mode, mut count) = (Mode::Echo, None);
    while let [flag, value, tail @ ..] = rest {
        match *flag {
            "--mode" => {
                mode = match *value {
                    "echo" => Mode::Echo,
                    "sink" => Mode::Sink,
                    "greet" => Mode::Greet,
                    other => return Err(format!("unknown mode {other:?}")),
                };
            }
            "--count" => count = Some(value.parse().map_err(|e| format!("--count: {e}"))?),
            other => return Err(format!("unknown option {other:?}")),
        }
        rest = tail;
    }
    if rest.is_empty() {
        Ok((mode, count))
    } else {
        Err(format!("unexpected {rest:?}"))
    }
}

fn parse(addr: &str) -> Result<SocketAddr, String> {
    addr.parse().map_err(|e| format!("address {addr:?}: {e}"))
}

fn serve(addr: &str, mode: Mode, count: Option<usize>) -> Result<(), String> {
    let listener = TcpListener::bind(parse(addr)?).map_err(|e| format!("bind {addr}: {e}"))?;
    println!(
        "listening {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let mut workers = Vec::new();
    let mut served = 0;
    while count.is_none_or(|n| served < n) {
        let (stream, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        println!("accepted {peer} on {local}");
        workers.push(thread::spawn(move || {
            if let Err(e) = handle(stream, peer, mode) {
                eprintln!("mesh-probe: connection from {peer}: {e}");
            }
        }));
        served += 1;
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

fn handle(mut stream: TcpStream, peer: SocketAddr, mode: Mode) -> Result<(), String> {
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    match mode {
        Mode::Echo | Mode::Greet => {
            if matches!(mode, Mode::Greet) {
                stream
                    .write_all(format!("hello {peer}\n").as_bytes())
                    .map_err(io("greet"))?;
            }
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0usize;
            loop {
                let n = stream.read(&mut buf).map_err(io("read"))?;
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n]).map_err(io("write"))?;
                total += n;
            }
            stream.shutdown(Shutdown::Write).map_err(io("shutdown"))?;
            println!("echoed {total} bytes to {peer}");
        }
        Mode::Sink => {
            let (n, crc) = drain(&mut stream).map_err(io("read"))?;
            stream
                .write_all(format!("{n} {crc:08x}\n").as_bytes())
                .map_err(io("write"))?;
            stream.shutdown(Shutdown::Write).map_err(io("shutdown"))?;
            println!("received {n} bytes crc={crc:08x} from {peer}");
        }
    }
    Ok(())
}

fn drain(stream: &mut TcpStream) -> std::io::Result<(u64, u32)> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let got = stream.read(&mut buf)?;
        if got == 0 {
            return Ok((n, hasher.finalize()));
        }
        hasher.update(&buf[..got]);
        n += got as u64;
    }
}

fn dial(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

fn connect(addr: &str, message: &str, greeted: bool) -> Result<(), String> {
    let addr = parse(addr)?;
    let mut stream = dial(addr)?;
    let mut reader = Reader {
        stream: &stream,
        spurious_eagain: 0,
    };
    let mut echo = String::new();
    if greeted {
        let mut buffered = BufReader::new(&mut reader);
        let mut line = String::new();
        buffered
            .read_line(&mut line)
            .map_err(|e| format!("greeting: {e}"))?;
        if !line.starts_with("hello ") {
            return Err(format!("expected a greeting, got {line:?}"));
        }
        println!("greeting {}", line.trim_end());
        // Anything the server sent after the greeting line is part of the echo.
        echo.push_str(&String::from_utf8_lossy(buffered.buffer()));
    }
    (&stream)
        .write_all(message.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut reader = Reader {
        stream: &stream,
        spurious_eagain: 0,
    };
    reader
        .read_to_string(&mut echo)
        .map_err(|e| format!("read: {e}"))?;
    if echo != message {
        return Err(format!(
            "echo mismatch: sent {} bytes, got {} bytes",
            message.len(),
            echo.len()
        ));
    }
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    println!(
        "echo ok {local} -> {addr} spurious_eagain={}",
        reader.spurious_eagain
    );
    stream.flush().ok();
    Ok(())
}

/// Deterministic, non-repeating-looking bytes (xorshift), so a reordered or duplicated chunk
/// changes the checksum.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

fn send(addr: &str, bytes: u64) -> Result<(), String> {
    let addr = parse(addr)?;
    let mut stream = dial(addr)?;
    let started = Instant::now();
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).expect("chunk fits usize");
        fill(&mut buf[..n], &mut state);
        hasher.update(&buf[..n]);
        stream
            .write_all(&buf[..n])
            .map_err(|e| format!("write: {e}"))?;
        left -= n as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let crc = hasher.finalize();
    let mut reply = String::new();
    let mut reader = Reader {
        stream: &stream,
        spurious_eagain: 0,
    };
    reader
        .read_to_string(&mut reply)
        .map_err(|e| format!("read reply: {e}"))?;
    let expected = format!("{bytes} {crc:08x}\n");
    if reply != expected {
        return Err(format!("sink answered {reply:?}, expected {expected:?}"));
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "sent {bytes} bytes crc={crc:08x} in {secs:.3}s spurious_eagain={}",
        reader.spurious_eagain
    );
    Ok(())
}
