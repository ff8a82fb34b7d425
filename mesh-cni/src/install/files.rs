//! File operations of the installer: which files the runtime reads, and atomic replacement
//! (a runtime watching the directory must never read a half-written file).

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// The extensions libcni (containerd, CRI-O) loads from the configuration directory.
pub(crate) const CONFIG_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// The configuration files of `dir`, sorted by name as libcni sorts them (the runtime uses the
/// first).
pub(crate) fn config_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let known = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CONFIG_EXTENSIONS.contains(&e));
        if known && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Replaces `path` with `bytes`: a temporary file in the same directory (named so that no
/// runtime loads it), mode `mode`, synced, renamed over `path`, directory synced.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path)?;
    let result = write_then_rename(&tmp, path, bytes, mode);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies `src` to `dest` atomically with `mode` (an executable replaced while runtimes may
/// be starting it: they see the old or the new file, never a partial one).
pub(crate) fn copy_atomic(src: &Path, dest: &Path, mode: u32) -> io::Result<()> {
    write_atomic(dest, &fs::read(src)?, mode)
}

/// The permission bits of `path`.
pub(crate) fn mode_of(path: &Path) -> io::Result<u32> {
    Ok(fs::metadata(path)?.permissions().mode() & 0o7777)
}

fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok(path.with_file_name(format!(".{name}.mesh-cni-{}.tmp", std::process::id())))
}

fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    // A leftover of a crashed run with the same pid.
    match fs::remove_file(tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)?;
    file.write_all(bytes)?;
    // The umask may have cleared bits of `mode` at creation.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.sync_all()?;
    fs::rename(tmp, path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}
