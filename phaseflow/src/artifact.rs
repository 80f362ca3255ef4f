//! Artifacts: where a phase's JSON file lives, how phaseflow notices that an agent finished
//! writing it, and how it is hashed and validated.
//!
//! * [`ArtifactLocation`] confines the declared path to the run's worktree, symlinks included,
//!   and re-checks that confinement before every read, write or removal.
//! * [`ArtifactWatch`] / [`wait_for`] detect a *new, complete* file: filesystem notifications
//!   (a close after writing, or a rename into place) followed by a short confirmation, with
//!   polling and a quiet window as the fallback.
//! * [`CompiledSchema`] and [`inspect`] turn the file into a [`NewArtifact`] verdict. Bad content
//!   (not JSON, not UTF-8, too large, schema violations) is a verdict with issues, never an error:
//!   the engine answers it with a repair prompt.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher, WatcherKind};
use serde_json::Value;
use sha2::Digest;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Error, ErrorCode, Result};
use crate::event::ValidationIssue;
use crate::ids::ContentHash;
use crate::store::NewArtifact;

/// Default cap on artifact size: 4 MiB.
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 4 * 1024 * 1024;

/// Symlinks followed while resolving one path before giving up (Linux's own limit).
const MAX_SYMLINK_HOPS: u32 = 40;

/// Validation messages quote the offending value; a huge value must not bloat the event log or
/// the repair prompt, so messages are cut to this many bytes.
const MAX_ISSUE_MESSAGE_BYTES: usize = 1024;

/// A zero poll interval would spin; this is the floor.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(1);

const CONFINEMENT_HINT: &str = "declare the artifact as a relative path that stays inside the worktree \
     (for example \"phaseflow/plan.json\"), and make sure no symlink on the way points outside it";

// ---------------------------------------------------------------------------------------------
// Location and confinement
// ---------------------------------------------------------------------------------------------

/// A canonical artifact location confined to a worktree.
///
/// `path` is the physical location: every directory on the way is resolved through symlinks, so
/// the same file always gets the same path in events and prompt envelopes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactLocation {
    worktree: PathBuf,
    path: PathBuf,
    relative: String,
}

impl ArtifactLocation {
    /// Canonicalises `worktree` and resolves `relative` against it.
    ///
    /// The artifact itself need not exist yet: the deepest existing ancestor is resolved through
    /// symlinks and the rest is appended. Refused with [`ErrorCode::ArtifactOutsideWorktree`] when
    /// `relative` is empty, absolute, names a directory, leaves the worktree through `..`, or
    /// resolves outside it through a symlink (a symlinked directory on the way or a symlinked
    /// artifact file). A missing, unreadable or non-directory worktree is
    /// [`ErrorCode::WorkspacePermissions`].
    pub fn resolve(worktree: &Path, relative: &str) -> Result<Self> {
        let root = canonical_worktree(worktree)?;
        let normalized = normalize_relative(&root, relative)?;
        let declared = root.join(&normalized);
        let path = physical_path(&declared).map_err(|err| {
            io_failure(
                format!(
                    "cannot resolve artifact path {relative:?} in worktree {}",
                    root.display()
                ),
                &declared,
                err,
            )
        })?;
        ensure_artifact_inside(&root, relative, &path)?;
        Ok(Self {
            worktree: root,
            path,
            relative: relative.to_owned(),
        })
    }

    /// The canonical worktree.
    pub fn worktree(&self) -> &Path {
        &self.worktree
    }

    /// The canonical absolute path of the artifact.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as declared, relative to the worktree.
    pub fn relative(&self) -> &str {
        &self.relative
    }

    /// The canonical absolute path as a string (lossy on non-UTF-8 paths), as recorded in
    /// events and prompt envelopes.
    pub fn path_string(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// Creates the artifact's parent directories, one at a time, refusing to create anything
    /// through a symlink that leads outside the worktree.
    pub fn prepare_parent(&self) -> Result<()> {
        let parent = self.parent();
        let below_root = parent.strip_prefix(&self.worktree).map_err(|_| {
            Error::new(
                ErrorCode::InternalStateCorruption,
                format!(
                    "artifact directory {} is not below worktree {}",
                    parent.display(),
                    self.worktree.display()
                ),
            )
            .with_hint("artifact locations are only built by ArtifactLocation::resolve; this is a bug in phaseflow")
        })?;
        let mut current = self.worktree.clone();
        for component in below_root.components() {
            current.push(component);
            current = self.enter_directory(&current)?;
        }
        // Somebody may have swapped a directory for a symlink while we were creating the rest.
        let resolved = physical_path(parent)
            .map_err(|err| io_failure("cannot resolve the artifact directory", parent, err))?;
        self.ensure_directory_inside(&resolved)
    }

    /// Removes a stale artifact so that an old file is never mistaken for the agent's answer.
    ///
    /// A missing file is fine. If the artifact path is a symlink, the link itself is removed,
    /// never its target; nothing outside the worktree is ever deleted.
    pub fn remove_stale(&self) -> Result<()> {
        let parent = self.parent();
        let parent = physical_path(parent)
            .map_err(|err| io_failure("cannot resolve the artifact directory", parent, err))?;
        self.ensure_directory_inside(&parent)?;
        let target = parent.join(self.file_name());
        match fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_dir() => {
                return Err(Error::new(
                    ErrorCode::WorkspacePermissions,
                    format!(
                        "cannot remove stale artifact {}: it is a directory",
                        target.display()
                    ),
                )
                .with_hint(
                    "remove the directory that occupies the artifact path, or declare another artifact path",
                ));
            }
            Ok(_) => {}
            Err(err) if is_missing(&err) => return Ok(()),
            Err(err) => return Err(io_failure("cannot inspect stale artifact", &target, err)),
        }
        match fs::remove_file(&target) {
            Ok(()) => Ok(()),
            Err(err) if is_missing(&err) => Ok(()),
            Err(err) => Err(io_failure("cannot remove stale artifact", &target, err)),
        }
    }

    /// The file's current signature, `None` if it does not exist.
    ///
    /// A symlink at the artifact path is described itself, not followed.
    pub fn signature(&self) -> Result<Option<Signature>> {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) => Ok(Some(Signature::of(&meta))),
            Err(err) if is_missing(&err) => Ok(None),
            Err(err) => Err(io_failure("cannot inspect artifact", &self.path, err)),
        }
    }

    fn parent(&self) -> &Path {
        // `resolve` guarantees `path` is strictly below the worktree, so it has a parent.
        self.path.parent().unwrap_or(&self.worktree)
    }

    fn file_name(&self) -> OsString {
        self.path
            .file_name()
            .map(ToOwned::to_owned)
            .unwrap_or_default()
    }

    /// Follows or creates one directory of the artifact's parent chain; returns its physical path.
    fn enter_directory(&self, dir: &Path) -> Result<PathBuf> {
        let meta = match fs::symlink_metadata(dir) {
            Ok(meta) => meta,
            Err(err) if is_missing(&err) => {
                match fs::create_dir(dir) {
                    Ok(()) => {}
                    // Another process created it first; it is checked below like any other.
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(err) => {
                        return Err(io_failure("cannot create artifact directory", dir, err));
                    }
                }
                fs::symlink_metadata(dir)
                    .map_err(|err| io_failure("cannot inspect artifact directory", dir, err))?
            }
            Err(err) => return Err(io_failure("cannot inspect artifact directory", dir, err)),
        };
        if meta.is_dir() {
            return Ok(dir.to_owned());
        }
        if meta.file_type().is_symlink() {
            let resolved = physical_path(dir)
                .map_err(|err| io_failure("cannot resolve artifact directory", dir, err))?;
            self.ensure_directory_inside(&resolved)?;
            if resolved.is_dir() {
                return Ok(resolved);
            }
        }
        Err(Error::new(
            ErrorCode::WorkspacePermissions,
            format!(
                "cannot create the directory for artifact {:?}: {} exists and is not a directory",
                self.relative,
                dir.display()
            ),
        )
        .with_hint("remove the file that is in the way, or declare another artifact path"))
    }

    fn ensure_directory_inside(&self, resolved: &Path) -> Result<()> {
        if resolved.starts_with(&self.worktree) {
            Ok(())
        } else {
            Err(outside(
                &self.relative,
                &self.worktree,
                format!(
                    "its directory now resolves to {}, outside the worktree (a symlink on the way points outside)",
                    resolved.display()
                ),
            ))
        }
    }

    /// The physical path of the artifact file, re-checked: inside the worktree and a regular file.
    fn confined_regular_file(&self) -> Result<PathBuf> {
        let resolved = physical_path(&self.path)
            .map_err(|err| io_failure("cannot resolve artifact", &self.path, err))?;
        ensure_artifact_inside(&self.worktree, &self.relative, &resolved)?;
        let meta = fs::symlink_metadata(&resolved)
            .map_err(|err| io_failure("cannot read artifact", &resolved, err))?;
        if !meta.is_file() {
            return Err(outside(
                &self.relative,
                &self.worktree,
                format!(
                    "{} is {}, not a regular file",
                    resolved.display(),
                    describe_file_type(&meta)
                ),
            )
            .with_hint("the agent must write the artifact as a regular JSON file at the artifact path; remove what is there and run the phase again"));
        }
        Ok(resolved)
    }
}

fn canonical_worktree(worktree: &Path) -> Result<PathBuf> {
    let hint = "create the worktree (for example with `git worktree add`) and make it readable and \
                writable by the orchestrator";
    let root = fs::canonicalize(worktree).map_err(|err| {
        Error::new(
            ErrorCode::WorkspacePermissions,
            format!("cannot open worktree {}: {err}", worktree.display()),
        )
        .with_hint(hint)
        .with_source(err)
    })?;
    if !root.is_dir() {
        return Err(Error::new(
            ErrorCode::WorkspacePermissions,
            format!("worktree {} is not a directory", worktree.display()),
        )
        .with_hint(hint));
    }
    fs::read_dir(&root).map_err(|err| {
        Error::new(
            ErrorCode::WorkspacePermissions,
            format!("cannot read worktree {}: {err}", root.display()),
        )
        .with_hint(hint)
        .with_source(err)
    })?;
    Ok(root)
}

/// Turns the declared path into plain file-name components, refusing anything that is not a
/// relative path to a file inside the worktree.
fn normalize_relative(root: &Path, relative: &str) -> Result<PathBuf> {
    let refuse = |why: &str| outside(relative, root, why.to_owned());
    if relative.is_empty() {
        return Err(refuse("the path is empty"));
    }
    if relative.contains('\0') {
        return Err(refuse("the path contains a NUL byte"));
    }
    if relative.ends_with('/') || relative.ends_with(std::path::MAIN_SEPARATOR) {
        return Err(refuse(
            "the path ends with a separator, so it names a directory",
        ));
    }
    let mut normalized = PathBuf::new();
    let mut depth = 0usize;
    for component in Path::new(relative).components() {
        match component {
            Component::Prefix(_) | Component::RootDir => {
                return Err(refuse("the path is absolute"));
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return Err(refuse("`..` leaves the worktree"));
                }
                normalized.pop();
                depth -= 1;
            }
            Component::Normal(name) => {
                normalized.push(name);
                depth += 1;
            }
        }
    }
    if depth == 0 {
        return Err(refuse("the path names the worktree itself, not a file"));
    }
    Ok(normalized)
}

fn ensure_artifact_inside(root: &Path, relative: &str, resolved: &Path) -> Result<()> {
    if resolved.starts_with(root) && resolved != root {
        return Ok(());
    }
    Err(outside(
        relative,
        root,
        format!(
            "it resolves to {}, outside the worktree (a symlink on the way points outside)",
            resolved.display()
        ),
    ))
}

fn outside(relative: &str, root: &Path, why: String) -> Error {
    Error::new(
        ErrorCode::ArtifactOutsideWorktree,
        format!(
            "artifact path {relative:?} is refused for worktree {}: {why}",
            root.display()
        ),
    )
    .with_hint(CONFINEMENT_HINT)
}

fn io_failure(what: impl fmt::Display, path: &Path, err: io::Error) -> Error {
    Error::new(
        ErrorCode::WorkspacePermissions,
        format!("{what} {}: {err}", path.display()),
    )
    .with_hint(format!(
        "check that {} and its directories exist and are readable and writable by the orchestrator",
        path.display()
    ))
    .with_source(err)
}

fn is_missing(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn describe_file_type(meta: &fs::Metadata) -> &'static str {
    let kind = meta.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symlink"
    } else {
        "a special file (fifo, socket or device)"
    }
}

/// Where `path` physically leads: the deepest existing ancestor is resolved through symlinks
/// (dangling ones included) and the components that do not exist yet are appended.
fn physical_path(path: &Path) -> io::Result<PathBuf> {
    physical_path_within(path, 0)
}

fn physical_path_within(path: &Path, hops: u32) -> io::Result<PathBuf> {
    if hops > MAX_SYMLINK_HOPS {
        return Err(io::Error::other(format!(
            "more than {MAX_SYMLINK_HOPS} symlinks while resolving {}",
            path.display()
        )));
    }
    let components: Vec<Component<'_>> = path.components().collect();
    for existing in (1..=components.len()).rev() {
        let prefix: PathBuf = components[..existing].iter().collect();
        let meta = match fs::symlink_metadata(&prefix) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        let base = match fs::canonicalize(&prefix) {
            Ok(base) => base,
            Err(err) if err.kind() == io::ErrorKind::NotFound && meta.file_type().is_symlink() => {
                // A dangling symlink: where it points is where a writer would create the file.
                let target = fs::read_link(&prefix)?;
                let link_dir = prefix
                    .parent()
                    .map_or_else(|| PathBuf::from("/"), Path::to_owned);
                physical_path_within(&fs::canonicalize(link_dir)?.join(target), hops + 1)?
            }
            Err(err) => return Err(err),
        };
        return Ok(append_lexically(base, &components[existing..]));
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no part of {} exists", path.display()),
    ))
}

/// Appends components below a physical (symlink-free) directory; `..` there is the parent.
fn append_lexically(mut base: PathBuf, rest: &[Component<'_>]) -> PathBuf {
    for component in rest {
        match component {
            Component::ParentDir => {
                base.pop();
            }
            Component::CurDir => {}
            other => base.push(other),
        }
    }
    base
}

// ---------------------------------------------------------------------------------------------
// Signatures
// ---------------------------------------------------------------------------------------------

/// What identifies one version of a file on disk: type, length, modification time (ns) and, on
/// unix, device, inode and change time — so a rewrite is noticed even with identical bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    kind: EntryKind,
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    inode: (u64, u64),
    #[cfg(unix)]
    changed: (i64, i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EntryKind {
    File,
    Directory,
    Symlink,
    Other,
}

impl Signature {
    fn of(meta: &fs::Metadata) -> Self {
        let file_type = meta.file_type();
        let kind = if file_type.is_file() {
            EntryKind::File
        } else if file_type.is_dir() {
            EntryKind::Directory
        } else if file_type.is_symlink() {
            EntryKind::Symlink
        } else {
            EntryKind::Other
        };
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Self {
            kind,
            len: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            inode: (meta.dev(), meta.ino()),
            #[cfg(unix)]
            changed: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Waiting for the artifact
// ---------------------------------------------------------------------------------------------

/// How [`wait_for`] decides that an artifact is complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitOptions {
    /// Give up after this long (default 10 minutes: agents are slow).
    pub timeout: Duration,
    /// After a close-after-write or rename-into-place notification the signature must stay
    /// unchanged this long (default 15 ms).
    pub settle: Duration,
    /// Without a close notification to go by, a file unchanged this long counts as complete
    /// (default 500 ms).
    pub quiet_window: Duration,
    /// Safety poll even when notifications work (default 100 ms, at least 1 ms).
    pub poll_interval: Duration,
}

impl Default for WaitOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(600),
            settle: Duration::from_millis(15),
            quiet_window: Duration::from_millis(500),
            poll_interval: Duration::from_millis(100),
        }
    }
}

/// How a wait for an artifact ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// A new, complete artifact is on disk.
    Ready,
    /// The timeout passed first.
    TimedOut,
}

/// Waits until a complete artifact exists at `location` whose signature differs from `baseline`.
///
/// Shorthand for [`ArtifactWatch::arm`] followed by [`ArtifactWatch::wait`]. Because the watch
/// starts only now, a file that was already completely written when this is called is
/// recognised by the quiet window (500 ms by default) rather than by a notification; arm an
/// [`ArtifactWatch`] before sending the prompt to get the fast path in that case too.
pub async fn wait_for(
    location: &ArtifactLocation,
    baseline: Option<&Signature>,
    options: &WaitOptions,
) -> Result<WaitOutcome> {
    ArtifactWatch::arm(location, baseline).wait(options).await
}

/// Watches one artifact location from the moment it is armed.
///
/// How completeness is decided:
/// * **Linux (inotify):** once the watch has seen the file being written, it is complete after
///   the writer closes it (or it is renamed or hard-linked into place) with nothing written
///   since, and then stays unchanged for [`WaitOptions::settle`]. A file written in slow chunks,
///   kept open in between, is therefore never reported early, even if someone reads it
///   meanwhile. A writer that never closes the file (or only truncates it) is not noticed
///   before the timeout.
/// * **No usable notification** (other platforms, whose watchers report no close events; the
///   watcher could not be created; it overflowed; the directory was replaced; or the file was
///   already written before arming): a file whose signature stays unchanged for
///   [`WaitOptions::quiet_window`] counts as complete.
///
/// The watch re-arms itself when the artifact's directory appears, disappears or is replaced.
/// Only files whose signature differs from the baseline, or that were written since arming,
/// count as the new artifact.
pub struct ArtifactWatch {
    location: ArtifactLocation,
    baseline: Option<Signature>,
    wake: Arc<Notify>,
    state: WatchState,
    written_since_arm: bool,
}

impl fmt::Debug for ArtifactWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            WatchState::Armed(watch) if watch.reports_close => "notifications with close events",
            WatchState::Armed(_) => "notifications without close events",
            WatchState::AwaitingDirectory => "waiting for the directory to exist",
            WatchState::Unavailable => "polling",
        };
        f.debug_struct("ArtifactWatch")
            .field("location", &self.location)
            .field("baseline", &self.baseline)
            .field("state", &state)
            .field("written_since_arm", &self.written_since_arm)
            .finish()
    }
}

enum WatchState {
    Armed(DirectoryWatch),
    /// The directory does not exist (yet), or its watch was lost: arm again once it exists.
    AwaitingDirectory,
    /// The watcher could not be created: polling only.
    Unavailable,
}

impl ArtifactWatch {
    /// Starts watching `location` now; writes from this moment on are seen by notifications.
    ///
    /// Never fails: without a watcher, [`ArtifactWatch::wait`] falls back to polling.
    pub fn arm(location: &ArtifactLocation, baseline: Option<&Signature>) -> Self {
        let mut watch = Self {
            location: location.clone(),
            baseline: baseline.cloned(),
            wake: Arc::new(Notify::new()),
            state: WatchState::AwaitingDirectory,
            written_since_arm: false,
        };
        watch.refresh();
        watch
    }

    /// Waits until a new, complete artifact is on disk, or `options.timeout` passes
    /// (`Ok(TimedOut)`, not an error). Errors only when the file cannot be inspected.
    ///
    /// Sleeps on tokio timers and wakes on notifications; never blocks the runtime beyond a
    /// `stat` per wake-up. May be called again after a timeout.
    pub async fn wait(&mut self, options: &WaitOptions) -> Result<WaitOutcome> {
        let poll = options.poll_interval.max(MIN_POLL_INTERVAL);
        let started = Instant::now();
        let deadline = started
            .checked_add(options.timeout)
            .unwrap_or_else(|| started + Duration::from_secs(100 * 365 * 24 * 3600));
        // Polling fallback: the signature we last saw and since when it has been unchanged.
        let mut quiet: Option<(Signature, Instant)> = None;
        loop {
            self.refresh();
            let seen = self.observe();
            let now = Instant::now();
            let mut next = now + poll;
            match self.new_signature()? {
                None => quiet = None,
                Some(signature) if seen.reports_close && seen.writes > 0 => {
                    quiet = None;
                    if seen.completed {
                        let until = (now + options.settle).min(deadline);
                        if self.settle(&signature, &seen, until).await? {
                            return Ok(WaitOutcome::Ready);
                        }
                        next = now;
                    }
                }
                Some(signature) => {
                    let since = match &quiet {
                        Some((previous, since)) if *previous == signature => *since,
                        _ => now,
                    };
                    if now.duration_since(since) >= options.quiet_window {
                        return Ok(WaitOutcome::Ready);
                    }
                    next = next.min(since + options.quiet_window);
                    quiet = Some((signature, since));
                }
            }
            if Instant::now() >= deadline {
                return Ok(WaitOutcome::TimedOut);
            }
            let next = next.min(deadline);
            if next > Instant::now() {
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep_until(next) => {}
                }
            }
        }
    }

    /// Keeps the watch pointed at the directory that currently holds the artifact.
    fn refresh(&mut self) {
        let dir = self.location.parent().to_owned();
        if let WatchState::Armed(watch) = &self.state {
            if !watch.lost() && watch.directory == directory_identity(&dir) {
                return;
            }
            self.written_since_arm |= watch.writes() > 0;
            tracing::debug!(dir = %dir.display(), "artifact directory watch lost; re-arming");
            self.state = WatchState::AwaitingDirectory;
        }
        if matches!(self.state, WatchState::AwaitingDirectory) && dir.is_dir() {
            self.state = match DirectoryWatch::start(&dir, &self.location.path, &self.wake) {
                Ok(watch) => WatchState::Armed(watch),
                Err(err) => {
                    tracing::debug!(
                        dir = %dir.display(),
                        error = %err,
                        "cannot watch artifact directory; polling instead"
                    );
                    WatchState::Unavailable
                }
            };
        }
    }

    fn observe(&mut self) -> Seen {
        match &self.state {
            WatchState::Armed(watch) => {
                let writes = watch.writes();
                let completed = watch.signals().completed();
                self.written_since_arm |= writes > 0;
                Seen {
                    writes,
                    completed,
                    reports_close: watch.reports_close,
                }
            }
            WatchState::AwaitingDirectory | WatchState::Unavailable => Seen::default(),
        }
    }

    /// The current signature if the file exists and is not the baseline version.
    fn new_signature(&self) -> Result<Option<Signature>> {
        let current = self.location.signature()?;
        Ok(current.filter(|signature| {
            self.written_since_arm || self.baseline.as_ref() != Some(signature)
        }))
    }

    /// True when the file stays as it is until `until`; false as soon as it is written to or
    /// changes, so that the confirmation restarts from the latest write, not the first.
    async fn settle(&mut self, signature: &Signature, seen: &Seen, until: Instant) -> Result<bool> {
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(until) => {}
            }
            if !self.unchanged(signature, seen)? {
                return Ok(false);
            }
            if Instant::now() >= until {
                return Ok(true);
            }
        }
    }

    /// Nothing was written since `before` and the file still has `signature`.
    fn unchanged(&mut self, signature: &Signature, before: &Seen) -> Result<bool> {
        let after = self.observe();
        if after.writes != before.writes || !after.completed {
            return Ok(false);
        }
        Ok(self.location.signature()?.as_ref() == Some(signature))
    }
}

/// What the watch reported at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// Writes, creations, removals and renames of the artifact since the watch was armed.
    writes: u64,
    /// Nobody is writing it: no write (and no creator's open) since the last close after writing.
    completed: bool,
    /// The watcher reports close events, so an open file is known to be unfinished.
    reports_close: bool,
}

/// The artifact's directory as watched through the shared [`WatchHub`], and what was seen.
struct DirectoryWatch {
    subscription: Subscription,
    directory: Option<DirectoryIdentity>,
    reports_close: bool,
}

/// What the watcher's thread tells one wait, in atomics it updates without blocking.
#[derive(Debug, Default)]
struct Signals {
    /// Writes, creations, removals and renames of the artifact since arming.
    writes: AtomicU64,
    /// Written to (or opened by its creator) since the last close after writing, rename into
    /// place or removal: someone still has it open for writing.
    dirty: AtomicBool,
    /// The previous [`Touch`] other than `Unrelated`, as `Touch as u8`: an open right after the
    /// creation is the creator's, a rename right after a rename is the same rename.
    previous: AtomicU8,
    /// The watch can no longer be trusted: events were missed or the directory went away.
    lost: AtomicBool,
}

impl DirectoryWatch {
    fn start(dir: &Path, file: &Path, wake: &Arc<Notify>) -> notify::Result<Self> {
        // Identify the directory before watching it: if it is replaced in between, the identity
        // check fails on the next refresh and the watch is re-armed, never silently stale.
        let directory = directory_identity(dir);
        let subscription = HUB.subscribe(dir, file, wake)?;
        Ok(Self {
            subscription,
            directory,
            reports_close: <notify::RecommendedWatcher as Watcher>::kind() == WatcherKind::Inotify,
        })
    }

    fn signals(&self) -> &Signals {
        &self.subscription.signals
    }

    fn writes(&self) -> u64 {
        self.signals().writes.load(Ordering::SeqCst)
    }

    fn lost(&self) -> bool {
        self.signals().lost.load(Ordering::SeqCst)
    }
}

/// The process-wide watcher every [`ArtifactWatch`] subscribes to.
///
/// One watcher (one inotify instance, one thread) serves all waits: inotify instances are a
/// scarce per-user resource (128 by default on Linux), and an orchestrator waits on many
/// artifacts at once.
static HUB: LazyLock<WatchHub> = LazyLock::new(WatchHub::default);

#[derive(Default)]
struct WatchHub {
    /// Created on first use, retried while creation fails. Held across `watch`/`unwatch`, which
    /// wait for the watcher's thread, so the event callback must never take this lock.
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    /// Who waits on which directory; read by the event callback, never held across a call
    /// into the watcher.
    routes: Arc<RwLock<Routes>>,
}

#[derive(Default)]
struct Routes {
    by_dir: HashMap<PathBuf, Vec<Route>>,
    next_id: u64,
}

struct Route {
    id: u64,
    file: PathBuf,
    signals: Arc<Signals>,
    wake: Arc<Notify>,
}

/// Removes its route (and the directory watch, once unused) when dropped. Owned only by an
/// [`ArtifactWatch`], never by the callback, so it is never dropped on the watcher's thread.
struct Subscription {
    dir: PathBuf,
    id: u64,
    signals: Arc<Signals>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        HUB.unsubscribe(&self.dir, self.id);
    }
}

impl WatchHub {
    fn subscribe(
        &self,
        dir: &Path,
        file: &Path,
        wake: &Arc<Notify>,
    ) -> notify::Result<Subscription> {
        let mut guard = self.watcher.lock().unwrap_or_else(PoisonError::into_inner);
        let watcher = match &mut *guard {
            Some(watcher) => watcher,
            None => {
                let routes = Arc::clone(&self.routes);
                let handler = move |event: notify::Result<notify::Event>| dispatch(&routes, &event);
                guard.insert(notify::RecommendedWatcher::new(
                    handler,
                    notify::Config::default(),
                )?)
            }
        };
        let signals = Arc::new(Signals::default());
        let id = {
            let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
            routes.next_id += 1;
            let id = routes.next_id;
            routes
                .by_dir
                .entry(dir.to_owned())
                .or_default()
                .push(Route {
                    id,
                    file: file.to_owned(),
                    signals: Arc::clone(&signals),
                    wake: Arc::clone(wake),
                });
            id
        };
        // Watched again even when another wait already watches `dir`: that watch may belong to
        // a directory that was replaced since; watching an unchanged directory again is a no-op.
        if let Err(err) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            self.remove_route(dir, id);
            return Err(err);
        }
        Ok(Subscription {
            dir: dir.to_owned(),
            id,
            signals,
        })
    }

    fn unsubscribe(&self, dir: &Path, id: u64) {
        let mut guard = self.watcher.lock().unwrap_or_else(PoisonError::into_inner);
        // The directory may be gone already, and its watch with it: unwatching is best effort.
        if self.remove_route(dir, id)
            && let Some(watcher) = guard.as_mut()
        {
            let _ = watcher.unwatch(dir);
        }
    }

    /// Removes one route; true when it was the directory's last.
    fn remove_route(&self, dir: &Path, id: u64) -> bool {
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        let Some(list) = routes.by_dir.get_mut(dir) else {
            return false;
        };
        list.retain(|route| route.id != id);
        if list.is_empty() {
            routes.by_dir.remove(dir);
            true
        } else {
            false
        }
    }
}

/// Runs on the watcher's thread for every notification: hands it to the waits it concerns.
fn dispatch(routes: &RwLock<Routes>, event: &notify::Result<notify::Event>) {
    let routes = routes.read().unwrap_or_else(PoisonError::into_inner);
    let paths = match event {
        Ok(event) => &event.paths,
        Err(err) => &err.paths,
    };
    let deliver = |dir: &Path, route: &Route| {
        let touch = match event {
            Ok(event) => classify(event, dir, &route.file),
            Err(_) => Touch::WatchLost,
        };
        route.signals.record(touch, &route.wake);
    };
    if paths.is_empty() {
        // An overflow or an error without a path: every wait may have missed something.
        for (dir, list) in &routes.by_dir {
            list.iter().for_each(|route| deliver(dir, route));
        }
        return;
    }
    // A path is either an entry of a watched directory or the directory itself.
    let mut dirs: Vec<&Path> = paths
        .iter()
        .flat_map(|path| [Some(path.as_path()), path.parent()])
        .flatten()
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        if let Some(list) = routes.by_dir.get(dir) {
            list.iter().for_each(|route| deliver(dir, route));
        }
    }
}

impl Signals {
    /// Runs on the watcher's thread: only atomics and a non-blocking wake-up.
    fn record(&self, touch: Touch, wake: &Notify) {
        if touch == Touch::Unrelated {
            return;
        }
        let previous = self.previous.swap(touch as u8, Ordering::SeqCst);
        match touch {
            Touch::Unrelated => return,
            // inotify does not report closes after reading, so only the creator's open (which
            // the kernel reports right after the creation) marks the file as being written;
            // other opens are readers, or writers whose writes mark it anyway.
            Touch::Opened if previous == Touch::Created as u8 => {
                self.dirty.store(true, Ordering::SeqCst);
            }
            Touch::Opened => return,
            Touch::Modified => {
                self.dirty.store(true, Ordering::SeqCst);
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
            // A name that nobody opens (a hard link) is complete as it is.
            Touch::Created | Touch::ClosedAfterWriting | Touch::Gone => {
                self.dirty.store(false, Ordering::SeqCst);
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
            Touch::Replaced => {
                // inotify reports one rename as `To` and then `Both`; the second is no news
                // (and the settle check compares signatures anyway).
                let was_dirty = self.dirty.swap(false, Ordering::SeqCst);
                if was_dirty || previous != Touch::Replaced as u8 {
                    self.writes.fetch_add(1, Ordering::SeqCst);
                }
            }
            Touch::WatchLost => self.lost.store(true, Ordering::SeqCst),
        }
        wake.notify_one();
    }

    /// Nobody is writing: no write, and no creator's open, since the last close after writing.
    fn completed(&self) -> bool {
        !self.dirty.load(Ordering::SeqCst)
    }
}

/// What one notification means for the artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Touch {
    /// Another file, a close after reading, or a metadata change (the settle check covers it).
    Unrelated,
    /// A handle on the artifact was opened (for reading or writing: inotify does not say).
    Opened,
    /// Bytes were written: incomplete until a close after writing.
    Modified,
    /// A handle that was open for writing was closed.
    ClosedAfterWriting,
    /// The name appeared: by an open that will write it, or by a hard link.
    Created,
    /// Another file was renamed onto the artifact's name.
    Replaced,
    /// The artifact was removed or renamed away.
    Gone,
    /// Events may have been missed, or the watched directory itself went away.
    WatchLost,
}

fn classify(event: &notify::Event, dir: &Path, file: &Path) -> Touch {
    if event.need_rescan() {
        return Touch::WatchLost;
    }
    let about_dir = event.paths.iter().any(|path| path == dir);
    if about_dir
        && matches!(
            event.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
        )
    {
        return Touch::WatchLost;
    }
    let first = event.paths.first().is_some_and(|path| path == file);
    if let EventKind::Modify(ModifyKind::Name(RenameMode::Both)) = event.kind {
        return if event.paths.get(1).is_some_and(|path| path == file) {
            Touch::Replaced
        } else if first {
            Touch::Gone
        } else {
            Touch::Unrelated
        };
    }
    if !first {
        return Touch::Unrelated;
    }
    match event.kind {
        EventKind::Access(AccessKind::Open(_)) => Touch::Opened,
        EventKind::Access(AccessKind::Close(AccessMode::Read)) => Touch::Unrelated,
        EventKind::Access(AccessKind::Close(_)) => Touch::ClosedAfterWriting,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => Touch::Unrelated,
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => Touch::Replaced,
        EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => Touch::Gone,
        EventKind::Create(_) => Touch::Created,
        EventKind::Modify(_) | EventKind::Any | EventKind::Other => Touch::Modified,
    }
}

#[cfg(unix)]
type DirectoryIdentity = (u64, u64);
#[cfg(not(unix))]
type DirectoryIdentity = ();

/// Which directory is at `dir` right now (device and inode), `None` if none is.
#[cfg(unix)]
fn directory_identity(dir: &Path) -> Option<DirectoryIdentity> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(dir).ok().map(|meta| (meta.dev(), meta.ino()))
}

/// Whether a directory is at `dir` right now; replacing it is not detectable here.
#[cfg(not(unix))]
fn directory_identity(dir: &Path) -> Option<DirectoryIdentity> {
    fs::metadata(dir).ok().map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// Schemas and validation
// ---------------------------------------------------------------------------------------------

/// A compiled JSON Schema.
pub struct CompiledSchema {
    id: String,
    validator: jsonschema::Validator,
}

impl fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledSchema")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl CompiledSchema {
    /// Parses `text` as JSON and compiles it as a JSON Schema (draft detected from `$schema`).
    ///
    /// Text that is not JSON, or not a valid schema (including one whose `$ref`s point at files
    /// or URLs: phaseflow never fetches schemas), is [`ErrorCode::SchemaInvalid`] naming the
    /// schema id and the parser's message.
    pub fn compile(id: &str, text: &str) -> Result<Self> {
        let hint = "fix the schema file so that it is a valid JSON Schema (draft 4, 6, 7, 2019-09 \
                    or 2020-12) with no external references";
        let schema: Value = serde_json::from_str(text).map_err(|err| {
            Error::new(
                ErrorCode::SchemaInvalid,
                format!("schema {id:?} is not JSON: {err}"),
            )
            .with_hint(hint)
        })?;
        // The schema is user input handed to a third-party compiler; a bug there must become
        // this error, not take the orchestrator down.
        let compiled = std::panic::catch_unwind(|| jsonschema::validator_for(&schema));
        let validator = match compiled {
            Ok(Ok(validator)) => validator,
            Ok(Err(err)) => {
                let at = err.instance_path().as_str();
                let at = if at.is_empty() {
                    String::new()
                } else {
                    format!(" at {at}")
                };
                return Err(Error::new(
                    ErrorCode::SchemaInvalid,
                    format!("schema {id:?} is not a valid JSON Schema{at}: {err}"),
                )
                .with_hint(hint));
            }
            Err(_) => {
                return Err(Error::new(
                    ErrorCode::SchemaInvalid,
                    format!("schema {id:?} could not be compiled: the schema compiler panicked"),
                )
                .with_hint(hint));
            }
        };
        Ok(Self {
            id: id.to_owned(),
            validator,
        })
    }

    /// The schema id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Every problem `value` has against the schema: its instance path as a JSON Pointer (`""`
    /// for the document) and a message (cut to 1 KiB). Sorted by path, then message, without
    /// duplicates, so replays compare equal. Empty means valid.
    pub fn validate(&self, value: &Value) -> Vec<ValidationIssue> {
        let mut issues: Vec<ValidationIssue> = self
            .validator
            .iter_errors(value)
            .map(|err| ValidationIssue {
                instance_path: err.instance_path().as_str().to_owned(),
                message: bounded_message(err.to_string()),
            })
            .collect();
        issues.sort_by(|a, b| {
            (a.instance_path.as_str(), a.message.as_str())
                .cmp(&(b.instance_path.as_str(), b.message.as_str()))
        });
        issues.dedup();
        issues
    }
}

fn bounded_message(mut message: String) -> String {
    if message.len() > MAX_ISSUE_MESSAGE_BYTES {
        let mut end = MAX_ISSUE_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

// ---------------------------------------------------------------------------------------------
// Inspection
// ---------------------------------------------------------------------------------------------

/// Reads, hashes, parses and validates the artifact at `location`.
///
/// Confinement is checked again first: the file must still be a regular file inside the
/// worktree after symlink resolution, else [`ErrorCode::ArtifactOutsideWorktree`]. Content
/// problems are a verdict, not an error: bytes that are not UTF-8 or not JSON give one issue at
/// `""` whose message starts with `artifact is not valid JSON:` and says where; a file larger
/// than `max_bytes` gives one issue saying so, is hashed without being held in memory, and has
/// no `content`. Reading failures are [`ErrorCode::WorkspacePermissions`].
///
/// This is blocking file IO; call it from `tokio::task::spawn_blocking` in async code.
pub fn inspect(
    location: &ArtifactLocation,
    schema: &CompiledSchema,
    max_bytes: u64,
) -> Result<NewArtifact> {
    let path = location.confined_regular_file()?;
    let read = read_bounded(&path, max_bytes)
        .map_err(|err| io_failure("cannot read artifact", &path, err))?;
    let (content, errors) = match read.bytes {
        None => (
            None,
            vec![ValidationIssue {
                instance_path: String::new(),
                message: format!(
                    "artifact is {} bytes, larger than the {max_bytes}-byte cap",
                    read.size
                ),
            }],
        ),
        Some(bytes) => match parse_json(&bytes) {
            Ok(value) => {
                let errors = schema.validate(&value);
                (Some(value), errors)
            }
            Err(issue) => (None, vec![issue]),
        },
    };
    Ok(NewArtifact {
        path: location.path_string(),
        hash: read.hash,
        schema_id: schema.id().to_owned(),
        size: read.size,
        content,
        errors,
    })
}

struct BoundedRead {
    hash: ContentHash,
    size: u64,
    /// The bytes, unless there were more than the cap.
    bytes: Option<Vec<u8>>,
}

/// Hashes the whole file while keeping at most `max_bytes` of it; the size counted is what was
/// read, so a file still growing is judged by the bytes actually hashed.
fn read_bounded(path: &Path, max_bytes: u64) -> io::Result<BoundedRead> {
    let mut file = File::open(path)?;
    let expected = file.metadata()?.len().min(max_bytes);
    let mut kept = Some(Vec::with_capacity(usize::try_from(expected).unwrap_or(0)));
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        let chunk = &buffer[..n];
        hasher.update(chunk);
        size += n as u64;
        if size > max_bytes {
            kept = None;
        } else if let Some(bytes) = &mut kept {
            bytes.extend_from_slice(chunk);
        }
    }
    Ok(BoundedRead {
        hash: ContentHash::from_hex(hex::encode(hasher.finalize())),
        size,
        bytes: kept,
    })
}

fn parse_json(bytes: &[u8]) -> std::result::Result<Value, ValidationIssue> {
    let not_json = |why: String| ValidationIssue {
        instance_path: String::new(),
        message: format!("artifact is not valid JSON: {why}"),
    };
    let text = std::str::from_utf8(bytes).map_err(|err| {
        let valid = &bytes[..err.valid_up_to()];
        // `valid` is UTF-8 by construction; count lines and characters like serde_json does.
        let valid = std::str::from_utf8(valid).unwrap_or_default();
        let line = valid.matches('\n').count() + 1;
        let column = valid
            .rsplit('\n')
            .next()
            .map_or(0, |tail| tail.chars().count())
            + 1;
        not_json(format!(
            "byte {} is not UTF-8 at line {line} column {column}",
            err.valid_up_to()
        ))
    })?;
    serde_json::from_str(text).map_err(|err| not_json(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;
    use std::time::Duration;

    use serde_json::json;

    fn worktree() -> tempfile::TempDir {
        tempfile::tempdir().expect("temporary worktree")
    }

    fn refused(result: Result<ArtifactLocation>) -> Error {
        match result {
            Ok(location) => panic!("expected a refusal, got {location:?}"),
            Err(err) => err,
        }
    }

    fn quick(timeout_ms: u64) -> WaitOptions {
        WaitOptions {
            timeout: Duration::from_millis(timeout_ms),
            ..WaitOptions::default()
        }
    }

    // --- confinement -------------------------------------------------------------------------

    #[test]
    fn resolves_a_nested_file_that_does_not_exist_yet() {
        let wt = worktree();
        let location = ArtifactLocation::resolve(wt.path(), "phaseflow/deep/plan.json").unwrap();
        let root = fs::canonicalize(wt.path()).unwrap();
        assert_eq!(location.worktree(), root);
        assert_eq!(location.path(), root.join("phaseflow/deep/plan.json"));
        assert_eq!(location.relative(), "phaseflow/deep/plan.json");
        assert_eq!(
            location.path_string(),
            root.join("phaseflow/deep/plan.json").to_string_lossy()
        );
        assert_eq!(location.signature().unwrap(), None);
    }

    #[test]
    fn dot_dot_that_stays_inside_is_normalised() {
        let wt = worktree();
        let location = ArtifactLocation::resolve(wt.path(), "a/../b/./plan.json").unwrap();
        assert_eq!(
            location.path(),
            fs::canonicalize(wt.path()).unwrap().join("b/plan.json")
        );
    }

    #[test]
    fn dot_dot_that_escapes_is_refused() {
        let wt = worktree();
        let err = refused(ArtifactLocation::resolve(wt.path(), "a/../../plan.json"));
        assert_eq!(err.code(), ErrorCode::ArtifactOutsideWorktree);
        assert!(err.message().contains("`..` leaves the worktree"), "{err}");
        assert!(err.message().contains("a/../../plan.json"), "{err}");
        assert!(err.hint().is_some());
    }

    #[test]
    fn absolute_empty_and_directory_paths_are_refused() {
        let wt = worktree();
        for (relative, why) in [
            ("/etc/passwd", "absolute"),
            ("", "empty"),
            (".", "worktree itself"),
            ("a/..", "worktree itself"),
            ("phaseflow/", "names a directory"),
            ("a\0b", "NUL"),
        ] {
            let err = refused(ArtifactLocation::resolve(wt.path(), relative));
            assert_eq!(
                err.code(),
                ErrorCode::ArtifactOutsideWorktree,
                "{relative:?}"
            );
            assert!(err.message().contains(why), "{relative:?}: {err}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_parent_directory_pointing_outside_is_refused() {
        let wt = worktree();
        let elsewhere = worktree();
        std::os::unix::fs::symlink(elsewhere.path(), wt.path().join("phaseflow")).unwrap();
        let err = refused(ArtifactLocation::resolve(wt.path(), "phaseflow/plan.json"));
        assert_eq!(err.code(), ErrorCode::ArtifactOutsideWorktree);
        assert!(err.message().contains("outside the worktree"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_artifact_file_pointing_outside_is_refused_even_when_dangling() {
        let wt = worktree();
        let elsewhere = worktree();
        fs::write(elsewhere.path().join("secret.json"), "{}").unwrap();
        std::os::unix::fs::symlink(
            elsewhere.path().join("secret.json"),
            wt.path().join("plan.json"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            elsewhere.path().join("missing/new.json"),
            wt.path().join("later.json"),
        )
        .unwrap();
        for relative in ["plan.json", "later.json"] {
            let err = refused(ArtifactLocation::resolve(wt.path(), relative));
            assert_eq!(err.code(), ErrorCode::ArtifactOutsideWorktree, "{relative}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn symlink_inside_the_worktree_resolves_to_its_target() {
        let wt = worktree();
        fs::create_dir(wt.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", wt.path().join("alias")).unwrap();
        let location = ArtifactLocation::resolve(wt.path(), "alias/plan.json").unwrap();
        assert_eq!(
            location.path(),
            fs::canonicalize(wt.path()).unwrap().join("real/plan.json")
        );
    }

    #[test]
    fn missing_worktree_is_a_workspace_error() {
        let wt = worktree();
        let err = refused(ArtifactLocation::resolve(
            &wt.path().join("nope"),
            "plan.json",
        ));
        assert_eq!(err.code(), ErrorCode::WorkspacePermissions);
        assert!(err.hint().unwrap().contains("worktree"), "{err}");
    }

    #[test]
    fn prepare_parent_creates_the_directories() {
        let wt = worktree();
        let location = ArtifactLocation::resolve(wt.path(), "phaseflow/deep/plan.json").unwrap();
        location.prepare_parent().unwrap();
        assert!(wt.path().join("phaseflow/deep").is_dir());
        location.prepare_parent().unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn prepare_parent_refuses_a_symlink_that_appeared_after_resolving() {
        let wt = worktree();
        let elsewhere = worktree();
        let location = ArtifactLocation::resolve(wt.path(), "phaseflow/deep/plan.json").unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), wt.path().join("phaseflow")).unwrap();
        let err = location.prepare_parent().unwrap_err();
        assert_eq!(err.code(), ErrorCode::ArtifactOutsideWorktree);
        assert!(!elsewhere.path().join("deep").exists(), "created outside");
    }

    #[test]
    fn remove_stale_removes_the_file_and_accepts_a_missing_one() {
        let wt = worktree();
        let location = ArtifactLocation::resolve(wt.path(), "phaseflow/plan.json").unwrap();
        location.remove_stale().unwrap();
        location.prepare_parent().unwrap();
        fs::write(location.path(), "{}").unwrap();
        location.remove_stale().unwrap();
        assert!(!location.path().exists());
        location.remove_stale().unwrap();
    }

    #[test]
    fn remove_stale_refuses_to_remove_a_directory() {
        let wt = worktree();
        let location = ArtifactLocation::resolve(wt.path(), "plan.json").unwrap();
        fs::create_dir(location.path()).unwrap();
        let err = location.remove_stale().unwrap_err();
        assert_eq!(err.code(), ErrorCode::WorkspacePermissions);
        assert!(err.message().contains("directory"), "{err}");
        assert!(location.path().is_dir());
    }

    #[cfg(unix)]
    #[test]
    fn remove_stale_removes_a_planted_symlink_but_never_its_outside_target() {
        let wt = worktree();
        let elsewhere = worktree();
        let victim = elsewhere.path().join("victim.json");
        fs::write(&victim, "keep me").unwrap();
        let location = ArtifactLocation::resolve(wt.path(), "plan.json").unwrap();
        std::os::unix::fs::symlink(&victim, location.path()).unwrap();
        location.remove_stale().unwrap();
        assert!(fs::symlink_metadata(location.path()).is_err());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep me");
    }

    #[cfg(unix)]
    #[test]
    fn remove_stale_refuses_when_the_directory_now_leads_outside() {
        let wt = worktree();
        let elsewhere = worktree();
        let victim = elsewhere.path().join("plan.json");
        fs::write(&victim, "keep me").unwrap();
        let location = ArtifactLocation::resolve(wt.path(), "phaseflow/plan.json").unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), wt.path().join("phaseflow")).unwrap();
        let err = location.remove_stale().unwrap_err();
        assert_eq!(err.code(), ErrorCode::ArtifactOutsideWorktree);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep me");
    }

    #[test]
    fn signature_changes_when_the_file_is_rewritten() {
        let wt = worktree();
        let location = ArtifactLocation::resolve(wt.path(), "plan.json").unwrap();
        fs::write(location.path(), "{}").unwrap();
        let first = location.signature().unwrap().unwrap();
        assert_eq!(location.signature().unwrap(), Some(first.clone()));
        fs::write(location.path(), "{ }").unwrap();
        assert_ne!(location.signature().unwrap(), Some(first));
    }

    // --- waiting -------------------------------------------------------------------------------

    fn prepared(wt: &tempfile::TempDir, relative: &str) -> ArtifactLocation {
        let location = ArtifactLocation::resolve(wt.path(), relative).unwrap();
        location.prepare_parent().unwrap();
        location
    }

    #[tokio::test]
    async fn wait_detects_a_new_file() {
        let wt = worktree();
        let location = prepared(&wt, "phaseflow/plan.json");
        let path = location.path().to_owned();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            fs::write(path, r#"{"ok":true}"#).unwrap();
        });
        let outcome = wait_for(&location, None, &quick(10_000)).await.unwrap();
        writer.await.unwrap();
        assert_eq!(outcome, WaitOutcome::Ready);
        let text = fs::read_to_string(location.path()).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"ok": true})
        );
    }

    #[tokio::test]
    async fn wait_times_out_without_a_file() {
        let wt = worktree();
        let location = prepared(&wt, "plan.json");
        let outcome = wait_for(&location, None, &quick(150)).await.unwrap();
        assert_eq!(outcome, WaitOutcome::TimedOut);
    }

    #[tokio::test]
    async fn wait_ignores_the_baseline_file_until_it_changes() {
        let wt = worktree();
        let location = prepared(&wt, "plan.json");
        fs::write(location.path(), r#"{"v":1}"#).unwrap();
        let baseline = location.signature().unwrap();
        let options = WaitOptions {
            quiet_window: Duration::from_millis(20),
            ..quick(300)
        };
        let outcome = wait_for(&location, baseline.as_ref(), &options)
            .await
            .unwrap();
        assert_eq!(outcome, WaitOutcome::TimedOut);

        let path = location.path().to_owned();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            fs::write(path, r#"{"v":2}"#).unwrap();
        });
        let options = WaitOptions {
            timeout: Duration::from_secs(10),
            ..options
        };
        let outcome = wait_for(&location, baseline.as_ref(), &options)
            .await
            .unwrap();
        writer.await.unwrap();
        assert_eq!(outcome, WaitOutcome::Ready);
        assert_eq!(fs::read_to_string(location.path()).unwrap(), r#"{"v":2}"#);
    }

    #[tokio::test]
    async fn a_rewrite_with_identical_bytes_after_arming_counts_as_new() {
        let wt = worktree();
        let location = prepared(&wt, "plan.json");
        fs::write(location.path(), "{}").unwrap();
        let baseline = location.signature().unwrap();
        let mut watch = ArtifactWatch::arm(&location, baseline.as_ref());
        fs::write(location.path(), "{}").unwrap();
        let outcome = watch.wait(&quick(10_000)).await.unwrap();
        assert_eq!(outcome, WaitOutcome::Ready);
    }

    /// Writes `chunks` with pauses in between, keeping the file open, the way a slow agent does.
    /// With `peek`, the partial file is also opened, read and closed between chunks, the way an
    /// agent double-checking its own output would.
    fn write_slowly(path: PathBuf, chunks: Vec<String>, pause: Duration, peek: bool) {
        let mut file = File::create(&path).unwrap();
        // The empty file exists for a while before the first byte arrives.
        std::thread::sleep(pause);
        for chunk in chunks {
            file.write_all(chunk.as_bytes()).unwrap();
            file.flush().unwrap();
            if peek {
                fs::read(&path).unwrap();
            }
            std::thread::sleep(pause);
        }
    }

    fn chunked_document() -> (Vec<String>, Value) {
        let chunks = vec![
            "{\"steps\": [".to_owned(),
            "\"one\", ".to_owned(),
            "\"two\", ".to_owned(),
            "\"three\"".to_owned(),
            "]}".to_owned(),
        ];
        (chunks, json!({"steps": ["one", "two", "three"]}))
    }

    #[tokio::test]
    async fn wait_reports_a_slow_chunked_write_only_once_complete() {
        let wt = worktree();
        let location = prepared(&wt, "plan.json");
        let (chunks, expected) = chunked_document();
        let mut watch = ArtifactWatch::arm(&location, None);
        let path = location.path().to_owned();
        let writer = tokio::task::spawn_blocking(move || {
            write_slowly(path, chunks, Duration::from_millis(100), false);
        });
        let outcome = watch.wait(&quick(10_000)).await.unwrap();
        assert_eq!(outcome, WaitOutcome::Ready);
        let text = fs::read_to_string(location.path()).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), expected);
        writer.await.unwrap();
    }

    /// With inotify the close after writing, not a quiet window, decides: even a quiet window far
    /// shorter than the pauses between chunks, and a reader opening and closing the file
    /// meanwhile, do not get the half-written file reported.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn close_events_decide_completion_whatever_the_quiet_window() {
        let wt = worktree();
        let location = prepared(&wt, "plan.json");
        let (chunks, expected) = chunked_document();
        let mut watch = ArtifactWatch::arm(&location, None);
        let path = location.path().to_owned();
        let writer = tokio::task::spawn_blocking(move || {
            write_slowly(path, chunks, Duration::from_millis(100), true);
        });
        let options = WaitOptions {
            quiet_window: Duration::from_millis(10),
            poll_interval: Duration::from_millis(5),
            ..quick(10_000)
        };
        let outcome = watch.wait(&options).await.unwrap();
        assert_eq!(outcome, WaitOutcome::Ready);
        let text = fs::read_to_string(location.path()).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), expected);
        writer.await.unwrap();
    }

    /// A file published with a hard link is never opened under its name, so no close follows.
    #[cfg(unix)]
    #[tokio::test]
    async fn wait_detects_a_hard_link_into_place() {
        let wt = worktree();
        let location = prepared(&wt, "plan.json");
        let staging = location.path().with_file_name("plan.json.tmp");
        fs::write(&staging, r#"{"linked":true}"#).unwrap();
        let mut watch = ArtifactWatch::arm(&location, None);
        fs::hard_link(&staging, location.path()).unwrap();
        let options = WaitOptions {
            quiet_window: Duration::from_secs(3600),
            ..quick(10_000)
        };
        assert_eq!(watch.wait(&options).await.unwrap(), WaitOutcome::Ready);
    }

    #[test]
    fn completion_follows_writes_closes_and_the_creators_open() {
        let signals = Signals::default();
        let wake = Notify::new();
        let steps = [
            // open(O_CREAT): the creator's open means bytes are coming.
            (Touch::Created, true),
            (Touch::Opened, false),
            (Touch::Modified, false),
            // A reader opening meanwhile changes nothing.
            (Touch::Opened, false),
            (Touch::Unrelated, false),
            (Touch::Modified, false),
            (Touch::ClosedAfterWriting, true),
            (Touch::Opened, true),
            // A hard link: created, never opened under this name.
            (Touch::Gone, true),
            (Touch::Created, true),
            (Touch::Unrelated, true),
            (Touch::Modified, false),
            (Touch::Replaced, true),
        ];
        for (n, (touch, completed)) in steps.into_iter().enumerate() {
            signals.record(touch, &wake);
            assert_eq!(signals.completed(), completed, "after step {n}: {touch:?}");
        }
        let writes = signals.writes.load(Ordering::SeqCst);
        signals.record(Touch::Replaced, &wake);
        assert_eq!(
            signals.writes.load(Ordering::SeqCst),
            writes,
            "a repeated rename is no news"
        );
        signals.record(Touch::Gone, &wake);
        assert_eq!(signals.writes.load(Ordering::SeqCst), writes + 1);
    }

    /// Far more concurrent waits than a user's inotify instances (128 by default) all complete
    /// through notifications: the quiet window is out of reach within the timeout.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_waits_share_one_watcher() {
        let wt = worktree();
        let options = WaitOptions {
            quiet_window: Duration::from_secs(3600),
            ..quick(30_000)
        };
        let mut waits = Vec::new();
        let mut locations = Vec::new();
        for n in 0..300 {
            let location = prepared(&wt, &format!("run-{n}/plan.json"));
            let mut watch = ArtifactWatch::arm(&location, None);
            let options = options.clone();
            waits.push(tokio::spawn(async move { watch.wait(&options).await }));
            locations.push(location);
        }
        for location in &locations {
            fs::write(location.path(), "{}").unwrap();
        }
        for wait in waits {
            assert_eq!(wait.await.unwrap().unwrap(), WaitOutcome::Ready);
        }
    }

    #[tokio::test]
    async fn wait_detects_a_rename_into_place() {
        let wt = worktree();
        let location = prepared(&wt, "phaseflow/plan.json");
        let staging = location.path().with_file_name("plan.json.tmp");
        let target = location.path().to_owned();
        let writer = tokio::spawn(async move {
            fs::write(&staging, r#"{"renamed":true}"#).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            fs::rename(&staging, &target).unwrap();
        });
        let outcome = wait_for(&location, None, &quick(10_000)).await.unwrap();
        writer.await.unwrap();
        assert_eq!(outcome, WaitOutcome::Ready);
        let text = fs::read_to_string(location.path()).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"renamed": true})
        );
    }

    #[tokio::test]
    async fn a_file_finished_before_the_wait_is_found_by_the_quiet_window() {
        let wt = worktree();
        let location = prepared(&wt, "plan.json");
        fs::write(location.path(), "{}").unwrap();
        let options = WaitOptions {
            quiet_window: Duration::from_millis(30),
            ..quick(10_000)
        };
        let outcome = wait_for(&location, None, &options).await.unwrap();
        assert_eq!(outcome, WaitOutcome::Ready);
    }

    #[tokio::test]
    async fn wait_follows_a_directory_the_agent_creates_later() {
        let wt = worktree();
        let location = ArtifactLocation::resolve(wt.path(), "phaseflow/plan.json").unwrap();
        let mut watch = ArtifactWatch::arm(&location, None);
        let dir = wt.path().join("phaseflow");
        let path = location.path().to_owned();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            fs::create_dir(&dir).unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
            fs::write(path, r#"{"late":true}"#).unwrap();
        });
        let outcome = watch.wait(&quick(10_000)).await.unwrap();
        writer.await.unwrap();
        assert_eq!(outcome, WaitOutcome::Ready);
        let text = fs::read_to_string(location.path()).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"late": true})
        );
    }

    #[tokio::test]
    async fn wait_survives_the_directory_being_replaced() {
        let wt = worktree();
        let location = prepared(&wt, "phaseflow/plan.json");
        let mut watch = ArtifactWatch::arm(&location, None);
        let dir = location.path().parent().unwrap().to_owned();
        let path = location.path().to_owned();
        let writer = tokio::spawn(async move {
            fs::write(&path, "{\"half\":").unwrap();
            fs::remove_dir_all(&dir).unwrap();
            fs::create_dir(&dir).unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
            fs::write(&path, r#"{"whole":true}"#).unwrap();
        });
        let outcome = watch.wait(&quick(10_000)).await.unwrap();
        writer.await.unwrap();
        assert_eq!(outcome, WaitOutcome::Ready);
        let text = fs::read_to_string(location.path()).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"whole": true})
        );
    }

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        paths.iter().fold(notify::Event::new(kind), |event, path| {
            event.add_path(PathBuf::from(path))
        })
    }

    #[test]
    fn notifications_are_classified_for_the_artifact() {
        use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind};
        let dir = Path::new("/wt/phaseflow");
        let file = Path::new("/wt/phaseflow/plan.json");
        let ours = "/wt/phaseflow/plan.json";
        let tmp = "/wt/phaseflow/plan.json.tmp";
        let cases = [
            (
                EventKind::Create(CreateKind::File),
                vec![ours],
                Touch::Created,
            ),
            (
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                vec![ours],
                Touch::Opened,
            ),
            (
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                vec![ours],
                Touch::Modified,
            ),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                vec![ours],
                Touch::ClosedAfterWriting,
            ),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                vec![ours],
                Touch::Unrelated,
            ),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                vec![tmp],
                Touch::Unrelated,
            ),
            (
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                vec![tmp],
                Touch::Unrelated,
            ),
            (
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
                vec![ours],
                Touch::Unrelated,
            ),
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                vec![ours],
                Touch::Replaced,
            ),
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                vec![tmp, ours],
                Touch::Replaced,
            ),
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                vec![ours, tmp],
                Touch::Gone,
            ),
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::From)),
                vec![ours],
                Touch::Gone,
            ),
            (EventKind::Remove(RemoveKind::File), vec![ours], Touch::Gone),
            (
                EventKind::Remove(RemoveKind::Folder),
                vec!["/wt/phaseflow"],
                Touch::WatchLost,
            ),
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::From)),
                vec!["/wt/phaseflow"],
                Touch::WatchLost,
            ),
        ];
        for (kind, paths, expected) in cases {
            assert_eq!(
                classify(&event(kind, &paths), dir, file),
                expected,
                "{kind:?} {paths:?}"
            );
        }
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(classify(&overflow, dir, file), Touch::WatchLost);
    }

    // --- schemas -----------------------------------------------------------------------------

    const PLAN_SCHEMA: &str = r#"{
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["title", "steps"],
        "properties": {
            "title": {"type": "string"},
            "steps": {"type": "array", "items": {"type": "string"}}
        }
    }"#;

    fn plan_schema() -> CompiledSchema {
        CompiledSchema::compile("plan", PLAN_SCHEMA).unwrap()
    }

    #[test]
    fn schema_that_is_not_json_is_refused() {
        let err = CompiledSchema::compile("plan", "{not json").unwrap_err();
        assert_eq!(err.code(), ErrorCode::SchemaInvalid);
        assert!(err.message().contains("\"plan\""), "{err}");
        assert!(err.message().contains("not JSON"), "{err}");
        assert!(err.message().contains("line 1"), "{err}");
        assert!(err.hint().is_some());
    }

    #[test]
    fn invalid_schema_is_refused() {
        for text in [
            r#"{"type": 12}"#,
            r#"{"minimum": "five"}"#,
            r#"{"$ref": "file:///etc/passwd"}"#,
        ] {
            let err = CompiledSchema::compile("impl", text).unwrap_err();
            assert_eq!(err.code(), ErrorCode::SchemaInvalid, "{text}");
            assert!(err.message().contains("\"impl\""), "{err}");
        }
    }

    #[test]
    fn compiled_schema_keeps_its_id_and_hides_the_validator_in_debug() {
        let schema = plan_schema();
        assert_eq!(schema.id(), "plan");
        assert!(format!("{schema:?}").contains("plan"));
    }

    #[test]
    fn validate_reports_every_error_with_its_instance_path_in_order() {
        let schema = plan_schema();
        let issues = schema.validate(&json!({"title": 7, "steps": ["a", 2, 3]}));
        let paths: Vec<&str> = issues.iter().map(|i| i.instance_path.as_str()).collect();
        assert_eq!(paths, ["/steps/1", "/steps/2", "/title"]);
        assert!(issues[2].message.contains("string"), "{issues:?}");

        let issues = schema.validate(&json!({}));
        assert_eq!(issues.len(), 2, "{issues:?}");
        assert!(issues.iter().all(|i| i.instance_path.is_empty()));
        assert!(issues[0].message.contains("steps"), "{issues:?}");
        assert!(issues[1].message.contains("title"), "{issues:?}");

        assert!(
            schema
                .validate(&json!({"title": "t", "steps": []}))
                .is_empty()
        );
    }

    #[test]
    fn huge_values_do_not_make_huge_messages() {
        let schema = CompiledSchema::compile("s", r#"{"type": "array"}"#).unwrap();
        let issues = schema.validate(&json!({ "text": "x".repeat(100_000) }));
        assert_eq!(issues.len(), 1);
        assert!(issues[0].message.len() <= MAX_ISSUE_MESSAGE_BYTES + '…'.len_utf8());
    }

    // --- inspection --------------------------------------------------------------------------

    fn artifact_with(bytes: &[u8]) -> (tempfile::TempDir, ArtifactLocation) {
        let wt = worktree();
        let location = prepared(&wt, "phaseflow/plan.json");
        fs::write(location.path(), bytes).unwrap();
        (wt, location)
    }

    #[test]
    fn inspect_a_valid_artifact() {
        let bytes = br#"{"title": "Plan", "steps": ["a"]}"#;
        let (_wt, location) = artifact_with(bytes);
        let verdict = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap();
        assert!(verdict.is_valid(), "{:?}", verdict.errors);
        assert_eq!(verdict.path, location.path_string());
        assert_eq!(verdict.hash, ContentHash::of(bytes));
        assert_eq!(verdict.schema_id, "plan");
        assert_eq!(verdict.size, bytes.len() as u64);
        assert_eq!(
            verdict.content,
            Some(json!({"title": "Plan", "steps": ["a"]}))
        );
    }

    #[test]
    fn inspect_reports_schema_errors_with_the_content() {
        let (_wt, location) = artifact_with(br#"{"title": 1}"#);
        let verdict = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap();
        let paths: Vec<&str> = verdict
            .errors
            .iter()
            .map(|i| i.instance_path.as_str())
            .collect();
        assert_eq!(paths, ["", "/title"]);
        assert_eq!(verdict.content, Some(json!({"title": 1})));
    }

    #[test]
    fn inspect_invalid_json_is_a_verdict_not_an_error() {
        let bytes = b"{\"title\": \"Plan\",\n  \"steps\": [}";
        let (_wt, location) = artifact_with(bytes);
        let verdict = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap();
        assert_eq!(verdict.errors.len(), 1);
        assert_eq!(verdict.errors[0].instance_path, "");
        let message = &verdict.errors[0].message;
        assert!(
            message.starts_with("artifact is not valid JSON: "),
            "{message}"
        );
        assert!(message.contains("line 2 column"), "{message}");
        assert_eq!(verdict.content, None);
        assert_eq!(verdict.hash, ContentHash::of(bytes));
        assert_eq!(verdict.size, bytes.len() as u64);
    }

    #[test]
    fn inspect_non_utf8_bytes_is_a_verdict_not_an_error() {
        let bytes = b"{\"title\":\n \"caf\xe9\"}";
        let (_wt, location) = artifact_with(bytes);
        let verdict = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap();
        assert_eq!(verdict.errors.len(), 1);
        let message = &verdict.errors[0].message;
        assert!(
            message.starts_with("artifact is not valid JSON: "),
            "{message}"
        );
        assert!(
            message.contains("not UTF-8 at line 2 column 6"),
            "{message}"
        );
        assert_eq!(verdict.content, None);
        assert_eq!(verdict.hash, ContentHash::of(bytes));
    }

    #[test]
    fn inspect_oversize_file_is_a_verdict_and_still_hashed() {
        let bytes = format!("[{}1]", "1,".repeat(600));
        let (_wt, location) = artifact_with(bytes.as_bytes());
        let verdict = inspect(&location, &plan_schema(), 1000).unwrap();
        assert_eq!(verdict.content, None);
        assert_eq!(verdict.size, bytes.len() as u64);
        assert_eq!(verdict.hash, ContentHash::of(bytes.as_bytes()));
        assert_eq!(
            verdict.errors,
            vec![ValidationIssue {
                instance_path: String::new(),
                message: format!(
                    "artifact is {} bytes, larger than the 1000-byte cap",
                    bytes.len()
                ),
            }]
        );
        let at_cap = inspect(&location, &plan_schema(), bytes.len() as u64).unwrap();
        assert!(at_cap.content.is_some());
    }

    #[test]
    fn inspect_a_missing_file_is_a_workspace_error() {
        let wt = worktree();
        let location = prepared(&wt, "plan.json");
        let err = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap_err();
        assert_eq!(err.code(), ErrorCode::WorkspacePermissions);
        assert!(err.hint().unwrap().contains("plan.json"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn inspect_refuses_an_artifact_swapped_for_a_symlink_to_outside() {
        let wt = worktree();
        let elsewhere = worktree();
        let secret = elsewhere.path().join("secret.json");
        fs::write(&secret, r#"{"title": "secret", "steps": []}"#).unwrap();
        let location = prepared(&wt, "plan.json");
        std::os::unix::fs::symlink(&secret, location.path()).unwrap();
        let err = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ArtifactOutsideWorktree);
    }

    #[test]
    fn inspect_refuses_a_directory() {
        let wt = worktree();
        let location = prepared(&wt, "plan.json");
        fs::create_dir(location.path()).unwrap();
        let err = inspect(&location, &plan_schema(), DEFAULT_MAX_ARTIFACT_BYTES).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ArtifactOutsideWorktree);
        assert!(err.message().contains("not a regular file"), "{err}");
    }
}
