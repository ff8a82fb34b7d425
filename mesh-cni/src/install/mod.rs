//! Installation into the node's CNI configuration: our entry appended to the primary CNI's
//! plugin list, and the binary copied where the runtime looks for plugins.
//!
//! The runtime uses the lexicographically first configuration file of its directory; that is
//! the file we edit. A single-plugin `.conf` (`.json`) becomes a `.conflist` of the same name
//! (the `.conf` is removed, or it would still sort first), and our entry remembers the original
//! file name so [`uninstall`] can put it back. Other plugins' entries and unknown fields are
//! never touched and keep their key order. [`ensure_installed`] is idempotent; [`keep_installed`]
//! (`mesh-cni install --watch-ms`) calls it periodically, so an entry another CNI's installer
//! drops is put back.

mod files;
mod watch;

pub use watch::keep_installed;

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::{
    cni::DEFAULT_TIMEOUT_MS,
    handover::DEFAULT_SOCKET,
    json::{Json, Object},
};

/// Our entry's `type`: the binary's name in the bin directory.
pub const PLUGIN_TYPE: &str = "mesh-cni";

/// The key of our entry that names the single-plugin file a conversion replaced.
pub const CONVERTED_FROM_KEY: &str = "mesh_converted_from";

/// What can go wrong while installing or uninstalling.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The directory holds no configuration: the primary CNI has not written its own yet
    /// (retry later; installing first would make ours the only, broken, network).
    #[error("no CNI configuration (*.conflist, *.conf, *.json) in {0}: the primary CNI has not written one yet")]
    NoPrimary(PathBuf),
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The primary configuration is not JSON.
    #[error("{path} is not valid JSON: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The primary configuration is JSON but not a CNI configuration.
    #[error("{path} is not a CNI configuration: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is missing.
        reason: &'static str,
    },
}

/// Our entry's settings (the plugin's own configuration fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginEntry {
    /// `agent_socket`.
    pub agent_socket: PathBuf,
    /// `timeout_ms`.
    pub timeout_ms: u64,
    /// `log_level`.
    pub log_level: String,
}

impl Default for PluginEntry {
    fn default() -> Self {
        PluginEntry {
            agent_socket: PathBuf::from(DEFAULT_SOCKET),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            log_level: "info".to_owned(),
        }
    }
}

impl PluginEntry {
    fn to_json(&self, converted_from: Option<&str>) -> Json {
        let mut object = Object::new();
        object.insert("type", Json::String(PLUGIN_TYPE.to_owned()));
        object.insert(
            "agent_socket",
            Json::String(self.agent_socket.display().to_string()),
        );
        object.insert("timeout_ms", Json::Number(self.timeout_ms.into()));
        object.insert("log_level", Json::String(self.log_level.clone()));
        if let Some(name) = converted_from {
            object.insert(CONVERTED_FROM_KEY, Json::String(name.to_owned()));
        }
        Json::Object(object)
    }
}

/// What [`ensure_installed`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Our entry was there with these settings: nothing written.
    Unchanged(PathBuf),
    /// Our entry was appended to this conflist.
    Added(PathBuf),
    /// Our entry was there with other settings and was replaced in place.
    Updated(PathBuf),
    /// A single-plugin file was turned into a conflist ending with our entry.
    Converted {
        /// The removed single-plugin file.
        from: PathBuf,
        /// The new conflist.
        to: PathBuf,
    },
}

impl Changed {
    /// Whether a file was written.
    pub fn is_changed(&self) -> bool {
        !matches!(self, Changed::Unchanged(_))
    }
}

/// The configuration file the runtime uses: the first of the directory by name.
pub fn find_primary(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let files =
        files::config_files(conf_dir).map_err(|e| io_error("read directory", conf_dir, e))?;
    files
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoPrimary(conf_dir.to_owned()))
}

/// Makes the primary configuration end with our entry (see the module documentation).
pub fn ensure_installed(conf_dir: &Path, entry: &PluginEntry) -> Result<Changed, InstallError> {
    let path = find_primary(conf_dir)?;
    let mode = files::mode_of(&path).map_err(|e| io_error("stat", &path, e))?;
    let mut root = read_object(&path)?;
    if root.get("plugins").is_none() {
        return convert(&path, root, entry, mode);
    }
    let plugins = plugins_mut(&mut root, &path)?;
    let ours: Vec<usize> = (0..plugins.len())
        .filter(|&i| is_ours(&plugins[i]))
        .collect();
    let Some(&first) = ours.first() else {
        plugins.push(entry.to_json(None));
        write(&path, &root, mode)?;
        return Ok(Changed::Added(path));
    };
    let marker = converted_from(&plugins[first]).map(str::to_owned);
    let desired = entry.to_json(marker.as_deref());
    if ours.len() == 1 && plugins[first].to_value() == desired.to_value() {
        return Ok(Changed::Unchanged(path));
    }
    for &duplicate in ours[1..].iter().rev() {
        plugins.remove(duplicate);
    }
    plugins[first] = desired;
    write(&path, &root, mode)?;
    Ok(Changed::Updated(path))
}

/// Removes our entry from every configuration file of the directory (other entries stay as
/// they are); a conflist we made from a single-plugin file becomes that file again. Returns
/// the files written or restored.
pub fn uninstall(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for path in
        files::config_files(conf_dir).map_err(|e| io_error("read directory", conf_dir, e))?
    {
        let Ok(mut root) = read_object(&path) else {
            tracing::debug!(path = %path.display(), "skipping a file that is not a JSON object");
            continue;
        };
        let Ok(plugins) = plugins_mut(&mut root, &path) else {
            continue;
        };
        let Some(marker) = plugins
            .iter()
            .find(|p| is_ours(p))
            .map(|p| converted_from(p).map(str::to_owned))
        else {
            continue;
        };
        plugins.retain(|p| !is_ours(p));
        let mode = files::mode_of(&path).map_err(|e| io_error("stat", &path, e))?;
        if let (Some(name), [single]) = (marker.filter(|name| restorable(name)), plugins.as_slice())
        {
            let original = conf_dir.join(name);
            if original.exists() {
                // The primary CNI wrote its file again since: ours is a stale copy of it.
                tracing::info!(path = %original.display(), "single-plugin file present again");
            } else {
                write_json(&original, single, mode)?;
            }
            fs::remove_file(&path).map_err(|e| io_error("remove", &path, e))?;
            changed.push(original);
        } else {
            write(&path, &root, mode)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// Copies the plugin binary into the runtime's plugin directory as [`PLUGIN_TYPE`], mode 0755,
/// atomically. Returns the installed path.
pub fn install_binary(binary: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let dest = bin_dir.join(PLUGIN_TYPE);
    fs::create_dir_all(bin_dir).map_err(|e| io_error("create directory", bin_dir, e))?;
    files::copy_atomic(binary, &dest, 0o755).map_err(|e| io_error("copy binary to", &dest, e))?;
    Ok(dest)
}

/// A single-plugin file becomes `<stem>.conflist` = `{cniVersion, name, plugins: [it, ours]}`
/// (libcni's own conversion), then the single file is removed so the conflist is first.
fn convert(
    path: &Path,
    conf: Object,
    entry: &PluginEntry,
    mode: u32,
) -> Result<Changed, InstallError> {
    if conf.get("type").and_then(Json::as_str).is_none() {
        return Err(InstallError::Invalid {
            path: path.to_owned(),
            reason: "neither \"plugins\" nor \"type\"",
        });
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let mut list = Object::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = conf.get(key) {
            list.insert(key, value.clone());
        }
    }
    let ours = entry.to_json(Some(name));
    list.insert("plugins", Json::Array(vec![Json::Object(conf), ours]));
    let to = path.with_extension("conflist");
    write(&to, &list, mode)?;
    fs::remove_file(path).map_err(|e| io_error("remove", path, e))?;
    Ok(Changed::Converted {
        from: path.to_owned(),
        to,
    })
}

fn is_ours(plugin: &Json) -> bool {
    plugin
        .as_object()
        .and_then(|p| p.get("type"))
        .and_then(Json::as_str)
        == Some(PLUGIN_TYPE)
}

fn converted_from(plugin: &Json) -> Option<&str> {
    plugin.as_object()?.get(CONVERTED_FROM_KEY)?.as_str()
}

/// A file name we may write back: plain, in the directory, with a single-plugin extension.
fn restorable(name: &str) -> bool {
    let extension = Path::new(name).extension().and_then(|e| e.to_str());
    !name.contains('/') && !name.starts_with('.') && matches!(extension, Some("conf" | "json"))
}

fn plugins_mut<'a>(root: &'a mut Object, path: &Path) -> Result<&'a mut Vec<Json>, InstallError> {
    match root.get_mut("plugins") {
        Some(Json::Array(plugins)) => Ok(plugins),
        _ => Err(InstallError::Invalid {
            path: path.to_owned(),
            reason: "\"plugins\" is not an array",
        }),
    }
}

fn read_object(path: &Path) -> Result<Object, InstallError> {
    let bytes = fs::read(path).map_err(|e| io_error("read", path, e))?;
    match serde_json::from_slice(&bytes) {
        Ok(Json::Object(object)) => Ok(object),
        Ok(_) => Err(InstallError::Invalid {
            path: path.to_owned(),
            reason: "not a JSON object",
        }),
        Err(source) => Err(InstallError::Parse {
            path: path.to_owned(),
            source,
        }),
    }
}

fn write(path: &Path, object: &Object, mode: u32) -> Result<(), InstallError> {
    write_json(path, &Json::Object(object.clone()), mode)
}

fn write_json(path: &Path, value: &Json, mode: u32) -> Result<(), InstallError> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("a JSON value always serializes");
    bytes.push(b'\n');
    files::write_atomic(path, &bytes, mode).map_err(|e| io_error("write", path, e))?;
    tracing::info!(path = %path.display(), "CNI configuration written");
    Ok(())
}

fn io_error(op: &'static str, path: &Path, source: io::Error) -> InstallError {
    InstallError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}
