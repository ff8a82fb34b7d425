//! The agent's log output and its level, changeable at run time (the admin server's `/logging`).
//!
//! Logs go to stderr as text or JSON through `tracing-subscriber`. The level filter is an
//! [`EnvFilter`] behind a reload layer, so [`LogControl::set`] swaps it without a restart.
//! Records of the `log` facade (aya-log forwards the kernel programs' logs through it) are
//! bridged into `tracing` and filtered the same way.

use std::io::IsTerminal as _;

use tracing_subscriber::{
    filter::ParseError, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _, EnvFilter,
    Registry,
};

/// Directives in force when `RUST_LOG` is unset or invalid.
pub const DEFAULT_DIRECTIVES: &str = "info";

/// The level names a directive without `=` may be.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Log format on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The directives could not be parsed; the filter in force is unchanged.
    #[error("invalid log directives {directives:?}: {reason}")]
    InvalidDirectives {
        /// The directives as given.
        directives: String,
        /// What is wrong with them.
        reason: String,
    },
    /// The subscriber that owned the filter is gone (only when the layer was dropped).
    #[error("the log filter is no longer installed")]
    SubscriberGone,
}

/// The reloadable filter layer that [`LogControl`] controls, on a [`Registry`].
pub type FilterLayer = reload::Layer<EnvFilter, Registry>;

/// Changes the level filter of the installed subscriber at run time. Cheap to clone.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current())
            .finish()
    }
}

/// Installs the global subscriber: `format` on stderr (ANSI colors only on a terminal), filter
/// from `RUST_LOG` (default [`DEFAULT_DIRECTIVES`]), and the `log` → `tracing` bridge.
///
/// Panics if a global subscriber or `log` logger is already installed (call once, in `main`).
pub fn init(format: LogFormat) -> LogControl {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_DIRECTIVES));
    let (filter, control) = LogControl::layer(filter);
    let ansi = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    // `init()` also installs `tracing-log`'s `LogTracer` (the `log` bridge aya-log needs).
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    control
}

impl LogControl {
    /// A reloadable filter layer starting with `filter`, and its control. [`init`] puts the layer
    /// on the global subscriber; tests can keep it without installing anything. The control
    /// works as long as the layer exists.
    pub fn layer(filter: EnvFilter) -> (FilterLayer, Self) {
        let (layer, handle) = reload::Layer::new(filter);
        (layer, Self { handle })
    }

    /// The filter directives now in force, comma separated (e.g. `info,mesh_agent::proxy=debug`);
    /// empty once the layer is gone.
    pub fn current(&self) -> String {
        self.handle
            .with_current(ToString::to_string)
            .unwrap_or_default()
    }

    /// Replaces the filter with `directives` (`RUST_LOG` syntax, e.g. `debug` or
    /// `info,mesh_agent::proxy=debug`). Stricter than `RUST_LOG`: a directive without `=` must be
    /// a level, so a misspelt level is an error rather than a target filter that silences
    /// everything else. On error the previous filter stays in force.
    pub fn set(&self, directives: &str) -> Result<(), LoggingError> {
        let filter = parse(directives)?;
        let previous = self.current();
        self.handle
            .reload(filter)
            .map_err(|_| LoggingError::SubscriberGone)?;
        tracing::info!(%previous, now = %self.current(), "log level changed");
        Ok(())
    }
}

/// Parses `directives` into a filter, rejecting what [`LogControl::set`] documents.
fn parse(directives: &str) -> Result<EnvFilter, LoggingError> {
    let invalid = |reason: String| LoggingError::InvalidDirectives {
        directives: directives.to_string(),
        reason,
    };
    let trimmed = directives.trim();
    if trimmed.is_empty() {
        return Err(invalid("no directive given".into()));
    }
    let pieces: Vec<&str> = trimmed.split(',').map(str::trim).collect();
    for &directive in &pieces {
        if directive.is_empty() {
            return Err(invalid("empty directive between commas".into()));
        }
        let bare = !directive.contains('=') && !directive.contains('[');
        if bare && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive)) {
            return Err(invalid(format!(
                "{directive:?} is not a level (one of {}); use `target=level` to filter a target",
                LEVELS.join(", ")
            )));
        }
    }
    EnvFilter::builder()
        .parse(pieces.join(","))
        .map_err(|e: ParseError| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(initial: &str) -> (FilterLayer, LogControl) {
        LogControl::layer(EnvFilter::new(initial))
    }

    #[test]
    fn current_shows_the_initial_directives() {
        let (_layer, log) = control("info");
        assert_eq!(log.current(), "info");
    }

    #[test]
    fn set_replaces_the_filter() {
        let (_layer, log) = control("info");
        log.set("debug").unwrap();
        assert_eq!(log.current(), "debug");
        log.set(" info, mesh_agent::proxy=debug ").unwrap();
        let now = log.current();
        assert!(now.contains("mesh_agent::proxy=debug"), "{now}");
        assert!(now.contains("info"), "{now}");
        log.set("WARN").unwrap();
        assert_eq!(log.current(), "warn");
    }

    #[test]
    fn invalid_directives_are_rejected_and_the_previous_filter_kept() {
        let (_layer, log) = control("info,mesh_agent=debug");
        let before = log.current();
        for bad in ["", " ", "debgu", "info,,debug", "mesh_agent=loud", "a=b=c"] {
            let err = log.set(bad).unwrap_err();
            assert!(
                matches!(err, LoggingError::InvalidDirectives { .. }),
                "{bad:?}: {err}"
            );
            assert_eq!(log.current(), before, "{bad:?} changed the filter");
        }
        let msg = log.set("debgu").unwrap_err().to_string();
        assert!(msg.contains("\"debgu\" is not a level"), "{msg}");
    }

    #[test]
    fn set_fails_once_the_layer_is_gone() {
        let (layer, log) = control("info");
        drop(layer);
        assert!(matches!(
            log.set("debug"),
            Err(LoggingError::SubscriberGone)
        ));
        assert_eq!(log.current(), "");
    }
}
