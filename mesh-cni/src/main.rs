//! `mesh-cni`: called without arguments, the CNI plugin (the runtime passes everything in the
//! environment and on stdin); `mesh-cni install` / `uninstall`, the installer an init step runs.
//!
//! stdout carries the CNI result or error object only; every log line goes to stderr.

use std::{
    io::{self, Read, Write},
    path::PathBuf,
    process::ExitCode,
};

use clap::{builder::PossibleValuesParser, Parser, Subcommand};
use mesh_cni::{
    cni::{self, CniError, Output, DEFAULT_TIMEOUT_MS, LOG_LEVELS, MAX_TIMEOUT_MS},
    handover::DEFAULT_SOCKET,
    install::{self, PluginEntry},
};
use tracing::level_filters::LevelFilter;

/// The largest configuration read from stdin; runtimes pass a few KiB.
const MAX_STDIN_BYTES: u64 = 4 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-cni",
    version,
    about = "Chained CNI plugin of the mesh (run without arguments by the container runtime)"
)]
struct Cli {
    #[command(subcommand)]
    command: Installer,
}

#[derive(Debug, Subcommand)]
enum Installer {
    /// Copy this binary into the plugin directory and add the mesh-cni entry to the primary CNI
    /// configuration (idempotent).
    Install {
        /// The runtime's CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The runtime's CNI plugin directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The agent's hand-over socket, written into the entry.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The plugin's bound on each exchange with the agent.
        #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
        timeout_ms: u64,
        /// The plugin's log level (stderr).
        #[arg(long, default_value = "info", value_parser = PossibleValuesParser::new(LOG_LEVELS))]
        log_level: String,
        /// The binary to install (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// After installing, keep checking the configuration at this period and put the entry
        /// back when another CNI's installer drops it (runs until killed; 0: install and exit).
        #[arg(long, default_value_t = 0)]
        watch_ms: u64,
    },
    /// Remove the mesh-cni entry from the CNI configuration (the binary stays, so DEL of
    /// existing pods keeps working).
    Uninstall {
        /// The runtime's CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    if std::env::args_os().len() > 1 {
        installer(Cli::parse().command)
    } else {
        plugin()
    }
}

fn plugin() -> ExitCode {
    let mut stdin = Vec::new();
    let read = io::stdin()
        .take(MAX_STDIN_BYTES + 1)
        .read_to_end(&mut stdin);
    init_logging(log_level(&stdin));
    let output = match read {
        Err(error) => Output::error(&CniError::Stdin(error), &stdin),
        Ok(_) if stdin.len() as u64 > MAX_STDIN_BYTES => {
            let error = io::Error::new(
                io::ErrorKind::InvalidData,
                format!("over {MAX_STDIN_BYTES} bytes"),
            );
            Output::error(&CniError::Stdin(error), &[])
        }
        Ok(_) => cni::run(|var| std::env::var(var).ok(), &stdin),
    };
    let mut stdout = io::stdout().lock();
    if !output.stdout.is_empty()
        && writeln!(stdout, "{}", output.stdout)
            .and_then(|()| stdout.flush())
            .is_err()
    {
        return ExitCode::FAILURE;
    }
    ExitCode::from(u8::try_from(output.exit_code).unwrap_or(1))
}

fn installer(command: Installer) -> ExitCode {
    init_logging(
        std::env::var("RUST_LOG")
            .ok()
            .as_deref()
            .and_then(parse_level)
            .unwrap_or(LevelFilter::INFO),
    );
    let result = match command {
        Installer::Install {
            conf_dir,
            bin_dir,
            socket,
            timeout_ms,
            log_level,
            binary,
            watch_ms,
        } => (|| {
            let binary = match binary {
                Some(path) => path,
                None => {
                    std::env::current_exe().map_err(|e| format!("locating this binary: {e}"))?
                }
            };
            // The binary first: an entry the runtime cannot execute would fail every ADD.
            let installed =
                install::install_binary(&binary, &bin_dir).map_err(|e| e.to_string())?;
            tracing::info!(path = %installed.display(), "plugin binary installed");
            let entry = PluginEntry {
                agent_socket: socket,
                timeout_ms,
                log_level,
            };
            let changed =
                install::ensure_installed(&conf_dir, &entry).map_err(|e| e.to_string())?;
            tracing::info!(?changed, "CNI configuration checked");
            if watch_ms > 0 {
                tracing::info!(period_ms = watch_ms, conf_dir = %conf_dir.display(), "keeping the entry in place");
                install::keep_installed(
                    &conf_dir,
                    &entry,
                    std::time::Duration::from_millis(watch_ms),
                    || false,
                );
            }
            Ok(())
        })(),
        Installer::Uninstall { conf_dir } => install::uninstall(&conf_dir)
            .map(|changed| tracing::info!(?changed, "mesh-cni entry removed"))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration's `log_level`, read before the configuration is checked so that even its
/// errors are logged at the configured level.
fn log_level(stdin: &[u8]) -> LevelFilter {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("log_level")
                .and_then(|l| l.as_str())
                .and_then(parse_level)
        })
        .unwrap_or(LevelFilter::INFO)
}

fn parse_level(text: &str) -> Option<LevelFilter> {
    text.parse().ok()
}

fn init_logging(level: LevelFilter) {
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(false)
        .with_max_level(level)
        .init();
}
