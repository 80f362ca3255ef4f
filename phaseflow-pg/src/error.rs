//! Mapping sqlx failures onto phaseflow's error codes.

use phaseflow::{Error, ErrorClass, ErrorCode};

/// A failed statement or connection: `store_unavailable` (recoverable) with the cause kept,
/// except for failures that retrying cannot fix.
pub(crate) fn db_error(doing: &str, error: sqlx::Error) -> Error {
    let code = match &error {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::TypeNotFound { .. } => ErrorCode::StoreDecode,
        // 23xxx: a unique/foreign-key/not-null violation. phaseflow checks every such rule under
        // the run's lock before writing, so reaching one means the rows disagree with each other.
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("23")) => {
            ErrorCode::InternalStateCorruption
        }
        _ => ErrorCode::StoreUnavailable,
    };
    let hint = match code {
        ErrorCode::StoreUnavailable => {
            "check that PostgreSQL is reachable; the command wrote nothing and can be retried"
        }
        ErrorCode::StoreDecode => "a row does not hold what phaseflow wrote; inspect it",
        _ => {
            "the store holds state phaseflow did not write this way; inspect the run's rows before touching them"
        }
    };
    let class = code.default_class();
    Error::new(code, format!("{doing}: {error}"))
        .with_class(if class == ErrorClass::Recoverable {
            ErrorClass::Recoverable
        } else {
            class
        })
        .with_hint(hint)
        .with_source(error)
}
