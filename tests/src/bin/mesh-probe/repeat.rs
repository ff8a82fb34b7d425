//! `repeat`: a steady client. It connects (as `connect` does: send, half-close, read the echo)
//! at a fixed period for a while and prints one line per try, failures included, so a test can
//! see what happened to traffic across an event such as the agent's restart.

use std::{
    thread,
    time::{Duration, Instant},
};

use super::{connect, flags, positive, EagainPolicy};

/// `--every-ms E --duration-ms D`, both required.
pub(super) fn parse(rest: &[&str]) -> Result<(Duration, Duration), String> {
    let flags = flags(rest, &["--every-ms", "--duration-ms"])?;
    let every = positive::<u64>(&flags, "--every-ms")?.ok_or("--every-ms is required")?;
    let duration = positive::<u64>(&flags, "--duration-ms")?.ok_or("--duration-ms is required")?;
    Ok((
        Duration::from_millis(every),
        Duration::from_millis(duration),
    ))
}

/// Tries until `duration` is over; a failed try is printed, not fatal.
#[expect(
    clippy::unnecessary_wraps,
    reason = "every command's runner returns Result<(), String>"
)]
pub(super) fn run(addr: &str, every: Duration, duration: Duration) -> Result<(), String> {
    let start = Instant::now();
    let (mut ok, mut failed) = (0u32, 0u32);
    while start.elapsed() < duration {
        let began = Instant::now();
        match connect(addr, "steady", false, EagainPolicy::Fail) {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                println!("failed at {} ms: {e}", start.elapsed().as_millis());
            }
        }
        if let Some(rest) = every.checked_sub(began.elapsed()) {
            thread::sleep(rest);
        }
    }
    println!("repeat done ok={ok} failed={failed}");
    Ok(())
}
