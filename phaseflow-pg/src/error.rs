//! Mapping sqlx failures onto phaseflow's error codes.

use phaseflow::{Error, ErrorCode};

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
        // Even a failed COMMIT may have committed; every command is idempotent, so a retry
        // either finds its writes recorded or makes them.
        ErrorCode::StoreUnavailable => {
            "check that PostgreSQL is reachable, then retry: store commands are idempotent"
        }
        ErrorCode::StoreDecode => "a row does not hold what phaseflow wrote; inspect it",
        _ => {
            "the store holds state phaseflow did not write this way; inspect the run's rows before touching them"
        }
    };
    Error::new(code, format!("{doing}: {error}"))
        .with_hint(hint)
        .with_source(error)
}

#[cfg(test)]
mod tests {
    use phaseflow::ErrorClass;

    use super::*;

    #[test]
    fn connection_trouble_is_recoverable_and_keeps_its_cause() {
        let error = db_error("locking the run", sqlx::Error::PoolTimedOut);
        assert_eq!(error.code(), ErrorCode::StoreUnavailable);
        assert_eq!(error.class(), ErrorClass::Recoverable);
        assert!(error.message().starts_with("locking the run: "));
        assert!(std::error::Error::source(&error).is_some());
    }

    #[test]
    fn undecodable_columns_are_store_decode() {
        let error = db_error("reading", sqlx::Error::ColumnNotFound("state".into()));
        assert_eq!(error.code(), ErrorCode::StoreDecode);
        assert_eq!(error.class(), ErrorClass::Fatal);
    }
}
