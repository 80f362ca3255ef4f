//! The `schema = "..."` file: where it is, that it is JSON, and that it compiles as a JSON Schema.
//!
//! Resolution rules (documented on `#[derive(Phase)]`):
//! - an absolute path is used as is;
//! - a path starting with `./` or `../` is relative to the directory of the source file that
//!   contains the derive, like `include_str!` (this also works where `CARGO_MANIFEST_DIR` is not
//!   the crate you are editing, such as trybuild's generated test crates);
//! - any other path is relative to `CARGO_MANIFEST_DIR`, the directory of the `Cargo.toml` of the
//!   crate using the derive.

use std::path::{Component, Path, PathBuf};

use serde_json::Value;

/// Where the compiler is: what a relative schema path is resolved against.
pub(crate) struct Env {
    /// `CARGO_MANIFEST_DIR` of the crate being compiled.
    pub(crate) manifest_dir: Option<PathBuf>,
    /// The source file that contains the derive, when the compiler knows it.
    pub(crate) source_file: Option<PathBuf>,
}

/// A schema file that exists, is JSON and compiles as a JSON Schema.
#[derive(Debug)]
pub(crate) struct SchemaFile {
    /// Absolute path, embedded with `include_str!` so that editing the file rebuilds the crate.
    pub(crate) path: String,
    /// The schema's `$id` when it is a string, else its file name.
    pub(crate) id: String,
}

/// Reads and checks the schema written as `written`. The error is a sentence for the user.
pub(crate) fn load(written: &str, env: &Env) -> Result<SchemaFile, String> {
    if written.is_empty() {
        return Err("`schema` must not be empty: give the path of the JSON Schema file the artifact is validated against".into());
    }
    let path = resolve(written, env)?;
    let text = match std::fs::read(&path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| {
            format!(
                "schema file `{written}` ({}) is not UTF-8 text",
                path.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "schema file `{written}` not found: no file at `{}` ({})",
                path.display(),
                rule(written),
            ));
        }
        Err(e) => {
            return Err(format!(
                "cannot read schema file `{written}` ({}): {e}",
                path.display()
            ));
        }
    };
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| format!("schema file `{written}` is not valid JSON: {e}"))?;
    if let Err(e) = jsonschema::validator_for(&value) {
        let at = e.instance_path().to_string();
        let location = if at.is_empty() {
            String::new()
        } else {
            format!(" (at `{at}`)")
        };
        return Err(format!(
            "schema file `{written}` is not a valid JSON Schema: {e}{location}"
        ));
    }
    let path_text = path
        .to_str()
        .ok_or_else(|| {
            format!(
                "the path of schema file `{written}` is not UTF-8: {}",
                path.display()
            )
        })?
        .to_owned();
    let id = match value.get("$id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| written.to_owned()),
    };
    Ok(SchemaFile {
        path: path_text,
        id,
    })
}

/// The absolute path a written schema path stands for.
fn resolve(written: &str, env: &Env) -> Result<PathBuf, String> {
    let path = Path::new(written);
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else if is_source_relative(written) {
        let dir = env.source_file.as_deref().and_then(Path::parent).ok_or_else(|| {
            format!(
                "schema `{written}` is relative to the source file (it starts with `.`), but the compiler did not say which file this is; write the path relative to the crate's Cargo.toml instead"
            )
        })?;
        dir.join(path)
    } else {
        let dir = env.manifest_dir.as_deref().ok_or_else(|| {
            format!("schema `{written}` is relative to CARGO_MANIFEST_DIR, which is not set; build with cargo")
        })?;
        dir.join(path)
    };
    // The compiler may name the source file relative to its working directory (the workspace
    // root); `include_str!` would resolve such a path against the source file instead.
    let joined = if joined.is_absolute() {
        joined
    } else {
        std::env::current_dir()
            .map_err(|e| format!("cannot resolve schema `{written}`: no working directory: {e}"))?
            .join(joined)
    };
    Ok(normalize(&joined))
}

fn is_source_relative(written: &str) -> bool {
    ["./", "../", ".\\", "..\\"]
        .iter()
        .any(|p| written.starts_with(p))
}

/// How the path was resolved, for the "not found" message.
fn rule(written: &str) -> &'static str {
    if Path::new(written).is_absolute() {
        "absolute path"
    } else if is_source_relative(written) {
        "paths starting with `./` or `../` are relative to the file containing the derive"
    } else {
        "relative paths are resolved against the directory of the crate's Cargo.toml"
    }
}

/// Removes `.` components and folds `dir/..`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(dir: &Path) -> Env {
        Env {
            manifest_dir: Some(dir.to_path_buf()),
            source_file: Some(dir.join("src/lib.rs")),
        }
    }

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_valid_schema_is_identified_by_its_id_or_file_name() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "schemas/a.json",
            r#"{"$id": "plan.v1", "type": "object"}"#,
        );
        write(dir.path(), "schemas/b.json", r#"{"type": "object"}"#);
        let a = load("schemas/a.json", &env(dir.path())).unwrap();
        assert_eq!(a.id, "plan.v1");
        assert_eq!(Path::new(&a.path), dir.path().join("schemas/a.json"));
        assert_eq!(
            load("schemas/b.json", &env(dir.path())).unwrap().id,
            "b.json"
        );
    }

    #[test]
    fn a_source_file_named_relative_to_the_working_directory_gives_an_absolute_path() {
        // rustc names source files relative to its working directory (the workspace root);
        // the path handed to `include_str!` must not be, or it resolves from the source file.
        let dir = tempfile::tempdir_in(".").unwrap();
        write(dir.path(), "schemas/plan.json", r#"{"type": "object"}"#);
        let relative = dir
            .path()
            .strip_prefix(std::env::current_dir().unwrap())
            .unwrap_or(dir.path());
        let relative = Path::new(".").join(relative.file_name().unwrap());
        let env = Env {
            manifest_dir: None,
            source_file: Some(relative.join("examples/flow.rs")),
        };
        let schema = load("../schemas/plan.json", &env).unwrap();
        assert!(Path::new(&schema.path).is_absolute(), "{}", schema.path);
        assert_eq!(
            std::fs::canonicalize(&schema.path).unwrap(),
            std::fs::canonicalize(dir.path().join("schemas/plan.json")).unwrap()
        );
    }

    #[test]
    fn dot_paths_are_relative_to_the_source_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "src/near.json", r#"{"type": "string"}"#);
        write(dir.path(), "far.json", r#"{"type": "string"}"#);
        let near = load("./near.json", &env(dir.path())).unwrap();
        assert_eq!(Path::new(&near.path), dir.path().join("src/near.json"));
        let far = load("../far.json", &env(dir.path())).unwrap();
        assert_eq!(Path::new(&far.path), dir.path().join("far.json"));
    }

    #[test]
    fn missing_non_json_and_invalid_schemas_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "broken.json", "{ not json");
        write(dir.path(), "bad.json", r#"{"type": 42}"#);
        let missing = load("nope.json", &env(dir.path())).unwrap_err();
        assert!(
            missing.starts_with("schema file `nope.json` not found: no file at `"),
            "{missing}"
        );
        assert!(missing.ends_with(
            "(relative paths are resolved against the directory of the crate's Cargo.toml)"
        ));
        let broken = load("broken.json", &env(dir.path())).unwrap_err();
        assert!(
            broken.starts_with(
                "schema file `broken.json` is not valid JSON: key must be a string at line 1"
            ),
            "{broken}"
        );
        let bad = load("bad.json", &env(dir.path())).unwrap_err();
        assert!(
            bad.starts_with("schema file `bad.json` is not a valid JSON Schema: "),
            "{bad}"
        );
    }

    #[test]
    fn normalize_folds_dots_lexically() {
        assert_eq!(
            normalize(Path::new("/a/b/./../c.json")),
            Path::new("/a/c.json")
        );
        assert_eq!(
            normalize(Path::new("a/../../c.json")),
            Path::new("../c.json")
        );
    }
}
