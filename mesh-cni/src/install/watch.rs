//! Keeping our entry in place: another CNI (the primary's own installer, restarted or upgraded)
//! may rewrite the configuration without it, and every pod created meanwhile would then start
//! without being handed to the agent, outside the mesh. Istio's install-cni watches the
//! directory for the same reason. Checking is reading one small file, so a period of a second
//! costs nothing, and a check never writes unless the entry is missing or different.

use std::{path::Path, time::Duration};

use super::{ensure_installed, Changed, InstallError, PluginEntry};

/// Runs [`ensure_installed`] every `period` until `stop` says so, logging each time it had to
/// write. Errors do not end it (a primary CNI rewriting its file may briefly leave none, or a
/// half-written one): each is logged once until it changes, and the next check tries again.
/// Returns how many times the entry was put back.
pub fn keep_installed(
    conf_dir: &Path,
    entry: &PluginEntry,
    period: Duration,
    stop: impl Fn() -> bool,
) -> u64 {
    let mut restored = 0;
    let mut last_error: Option<String> = None;
    while !stop() {
        match ensure_installed(conf_dir, entry) {
            Ok(Changed::Unchanged(_)) => last_error = None,
            Ok(changed) => {
                restored += 1;
                last_error = None;
                tracing::warn!(
                    ?changed,
                    "the CNI configuration lost the mesh-cni entry (another installer rewrote it); entry put back"
                );
            }
            Err(error) => {
                let message = error.to_string();
                if last_error.as_ref() != Some(&message) {
                    report(&error);
                    last_error = Some(message);
                }
            }
        }
        std::thread::sleep(period);
    }
    restored
}

fn report(error: &InstallError) {
    tracing::warn!(%error, "cannot check the CNI configuration now; trying again");
}
