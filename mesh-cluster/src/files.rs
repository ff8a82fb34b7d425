//! The cluster view read from a directory of Kubernetes YAML files, reloaded when they change.
//!
//! Every `*.yaml` / `*.yml` regular file directly in the directory is read (symbolic links are
//! followed, so a mounted `ConfigMap` works); hidden files and editor leftovers (`.#x.yaml`,
//! `x.yaml~`, `#x.yaml#`) are ignored. Each file keeps its **last good** objects:
//!
//! - a file that cannot be read or parsed keeps the objects of its last good version (none if it
//!   never had one), and its error is reported;
//! - when the combined objects do not make a valid [`ClusterState`] (an invalid field, or a
//!   conflict such as two files claiming the same address), the changed files holding an object
//!   named in the error are rejected the same way (their last good version stays) and the state
//!   is built again; if the error names no object of a changed file (a newly labelled namespace
//!   enrolls a pod that lacks its runtime annotations), every change of that round is rejected,
//!   so the previous state stays. Rejected files are tried again whenever anything changes.
//!
//! Before a file is parsed, its size and nesting depth are checked against [`FileLimits`]: the
//! size on its metadata, before it is read, and the depth by a pre-scan of its text
//! ([`check_depth`]), so a file over a limit is refused in milliseconds, like a file that does
//! not parse (its last good objects stay). Files are parsed on their own threads, at most
//! [`MAX_PARSES`] at a time: [`ConfigDir::poll`] (the watcher's) waits only so long for them,
//! so a file that takes long to parse (within the limits, seconds at most) holds up no other
//! file's changes; it keeps its previous objects until its parse ends.
//!
//! Errors are logged once, when they appear, and listed in every snapshot
//! ([`ClusterState::errors`]) until fixed. Warnings about valid objects (conflicting
//! `PeerAuthentications`; [`ClusterState::warnings`]) are logged once too, when they appear.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    hash::{DefaultHasher, Hash, Hasher},
    io::{self, Read as _},
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
    thread,
    time::{Duration, Instant, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle, time::MissedTickBehavior};
use tracing::{debug, error, info, warn};

use super::{
    error::{SourceError, StateError},
    k8s::{parse_documents, Object, ParseError},
    limits::{check_depth, FileLimits, LimitError},
    options::EnrollmentOptions,
    state::ClusterState,
};
use crate::assemble::{build_last_good, others_note, Publisher};

/// A file whose mtime is at least this old and whose mtime and length did not change is not
/// read again; a younger one is (a write within the timestamp granularity could keep both).
const SETTLED: Duration = Duration::from_secs(2);

/// Files parsed at the same time. One file that takes long leaves the other parser to the
/// rest, and the memory parsing takes stays within twice what one file at the size limit
/// needs.
pub const MAX_PARSES: usize = 2;

/// What went wrong reading the directory or one of its files.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The directory cannot be listed.
    #[error("config directory {}: {source}", dir.display())]
    ReadDir { dir: PathBuf, source: io::Error },
    /// A file cannot be read.
    #[error("{}: {source}", path.display())]
    ReadFile { path: PathBuf, source: io::Error },
    /// A file is larger than [`FileLimits::max_file_bytes`]; it was not read.
    #[error(
        "{}: {size} bytes, over the size limit of {limit} bytes (--config-max-file-bytes)",
        path.display()
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    /// A file nests collections deeper than [`FileLimits::max_depth`]; it was not parsed.
    #[error(
        "{}: nested {depth} levels deep, over the depth limit of {limit} \
         (--config-max-depth) from line {line}, column {column}",
        path.display()
    )]
    TooDeep {
        path: PathBuf,
        /// The deepest nesting in the file.
        depth: usize,
        limit: usize,
        /// Where the nesting first goes over the limit (1-based).
        line: usize,
        column: usize,
    },
    /// A file is not UTF-8.
    #[error("{}: not UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },
    /// A file is not valid YAML or holds an invalid object.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The parser panicked on a file (a bug); the file is treated as not parsing.
    #[error("{}: the YAML parser failed on this file", path.display())]
    ParserPanicked { path: PathBuf },
    /// [`FileLimits`] out of their ranges.
    #[error(transparent)]
    Limits(#[from] LimitError),
    /// A file's objects conflict with the others or do not validate.
    #[error(
        "{}: not applied, its last good version stays: {source}{}",
        path.display(),
        others_note(&others.iter().map(|p| p.display()).collect::<Vec<_>>())
    )]
    Rejected {
        path: PathBuf,
        source: Box<StateError>,
        /// Other files holding objects named in the error.
        others: Vec<PathBuf>,
    },
    /// The state cannot be built at all, or the enrollment options are invalid.
    #[error("cluster state: {0}")]
    State(Box<StateError>),
}

/// Content identity of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    /// `None` for a file too large to be read.
    hash: Option<u64>,
}

/// Where a file's current content is in parsing.
enum Parse {
    /// Parsed, refused before parsing, or never read.
    Idle,
    /// Checked against the limits; its parse starts when fewer than [`MAX_PARSES`] run.
    Queued(Arc<str>),
    /// Being parsed on its own thread: the parse's number, and when it started.
    Running(u64, Instant),
}

impl fmt::Debug for Parse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Parse::Idle => f.write_str("Idle"),
            Parse::Queued(text) => write!(f, "Queued({} bytes)", text.len()),
            Parse::Running(id, started) => write!(f, "Running({id}, {:?} ago)", started.elapsed()),
        }
    }
}

/// A parse that ended, sent by its thread.
struct ParseDone {
    path: PathBuf,
    id: u64,
    result: Result<Vec<Object>, FilesError>,
}

#[derive(Debug)]
struct TrackedFile {
    /// Listed in the directory at the last scan.
    present: bool,
    /// Of the content last read; `None` forces a read at the next scan.
    fingerprint: Option<Fingerprint>,
    /// Objects of the current content, if it parsed.
    parsed: Option<Arc<[Object]>>,
    /// Objects of this file in the published state.
    applied: Arc<[Object]>,
    /// Why the current content could not be read or parsed.
    problem: Option<String>,
    /// Why the current content is not applied.
    rejection: Option<String>,
    /// The parse of the content last read.
    parse: Parse,
}

impl TrackedFile {
    fn new() -> Self {
        Self {
            present: false,
            fingerprint: None,
            parsed: None,
            applied: Arc::from(Vec::new()),
            problem: None,
            rejection: None,
            parse: Parse::Idle,
        }
    }

    /// The objects this file should contribute if they are valid.
    fn candidate(&self) -> Arc<[Object]> {
        if self.present {
            Arc::clone(self.parsed.as_ref().unwrap_or(&self.applied))
        } else {
            Arc::from(Vec::new())
        }
    }

    /// Records a read or parse problem (the last good objects stay); returns whether it is new,
    /// and logs it then.
    fn set_problem(&mut self, problem: &FilesError) -> bool {
        self.parsed = None;
        self.parse = Parse::Idle;
        let message = problem.to_string();
        if self.problem.as_ref() == Some(&message) {
            return false;
        }
        error!(error = %message, "cluster config file not loaded; its last good objects stay");
        self.problem = Some(message);
        true
    }

    /// The file is no longer listed; returns whether that changes anything.
    fn mark_absent(&mut self, path: &Path) -> bool {
        let was_reported = self.present || self.problem.is_some();
        if self.present {
            info!(file = %path.display(), "cluster config file removed");
        }
        self.present = false;
        self.fingerprint = None;
        self.parsed = None;
        self.problem = None;
        self.parse = Parse::Idle; // the result of a running parse is ignored
        was_reported
    }

    /// Records the end of this file's parse; returns whether anything about it changed.
    fn parse_done(&mut self, path: &Path, result: Result<Vec<Object>, FilesError>) -> bool {
        let started = match self.parse {
            Parse::Running(_, started) => started,
            Parse::Idle | Parse::Queued(_) => Instant::now(),
        };
        self.parse = Parse::Idle;
        match result {
            Ok(objects) => {
                debug!(
                    file = %path.display(),
                    objects = objects.len(),
                    parse_ms = started.elapsed().as_millis(),
                    "cluster config file read"
                );
                if self.problem.take().is_some() {
                    info!(file = %path.display(), "cluster config file parses again");
                }
                self.parsed = Some(Arc::from(objects));
                true
            }
            Err(err) => self.set_problem(&err),
        }
    }
}

/// A directory of Kubernetes YAML files and the state last built from it.
#[derive(Debug)]
pub struct ConfigDir {
    dir: PathBuf,
    opts: EnrollmentOptions,
    limits: FileLimits,
    files: BTreeMap<PathBuf, TrackedFile>,
    dir_error: Option<String>,
    publisher: Publisher,
    /// Parses started and not yet received.
    running: usize,
    /// Number of the next parse.
    next_parse: u64,
    done_tx: mpsc::Sender<ParseDone>,
    done_rx: mpsc::Receiver<ParseDone>,
}

impl ConfigDir {
    /// A source for `dir` with the default [`FileLimits`]; nothing is read until
    /// [`ConfigDir::load`]. Fails if `opts` are invalid.
    pub fn new(dir: impl Into<PathBuf>, opts: EnrollmentOptions) -> Result<Self, FilesError> {
        Self::with_limits(dir, opts, FileLimits::default())
    }

    /// A source for `dir` whose files are refused beyond `limits`. Fails if `opts` or `limits`
    /// are invalid.
    pub fn with_limits(
        dir: impl Into<PathBuf>,
        opts: EnrollmentOptions,
        limits: FileLimits,
    ) -> Result<Self, FilesError> {
        opts.validate()
            .map_err(|e| FilesError::State(Box::new(e)))?;
        limits.validate()?;
        let (done_tx, done_rx) = mpsc::channel();
        Ok(Self {
            dir: dir.into(),
            opts,
            limits,
            files: BTreeMap::new(),
            dir_error: None,
            publisher: Publisher::default(),
            running: 0,
            next_parse: 0,
            done_tx,
            done_rx,
        })
    }

    /// The limits of each file.
    pub fn limits(&self) -> FileLimits {
        self.limits
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads what changed since the last call and returns the current snapshot: a new one (with
    /// the next generation, starting at 1) when objects or errors changed, else the same `Arc`.
    /// Waits for every changed file to be parsed.
    /// Fails only while no snapshot exists yet (the directory cannot be read at the first load);
    /// later problems are logged and listed in the snapshot's errors. Blocking file I/O.
    pub fn load(&mut self) -> Result<Arc<ClusterState>, FilesError> {
        self.load_until(None)
    }

    /// Like [`ConfigDir::load`], but waits at most `wait` for the files being parsed: those
    /// still parsing keep their previous objects, and their new ones are applied by a later call
    /// (a file is not read again while it is being parsed).
    pub fn poll(&mut self, wait: Duration) -> Result<Arc<ClusterState>, FilesError> {
        self.load_until(Some(Instant::now() + wait))
    }

    fn load_until(&mut self, deadline: Option<Instant>) -> Result<Arc<ClusterState>, FilesError> {
        let changed = match self.scan() {
            Ok(changed) => {
                if self.dir_error.take().is_some() {
                    info!(dir = %self.dir.display(), "config directory readable again");
                    true
                } else {
                    changed
                }
            }
            Err(err) => {
                if self.publisher.current().is_none() {
                    return Err(err);
                }
                let message = err.to_string();
                if self.dir_error.as_ref() == Some(&message) {
                    false
                } else {
                    error!(error = %message, "cannot read the config directory; the last state stays");
                    self.dir_error = Some(message);
                    true
                }
            }
        };
        let parsed = self.run_parses(deadline);
        match self.publisher.current() {
            Some(current) if !changed && !parsed => Ok(Arc::clone(current)),
            _ => self.rebuild(),
        }
    }

    /// Starts the queued parses while fewer than [`MAX_PARSES`] run, and records those that end
    /// until none is left or `deadline` passes; returns whether any file changed.
    fn run_parses(&mut self, deadline: Option<Instant>) -> bool {
        let mut changed = false;
        loop {
            self.start_parses();
            if self.running == 0 {
                return changed;
            }
            let done = match deadline {
                // `self` holds a sender: the channel never disconnects.
                None => self.done_rx.recv().ok(),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    self.done_rx.recv_timeout(left).ok()
                }
            };
            let Some(done) = done else {
                return changed;
            };
            self.running -= 1;
            if let Some(file) = self.files.get_mut(&done.path) {
                if matches!(file.parse, Parse::Running(id, _) if id == done.id) {
                    changed |= file.parse_done(&done.path, done.result);
                }
            }
        }
    }

    /// Starts queued parses, in path order, while fewer than [`MAX_PARSES`] run.
    fn start_parses(&mut self) {
        for (path, file) in &mut self.files {
            if self.running >= MAX_PARSES {
                return;
            }
            let Parse::Queued(text) = &file.parse else {
                continue;
            };
            let id = self.next_parse;
            self.next_parse += 1;
            self.running += 1;
            spawn_parse(path.clone(), id, text, &self.done_tx);
            file.parse = Parse::Running(id, Instant::now());
        }
    }

    /// Updates the tracked files from the directory; returns whether any content changed.
    fn scan(&mut self) -> Result<bool, FilesError> {
        let read_dir_error = |source| FilesError::ReadDir {
            dir: self.dir.clone(),
            source,
        };
        let mut listed = BTreeSet::new();
        for entry in fs::read_dir(&self.dir).map_err(read_dir_error)? {
            let path = entry.map_err(read_dir_error)?.path();
            if is_config_file(&path) {
                listed.insert(path);
            }
        }
        let mut changed = false;
        for (path, file) in &mut self.files {
            if !listed.contains(path) {
                changed |= file.mark_absent(path);
            }
        }
        for path in listed {
            changed |= self.refresh(path);
        }
        Ok(changed)
    }

    /// Re-reads one listed file if it may have changed, checks it against the limits and queues
    /// its parse; returns whether anything about it changed (a parse's result counts when it
    /// ends).
    fn refresh(&mut self, path: PathBuf) -> bool {
        let limits = self.limits;
        let file = self
            .files
            .entry(path.clone())
            .or_insert_with(TrackedFile::new);
        let meta = match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => meta,
            // Not a regular file, or removed since the listing.
            Ok(_) => return file.mark_absent(&path),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return file.mark_absent(&path),
            Err(source) => {
                file.present = true;
                file.fingerprint = None;
                return file.set_problem(&FilesError::ReadFile { path, source });
            }
        };
        let newly_listed = !file.present;
        file.present = true;
        if matches!(file.parse, Parse::Running(..)) {
            return newly_listed; // read again once this parse ends
        }
        let modified = meta.modified().ok();
        let settled = modified
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age >= SETTLED);
        let unchanged_meta = file
            .fingerprint
            .is_some_and(|old| old.len == meta.len() && old.modified == modified);
        if settled && unchanged_meta {
            return newly_listed;
        }
        let too_large = |size| FilesError::TooLarge {
            path: path.clone(),
            size,
            limit: limits.max_file_bytes,
        };
        let bytes = match read_at_most(&path, meta.len(), limits.max_file_bytes) {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(size)) => {
                file.fingerprint = Some(Fingerprint {
                    len: size,
                    modified,
                    hash: None,
                });
                return file.set_problem(&too_large(size)) || newly_listed;
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => return file.mark_absent(&path),
            Err(source) => {
                file.fingerprint = None;
                return file.set_problem(&FilesError::ReadFile { path, source });
            }
        };
        let mut hasher = DefaultHasher::new();
        bytes.hash(&mut hasher);
        let fingerprint = Fingerprint {
            len: bytes.len() as u64,
            modified,
            hash: Some(hasher.finish()),
        };
        let same_content = file
            .fingerprint
            .is_some_and(|old| old.len == fingerprint.len && old.hash == fingerprint.hash);
        file.fingerprint = Some(fingerprint);
        if same_content {
            return newly_listed;
        }
        let Ok(text) = String::from_utf8(bytes) else {
            return file.set_problem(&FilesError::NotUtf8 { path }) || newly_listed;
        };
        if let Err(deep) = check_depth(&text, limits.max_depth) {
            let err = FilesError::TooDeep {
                path,
                depth: deep.depth,
                limit: limits.max_depth,
                line: deep.line,
                column: deep.column,
            };
            return file.set_problem(&err) || newly_listed;
        }
        file.parse = Parse::Queued(Arc::from(text));
        newly_listed
    }

    /// Builds the state from every file's candidate objects, rejecting changed files involved in
    /// validation errors until it builds; publishes a new snapshot if objects or errors changed.
    fn rebuild(&mut self) -> Result<Arc<ClusterState>, FilesError> {
        let candidates = self
            .files
            .iter()
            .map(|(path, file)| (path.clone(), file.candidate()))
            .collect();
        let files = &self.files;
        let assembled = build_last_good(
            candidates,
            |path| Arc::clone(&files[path].applied),
            &self.opts,
        )
        .map_err(|e| FilesError::State(Box::new(e)))?;
        let rejections = assembled
            .rejections
            .into_iter()
            .map(|(path, rejection)| {
                let message = FilesError::Rejected {
                    path: path.clone(),
                    source: Box::new(rejection.source),
                    others: rejection.others,
                }
                .to_string();
                (path, message)
            })
            .collect();
        Ok(self.apply(assembled.chosen, rejections, assembled.state))
    }

    /// Makes `chosen` the applied objects and publishes `state` if objects or errors changed.
    fn apply(
        &mut self,
        mut chosen: BTreeMap<PathBuf, Arc<[Object]>>,
        mut rejections: BTreeMap<PathBuf, String>,
        state: ClusterState,
    ) -> Arc<ClusterState> {
        let mut objects_changed = false;
        for (path, file) in &mut self.files {
            if let Some(objects) = chosen.remove(path) {
                objects_changed |=
                    !Arc::ptr_eq(&objects, &file.applied) && objects[..] != file.applied[..];
                file.applied = objects;
            }
            let rejection = rejections.remove(path);
            match (&rejection, &file.rejection) {
                (Some(new), old) if old.as_ref() != Some(new) => {
                    error!(error = %new, "cluster config change rejected");
                }
                (None, Some(_)) => info!(file = %path.display(), "cluster config file applied"),
                _ => {}
            }
            file.rejection = rejection;
        }
        self.files
            .retain(|_, file| file.present || !file.applied.is_empty());
        let errors = self.errors();
        self.publisher.publish(state, objects_changed, errors)
    }

    /// Current problems: the directory's, then each file's.
    fn errors(&self) -> Vec<SourceError> {
        let mut errors = Vec::new();
        if let Some(message) = &self.dir_error {
            errors.push(SourceError {
                source: self.dir.display().to_string(),
                message: message.clone(),
                object: None,
            });
        }
        for (path, file) in &self.files {
            for message in [&file.problem, &file.rejection].into_iter().flatten() {
                errors.push(SourceError {
                    source: path.display().to_string(),
                    message: message.clone(),
                    object: None,
                });
            }
        }
        errors
    }
}

/// The content of `path` if it holds at most `limit` bytes, else `Err` with its size. `len`,
/// from the file's metadata, is checked before anything is read; a file that grows past
/// `limit` meanwhile is not read beyond it.
fn read_at_most(path: &Path, len: u64, limit: u64) -> io::Result<Result<Vec<u8>, u64>> {
    if len > limit {
        return Ok(Err(len));
    }
    let file = fs::File::open(path)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        let size = fs::metadata(path).map_or(0, |meta| meta.len());
        return Ok(Err(size.max(limit + 1)));
    }
    Ok(Ok(bytes))
}

/// Parses `text` on a thread of its own and sends the result, or parses it here if no thread
/// can be started.
fn spawn_parse(path: PathBuf, id: u64, text: &Arc<str>, done: &mpsc::Sender<ParseDone>) {
    let (thread_path, thread_text, thread_done) = (path.clone(), Arc::clone(text), done.clone());
    let spawned = thread::Builder::new()
        .name("config-parse".into())
        .spawn(move || parse_and_send(thread_path, id, &thread_text, &thread_done));
    if let Err(err) = spawned {
        warn!(error = %err, file = %path.display(), "cannot start a parser thread; parsing here");
        parse_and_send(path, id, text, done);
    }
}

/// Parses one file's text and sends the result (a panic of the parser is reported as such).
fn parse_and_send(path: PathBuf, id: u64, text: &str, done: &mpsc::Sender<ParseDone>) {
    let name = path.display().to_string();
    let result = match panic::catch_unwind(AssertUnwindSafe(|| parse_documents(&name, text))) {
        Ok(Ok(objects)) => Ok(objects),
        Ok(Err(err)) => Err(FilesError::Parse(err)),
        Err(_) => Err(FilesError::ParserPanicked { path: path.clone() }),
    };
    // The receiver is gone only when the `ConfigDir` is.
    let _ = done.send(ParseDone { path, id, result });
}

/// `*.yaml` or `*.yml`, not hidden, not an editor's backup or lock file.
fn is_config_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let yaml = Path::new(name)
        .extension()
        .is_some_and(|ext| ext == "yaml" || ext == "yml");
    yaml && !name.starts_with('.') && !name.starts_with('#') && !name.ends_with('~')
}

/// Receiver of the snapshots and the watcher task.
pub type Watcher = (watch::Receiver<Arc<ClusterState>>, JoinHandle<()>);

/// Loads `dir` once (an error if that fails: directory missing or unreadable, invalid `opts`),
/// then spawns a task that polls it every `interval` (250 ms is a good value) and sends each new
/// snapshot on the returned channel. The task ends when every receiver is dropped (or abort it).
/// The files are held to the default [`FileLimits`]; see [`ConfigDir::into_watcher`].
///
/// Must be called within a Tokio runtime. The first load runs on the calling thread; the polls
/// run on the blocking pool, so file I/O never stalls the runtime's workers.
pub fn spawn_watcher(
    dir: impl Into<PathBuf>,
    opts: EnrollmentOptions,
    interval: Duration,
) -> Result<Watcher, FilesError> {
    ConfigDir::new(dir, opts)?.into_watcher(interval)
}

impl ConfigDir {
    /// Loads the directory once (an error if that fails), waiting for every file to be parsed,
    /// then spawns a task that polls it every `interval` ([`ConfigDir::poll`], waiting at most
    /// `interval` for files being parsed) and sends each new snapshot on the returned channel.
    /// As [`spawn_watcher`] otherwise.
    pub fn into_watcher(self, interval: Duration) -> Result<Watcher, FilesError> {
        let mut config = self;
        let first = config.load()?;
        let (tx, rx) = watch::channel(first);
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ticker.tick().await; // the first tick is immediate; the first load is done
            loop {
                tokio::select! {
                    () = tx.closed() => {
                        debug!(dir = %config.dir().display(), "no receivers; config watcher stops");
                        return;
                    }
                    _ = ticker.tick() => {}
                }
                let polled = tokio::task::spawn_blocking(move || {
                    let result = config.poll(interval);
                    (config, result)
                })
                .await;
                let result;
                (config, result) = match polled {
                    Ok(polled) => polled,
                    Err(err) => {
                        error!(error = %err, "config watcher poll failed; the watcher stops");
                        return;
                    }
                };
                match result {
                    Ok(snapshot) => {
                        tx.send_if_modified(|current| {
                            let newer = current.generation() != snapshot.generation();
                            if newer {
                                *current = snapshot;
                            }
                            newer
                        });
                    }
                    // `poll` only fails before the first snapshot, which exists here.
                    Err(err) => error!(error = %err, "config directory poll failed"),
                }
            }
        });
        Ok((rx, task))
    }
}
