//! Waiting for an agent to finish writing an artifact: filesystem notifications through one
//! shared watcher and a short confirmation, with polling and a quiet window as the fallback.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher, WatcherKind};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::location::{ArtifactLocation, Signature};
use crate::error::Result;

/// A zero poll interval would spin; this is the floor.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(1);

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
            self.state = match DirectoryWatch::start(&dir, self.location.path(), &self.wake) {
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs::File;
    use std::io::Write;

    use serde_json::{Value, json};

    use crate::artifact::location::tests::{prepared, worktree};

    fn quick(timeout_ms: u64) -> WaitOptions {
        WaitOptions {
            timeout: Duration::from_millis(timeout_ms),
            ..WaitOptions::default()
        }
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
}
