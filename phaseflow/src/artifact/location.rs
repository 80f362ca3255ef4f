//! Where an artifact lives: the declared path confined to the run's worktree, symlinks included,
//! and the [`Signature`] that tells one version of the file from the next.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, ErrorCode, Result};

/// Symlinks followed while resolving one path before giving up (Linux's own limit).
const MAX_SYMLINK_HOPS: u32 = 40;

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

    pub(super) fn parent(&self) -> &Path {
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
    pub(super) fn confined_regular_file(&self) -> Result<PathBuf> {
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

pub(super) fn io_failure(what: impl fmt::Display, path: &Path, err: io::Error) -> Error {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::artifact) fn worktree() -> tempfile::TempDir {
        tempfile::tempdir().expect("temporary worktree")
    }

    /// A location in `wt` whose directories already exist.
    pub(in crate::artifact) fn prepared(
        wt: &tempfile::TempDir,
        relative: &str,
    ) -> ArtifactLocation {
        let location = ArtifactLocation::resolve(wt.path(), relative).unwrap();
        location.prepare_parent().unwrap();
        location
    }

    fn refused(result: Result<ArtifactLocation>) -> Error {
        match result {
            Ok(location) => panic!("expected a refusal, got {location:?}"),
            Err(err) => err,
        }
    }

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
}
