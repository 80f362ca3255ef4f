//! Test support: a fresh, migrated PostgreSQL database per test, on a server that needs no setup.
//!
//! Enabled by the `testing` cargo feature. Typical use in an integration test:
//!
//! ```no_run
//! # async fn demo() {
//! use phaseflow_pg::testing::TestDatabase;
//!
//! let db = TestDatabase::migrated().await; // panics with instructions if no PostgreSQL is found
//! let store = db.store();                  // a `PgStore` on the test's own database
//! let other = db.connect_store().await;    // a second `PgStore` on a second pool
//! # let _ = (store, other);
//! # }
//! ```
//!
//! # Which server
//!
//! - With `DATABASE_URL` set, that server is used. Its user must be allowed to create databases.
//! - Otherwise a throwaway cluster is started from the PostgreSQL binaries found in
//!   `/usr/lib/postgresql/<highest version>/bin` or on `PATH` (`initdb`, `pg_ctl`). Without
//!   either, every test **fails** (never skips) with a message saying how to install one.
//!
//! # The throwaway cluster
//!
//! cargo-nextest runs every test in its own process and `cargo test` runs one process per test
//! binary, so the cluster is shared by all test processes of one user instead of being started
//! per process:
//!
//! - It lives in `$TMPDIR/phaseflow-pg-test-<uid>/cluster`: data directory `data/`, log
//!   `postgres.log`, and a private unix socket directory `sock/`. It listens on that socket only
//!   (`listen_addresses = ''`), so it never competes for a TCP port with anything else on the
//!   machine; the connection URL is `postgres://postgres@localhost/…?host=<sock>&port=5432` (the
//!   `host` parameter, a directory, overrides `localhost`).
//! - It runs with `fsync=off`, `synchronous_commit=off` and `full_page_writes=off`: it is
//!   disposable, and durability against power loss is not what the tests check.
//! - When running as root, `initdb`, `pg_ctl` and the server run as the `postgres` user (via
//!   `runuser`), which owns the `cluster/` directory.
//! - Start-up is serialised by an exclusive `flock` on `setup.lock`: the first process to get it
//!   runs `initdb` if needed and `pg_ctl start`; later ones find the socket answering and reuse
//!   the server. A data directory left by an earlier run is reused, or re-initialised if it was
//!   made by another PostgreSQL major version or does not start.
//! - Every test process holds a *shared* `flock` on `users.lock` for its whole life; the kernel
//!   drops it when the process exits, however it exits. A small watchdog shell loop (started
//!   detached, with `setsid`, next to the server) checks every 5 s; once nobody has held
//!   `users.lock` for three checks in a row it takes `setup.lock`, checks again, stops the
//!   server (`pg_ctl stop -m immediate`) and removes `cluster/`. So the server disappears about
//!   15 s after the last test process ended, even if that process was killed, and a test
//!   process starting meanwhile either reuses it or waits and starts a new one.
//!
//! A cold start (`initdb`, `pg_ctl start`, building the template) takes about 2 s; a test
//! process that finds the cluster running spends about 0.3 s on its database.
//!
//! # One database per test
//!
//! The first process also builds a template database (`phaseflow_tpl_<digest of the
//! migrations>`) with the schema migrated, under an advisory lock. Each [`TestDatabase`] is then a
//! `CREATE DATABASE phaseflow_test_<pid>_<n> TEMPLATE … STRATEGY FILE_COPY` (about 50 ms),
//! and is dropped again when the value is dropped. Databases of test processes that died before
//! dropping theirs are dropped by the next process that starts the throwaway cluster's setup.
//! [`TestDatabase::empty`] gives a database without the schema, for migration tests.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use phaseflow::error::Result;
use phaseflow::event::Event;
use phaseflow::ids::{ApprovalId, PhaseKey, RoleKey, RunId, SessionId};
use phaseflow::store::{
    ApprovalRecord, ArtifactRecord, BeginAttempt, BeginOutcome, Decide, FinishPhase, Finished,
    MarkBusy, NewRun, OperatorAction, PhaseRecord, PhaseWork, RecordPrompt, RecordVerdict,
    RunRecord, SessionEvent, SessionRecord, Store, TranscriptChunk,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, PgPool};
use tokio::sync::OnceCell;

use crate::PgStore;

/// The port the throwaway cluster's unix socket is named after (`.s.PGSQL.5432`). The socket
/// directory is private to the cluster, so a fixed number cannot collide with another server.
const SOCKET_PORT: u16 = 5432;

/// How to get PostgreSQL, said by every setup failure.
const INSTALL_HINT: &str = "phaseflow-pg's tests need PostgreSQL: install the server binaries \
(Debian/Ubuntu: `apt-get install postgresql`; Fedora: `dnf install postgresql-server`; macOS: \
`brew install postgresql`) so that `initdb` and `pg_ctl` are in /usr/lib/postgresql/<version>/bin \
or on PATH, or set DATABASE_URL to a server whose user may create databases";

/// A PostgreSQL server the tests can create databases on.
#[derive(Debug)]
struct Server {
    /// Connection options for the server's maintenance database (`postgres`).
    admin: PgConnectOptions,
    /// The same, as a URL without the database name's path segment filled in by callers.
    url_base: UrlBase,
    /// The migrated template each [`TestDatabase::migrated`] copies.
    template: String,
    /// `STRATEGY FILE_COPY` for `CREATE DATABASE` (PostgreSQL 15+): with a small template it is
    /// several times faster than the default, which writes the whole copy to the WAL.
    create_suffix: &'static str,
    /// Our shared lock on `users.lock`, held for the life of the process (see module docs).
    _users_lock: Option<File>,
}

/// How to build the URL of one database on the server.
#[derive(Debug, Clone)]
enum UrlBase {
    /// `DATABASE_URL`, with the database name replaced.
    External(String),
    /// The throwaway cluster's socket directory.
    Socket(PathBuf),
}

impl UrlBase {
    fn url_for(&self, database: &str) -> String {
        match self {
            UrlBase::Socket(dir) => format!(
                "postgres://postgres@localhost/{database}?host={}&port={SOCKET_PORT}",
                dir.display()
            ),
            UrlBase::External(url) => replace_database(url, database),
        }
    }
}

/// Replaces the database name (the path) of a `postgres://` URL, keeping its query string.
fn replace_database(url: &str, database: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let authority_start = head.find("://").map_or(0, |i| i + 3);
    let base = match head[authority_start..].find('/') {
        Some(slash) => &head[..authority_start + slash],
        None => head,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

static SERVER: OnceCell<Result<Server, String>> = OnceCell::const_new();
static NEXT_DATABASE: AtomicU64 = AtomicU64::new(0);

async fn server() -> &'static Server {
    let server = SERVER.get_or_init(|| async { set_up_server().await }).await;
    match server {
        Ok(server) => server,
        Err(message) => panic!("{message}"),
    }
}

async fn set_up_server() -> Result<Server, String> {
    let (url_base, throwaway, users_lock) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => (UrlBase::External(url), false, None),
        _ => {
            let cluster = tokio::task::spawn_blocking(Cluster::ensure)
                .await
                .map_err(|e| format!("starting the test cluster panicked: {e}"))??;
            (
                UrlBase::Socket(cluster.socket_dir),
                true,
                Some(cluster.users_lock),
            )
        }
    };
    let admin_url = url_base.url_for("postgres");
    let admin: PgConnectOptions = admin_url
        .parse()
        .map_err(|e| format!("cannot parse the test server URL `{admin_url}`: {e}"))?;
    let mut conn = PgConnection::connect_with(&admin).await.map_err(|e| {
        format!("cannot connect to the test server at `{admin_url}`: {e}; {INSTALL_HINT}")
    })?;
    if throwaway {
        drop_stale_databases(&mut conn).await?;
    }
    let template = ensure_template(&mut conn, &url_base).await?;
    let version: String = sqlx::query_scalar("SHOW server_version_num")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| format!("cannot read the test server's version: {e}"))?;
    let create_suffix = if version.parse::<u32>().is_ok_and(|v| v >= 150_000) {
        " STRATEGY FILE_COPY"
    } else {
        ""
    };
    let _ = conn.close().await;
    Ok(Server {
        admin,
        url_base,
        template,
        create_suffix,
        _users_lock: users_lock,
    })
}

/// Drops `phaseflow_test_<pid>_<n>` databases whose process is gone (killed before its
/// [`TestDatabase`] was dropped).
async fn drop_stale_databases(conn: &mut PgConnection) -> Result<(), String> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'phaseflow\\_test\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| format!("cannot list test databases: {e}"))?;
    for name in names {
        let pid = name
            .strip_prefix("phaseflow_test_")
            .and_then(|rest| rest.split('_').next());
        let alive = pid.is_some_and(|pid| Path::new("/proc").join(pid).exists());
        if !alive {
            drop_database(conn, &name).await;
        }
    }
    Ok(())
}

/// Builds the migrated template database once per server and migration set.
async fn ensure_template(conn: &mut PgConnection, url_base: &UrlBase) -> Result<String, String> {
    let mut digest = 0xcbf2_9ce4_8422_2325_u64; // FNV-1a over every migration's checksum
    for migration in crate::migrator().iter() {
        for byte in migration
            .version
            .to_le_bytes()
            .iter()
            .chain(migration.checksum.iter())
        {
            digest = (digest ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let template = format!("phaseflow_tpl_{digest:016x}");
    // Serialises template creation across processes (and machines sharing DATABASE_URL).
    let lock_key = i64::from_le_bytes(digest.to_le_bytes());
    let fail = |e: sqlx::Error| format!("cannot build the template database {template}: {e}");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(lock_key)
        .execute(&mut *conn)
        .await
        .map_err(fail)?;
    let result = async {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&template)
                .fetch_one(&mut *conn)
                .await
                .map_err(fail)?;
        if exists {
            return Ok(());
        }
        // Built under another name and renamed once complete, so a crash mid-way never leaves a
        // half-migrated template behind under the real name.
        let building = format!("{template}_building");
        drop_database(conn, &building).await;
        conn.execute(AssertSqlSafe(format!(
            "CREATE DATABASE {building} TEMPLATE template0"
        )))
        .await
        .map_err(fail)?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url_base.url_for(&building))
            .await
            .map_err(fail)?;
        PgStore::new(pool.clone())
            .migrate()
            .await
            .map_err(|e| format!("cannot migrate the template database {building}: {e}"))?;
        pool.close().await;
        conn.execute(AssertSqlSafe(format!(
            "ALTER DATABASE {building} RENAME TO {template}"
        )))
        .await
        .map_err(fail)?;
        conn.execute(AssertSqlSafe(format!(
            "ALTER DATABASE {template} WITH IS_TEMPLATE true"
        )))
        .await
        .map_err(fail)?;
        Ok(())
    }
    .await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(lock_key)
        .execute(&mut *conn)
        .await;
    result.map(|()| template)
}

async fn drop_database(conn: &mut PgConnection, name: &str) {
    // Names are generated by this module (`[a-z0-9_]`), never user input.
    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    if let Err(e) = conn.execute(AssertSqlSafe(sql)).await {
        tracing::warn!(database = name, error = %e, "could not drop a test database");
    }
}

/// A fresh database on the test server, dropped when this value is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    pool: PgPool,
}

impl TestDatabase {
    /// A fresh database with phaseflow's schema already migrated.
    ///
    /// # Panics
    /// When no PostgreSQL can be found or started (the message says how to install one), or the
    /// server refuses to create the database.
    pub async fn migrated() -> Self {
        let server = server().await;
        Self::create(server, &server.template).await
    }

    /// A fresh database without phaseflow's schema (for tests of [`PgStore::migrate`]).
    ///
    /// # Panics
    /// As [`TestDatabase::migrated`].
    pub async fn empty() -> Self {
        Self::create(server().await, "template0").await
    }

    async fn create(server: &'static Server, template: &str) -> Self {
        let name = format!(
            "phaseflow_test_{}_{}",
            std::process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = PgConnection::connect_with(&server.admin)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
        // A template with an open connection cannot be copied; retry briefly (another process
        // may be mid-copy of the same template, which holds a connection for an instant).
        let sql = format!(
            "CREATE DATABASE {name} TEMPLATE {template}{}",
            server.create_suffix
        );
        let mut tries = 0;
        loop {
            match conn.execute(AssertSqlSafe(sql.clone())).await {
                Ok(_) => break,
                Err(e) if tries < 50 && e.to_string().contains("being accessed by other users") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot create test database {name}: {e}"),
            }
        }
        let _ = conn.close().await;
        let url = server.url_base.url_for(&name);
        let pool = pool_for(&url).await;
        Self { name, url, pool }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL for the database (for a second process, `PgStore::connect`, or `psql`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The test's pool on the database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A `PgStore` on the test's pool.
    pub fn store(&self) -> PgStore {
        PgStore::new(self.pool.clone())
    }

    /// A new, separate pool on the same database (another "process").
    pub async fn connect(&self) -> PgPool {
        pool_for(&self.url).await
    }

    /// A `PgStore` on a new, separate pool (another engine or operator).
    pub async fn connect_store(&self) -> PgStore {
        PgStore::new(self.connect().await)
    }
}

async fn pool_for(url: &str) -> PgPool {
    crate::pool_options()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to test database `{url}`: {e}"))
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(Ok(server)) = SERVER.get() else {
            return;
        };
        let admin = server.admin.clone();
        let name = std::mem::take(&mut self.name);
        // Drop runs inside the test's runtime, which cannot be blocked on; a short-lived thread
        // with its own runtime does the `DROP DATABASE` (FORCE ends the test's connections).
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Ok(mut conn) = PgConnection::connect_with(&admin).await {
                    drop_database(&mut conn, &name).await;
                    let _ = conn.close().await;
                }
            });
        });
        let _ = dropper.join();
    }
}

/// A [`PgStore`] on its own fresh, migrated database, which is dropped with it.
///
/// It implements [`Store`] by delegating to the [`PgStore`] (and derefs to it), so it can be
/// handed to generic suites that take a store by value or as `Arc<dyn Store>`:
///
/// ```ignore
/// phaseflow_fake::store_conformance_tests!(phaseflow_pg::testing::TestStore::new().await);
/// phaseflow_fake::engine_scenario_tests!(async {
///     std::sync::Arc::new(phaseflow_pg::testing::TestStore::new().await) as Arc<dyn Store>
/// });
/// ```
#[derive(Debug)]
pub struct TestStore {
    store: PgStore,
    database: TestDatabase,
}

impl TestStore {
    /// A store on a fresh migrated database.
    ///
    /// # Panics
    /// As [`TestDatabase::migrated`].
    pub async fn new() -> Self {
        let database = TestDatabase::migrated().await;
        Self {
            store: database.store(),
            database,
        }
    }

    /// The database under the store (for raw SQL, a second pool, its URL).
    pub fn database(&self) -> &TestDatabase {
        &self.database
    }
}

impl std::ops::Deref for TestStore {
    type Target = PgStore;

    fn deref(&self) -> &PgStore {
        &self.store
    }
}

#[async_trait]
impl Store for TestStore {
    async fn create_run(&self, run: NewRun) -> Result<RunRecord> {
        self.store.create_run(run).await
    }

    async fn begin_attempt(&self, cmd: BeginAttempt) -> Result<BeginOutcome> {
        self.store.begin_attempt(cmd).await
    }

    async fn claim_phase(&self, work: PhaseWork) -> Result<PhaseRecord> {
        self.store.claim_phase(work).await
    }

    async fn mark_busy(&self, cmd: MarkBusy) -> Result<SessionRecord> {
        self.store.mark_busy(cmd).await
    }

    async fn record_prompt(&self, cmd: RecordPrompt) -> Result<()> {
        self.store.record_prompt(cmd).await
    }

    async fn record_session_event(
        &self,
        work: PhaseWork,
        session: SessionId,
        event: SessionEvent,
    ) -> Result<SessionRecord> {
        self.store.record_session_event(work, session, event).await
    }

    async fn record_verdict(&self, cmd: RecordVerdict) -> Result<ArtifactRecord> {
        self.store.record_verdict(cmd).await
    }

    async fn finish_phase(&self, cmd: FinishPhase) -> Result<Finished> {
        self.store.finish_phase(cmd).await
    }

    async fn decide(&self, cmd: Decide) -> Result<Finished> {
        self.store.decide(cmd).await
    }

    async fn operate(&self, run: RunId, action: OperatorAction) -> Result<Finished> {
        self.store.operate(run, action).await
    }

    async fn append_transcript(
        &self,
        session: SessionId,
        chunks: Vec<TranscriptChunk>,
    ) -> Result<()> {
        self.store.append_transcript(session, chunks).await
    }

    async fn run(&self, run: RunId) -> Result<RunRecord> {
        self.store.run(run).await
    }

    async fn phases(&self, run: RunId) -> Result<Vec<PhaseRecord>> {
        self.store.phases(run).await
    }

    async fn session(&self, run: RunId, role: &RoleKey) -> Result<Option<SessionRecord>> {
        self.store.session(run, role).await
    }

    async fn sessions(&self, run: RunId) -> Result<Vec<SessionRecord>> {
        self.store.sessions(run).await
    }

    async fn events(&self, run: RunId, after: u64) -> Result<Vec<Event>> {
        self.store.events(run, after).await
    }

    async fn approvals(&self, run: RunId) -> Result<Vec<ApprovalRecord>> {
        self.store.approvals(run).await
    }

    async fn approval(&self, id: ApprovalId) -> Result<ApprovalRecord> {
        self.store.approval(id).await
    }

    async fn latest_artifact(
        &self,
        run: RunId,
        phase: &PhaseKey,
    ) -> Result<Option<ArtifactRecord>> {
        self.store.latest_artifact(run, phase).await
    }

    async fn transcript(&self, session: SessionId) -> Result<Vec<TranscriptChunk>> {
        self.store.transcript(session).await
    }
}

/// The throwaway cluster's files and the locks this process holds on it.
struct Cluster {
    socket_dir: PathBuf,
    users_lock: File,
}

/// The PostgreSQL binaries to run the throwaway cluster with.
struct Binaries {
    dir: PathBuf,
    major: String,
}

impl Binaries {
    /// The highest version in `/usr/lib/postgresql/*/bin`, else `initdb` on `PATH`.
    fn find() -> Result<Self, String> {
        Self::find_in(
            Path::new("/usr/lib/postgresql"),
            std::env::var_os("PATH").as_deref(),
        )
    }

    /// The highest `<lib>/<major>/bin` holding `initdb`, else the first `PATH` entry holding
    /// both `initdb` and `pg_ctl`.
    fn find_in(lib: &Path, path: Option<&std::ffi::OsStr>) -> Result<Self, String> {
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(lib)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = entry.path().join("bin");
                bin.join("initdb").exists().then_some((version, bin))
            })
            .collect();
        versions.sort();
        if let Some((version, dir)) = versions.pop() {
            return Ok(Self {
                dir,
                major: version.to_string(),
            });
        }
        let on_path = path
            .into_iter()
            .flat_map(std::env::split_paths)
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
            .ok_or_else(|| {
                format!(
                    "no PostgreSQL found (nothing in {}/*/bin, no `initdb` and `pg_ctl` on PATH) \
                     and DATABASE_URL is not set; {INSTALL_HINT}",
                    lib.display()
                )
            })?;
        let output = Command::new(on_path.join("initdb"))
            .arg("--version")
            .output()
            .map_err(|e| {
                format!(
                    "cannot run {}/initdb: {e}; {INSTALL_HINT}",
                    on_path.display()
                )
            })?;
        // "initdb (PostgreSQL) 16.4" → "16"
        let text = String::from_utf8_lossy(&output.stdout);
        let version = text.split_whitespace().last().unwrap_or_default();
        let major = version.split('.').next().unwrap_or_default().to_owned();
        Ok(Self {
            dir: on_path,
            major,
        })
    }

    fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Cluster {
    /// Starts the shared cluster unless it is already up; see the module docs.
    fn ensure() -> Result<Self, String> {
        let as_root = current_uid()? == 0;
        let root = std::env::temp_dir().join(format!("phaseflow-pg-test-{}", current_uid()?));
        fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let setup_lock = open_lock(&root.join("setup.lock"))?;
        setup_lock
            .lock()
            .map_err(|e| format!("cannot lock {}/setup.lock: {e}", root.display()))?;
        let users_lock = open_lock(&root.join("users.lock"))?;
        users_lock
            .lock_shared()
            .map_err(|e| format!("cannot lock {}/users.lock: {e}", root.display()))?;

        let cluster = root.join("cluster");
        let socket_dir = cluster.join("sock");
        let socket = socket_dir.join(format!(".s.PGSQL.{SOCKET_PORT}"));
        if UnixStream::connect(&socket).is_err() {
            let started = std::time::Instant::now();
            if let Err(first) = start_cluster(&root, &cluster, as_root, false) {
                // A data directory left by a killed server can refuse to start (a stale
                // `postmaster.pid` whose pid was reused, a half-written initdb): it is
                // disposable, so start over from a fresh one before giving up.
                tracing::warn!(error = %first, "the reused test cluster did not start; re-initialising it");
                start_cluster(&root, &cluster, as_root, true)?;
            }
            tracing::info!(elapsed = ?started.elapsed(), "started the throwaway PostgreSQL cluster");
        }
        drop(setup_lock);
        Ok(Self {
            socket_dir,
            users_lock,
        })
    }
}

fn open_lock(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

fn current_uid() -> Result<u32, String> {
    let output = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("cannot run `id -u`: {e}"))?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("cannot parse the output of `id -u`: {e}"))
}

fn start_cluster(root: &Path, cluster: &Path, as_root: bool, fresh: bool) -> Result<(), String> {
    let bins = Binaries::find()?;
    let data = cluster.join("data");
    let version = fs::read_to_string(data.join("PG_VERSION")).unwrap_or_default();
    if fresh || version.trim() != bins.major {
        if cluster.exists() {
            fs::remove_dir_all(cluster).map_err(|e| {
                format!("cannot remove the stale cluster {}: {e}", cluster.display())
            })?;
        }
        fs::create_dir_all(cluster.join("sock"))
            .map_err(|e| format!("cannot create {}: {e}", cluster.display()))?;
        if as_root {
            run(
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres:")
                    .arg(cluster),
                false,
            )?;
        }
        let mut initdb = Command::new(bins.program("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        run(&mut initdb, as_root)?;
    }
    let options = format!(
        "-c port={SOCKET_PORT} -c listen_addresses='' -c unix_socket_directories='{}' \
         -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400",
        cluster.join("sock").display()
    );
    let mut pg_ctl = Command::new("setsid");
    pg_ctl
        .arg(bins.program("pg_ctl"))
        .arg("start")
        .arg("-w")
        .args(["-t", "60"])
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(cluster.join("postgres.log"))
        .arg("-o")
        .arg(options);
    run(&mut pg_ctl, as_root).map_err(|e| {
        let log = fs::read_to_string(cluster.join("postgres.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        format!(
            "{e}\npostgres.log (last lines, newest first):\n{}",
            tail.join("\n")
        )
    })?;
    spawn_watchdog(root, cluster, &bins, as_root)
}

/// Runs a command to completion (as `postgres` when asked), failing with its output.
fn run(command: &mut Command, as_postgres: bool) -> Result<Output, String> {
    let mut command = if as_postgres {
        let mut wrapped = Command::new("runuser");
        wrapped
            .args(["-u", "postgres", "--"])
            .arg(command.get_program())
            .args(command.get_args());
        wrapped
    } else {
        std::mem::replace(command, Command::new("true"))
    };
    let shown = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}; {INSTALL_HINT}"))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "{shown} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Quotes a string for `sh`.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Starts the detached loop that stops the cluster once no test process uses it (module docs).
fn spawn_watchdog(
    root: &Path,
    cluster: &Path,
    bins: &Binaries,
    as_root: bool,
) -> Result<(), String> {
    let q = |path: &Path| sh_quote(&path.display().to_string());
    let data = cluster.join("data");
    let mut stop = String::new();
    if as_root {
        stop.push_str("runuser -u postgres -- ");
    }
    let _ = write!(
        stop,
        "{} stop -D {} -m immediate -w",
        q(&bins.program("pg_ctl")),
        q(&data)
    );
    let script = format!(
        r#"echo $$ > {pidfile}
idle=0
while sleep 5; do
  [ "$(cat {pidfile} 2>/dev/null)" = "$$" ] || exit 0
  [ -e {data}/postmaster.pid ] || exit 0
  if flock -n -x {users} true; then idle=$((idle + 1)); else idle=0; fi
  if [ "$idle" -ge 3 ]; then
    if flock -x {setup} sh -c 'flock -n -x "$1" true && {{ {stop}; rm -rf "$2"; }}' sh {users} {cluster}; then
      exit 0
    fi
    idle=0
  fi
done
"#,
        pidfile = q(&root.join("watchdog.pid")),
        data = q(&data),
        users = q(&root.join("users.lock")),
        setup = q(&root.join("setup.lock")),
        cluster = q(cluster),
        stop = stop.replace('\'', r"'\''"),
    );
    let log = File::create(root.join("watchdog.log"))
        .map_err(|e| format!("cannot create {}/watchdog.log: {e}", root.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("cannot open the watchdog log: {e}"))?;
    Command::new("setsid")
        .arg("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot start the cluster watchdog: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_swap_only_the_path() {
        assert_eq!(
            replace_database("postgres://u:p@host:5433/app?sslmode=disable", "t1"),
            "postgres://u:p@host:5433/t1?sslmode=disable"
        );
        assert_eq!(
            replace_database("postgres://u@host", "t1"),
            "postgres://u@host/t1"
        );
        assert_eq!(
            UrlBase::Socket(PathBuf::from("/tmp/x/sock")).url_for("t2"),
            "postgres://postgres@localhost/t2?host=/tmp/x/sock&port=5432"
        );
    }

    #[test]
    fn without_postgresql_the_failure_says_how_to_install_it() {
        let nowhere = Path::new("/nonexistent/phaseflow/postgresql");
        let Err(message) = Binaries::find_in(nowhere, Some(std::ffi::OsStr::new("/nonexistent")))
        else {
            panic!("found PostgreSQL where there is none");
        };
        assert!(message.contains("no PostgreSQL found"), "{message}");
        assert!(message.contains("apt-get install postgresql"), "{message}");
        assert!(message.contains("DATABASE_URL"), "{message}");
    }

    #[test]
    fn the_highest_installed_version_wins() {
        let lib = tempfile::tempdir().unwrap();
        for version in ["9", "15", "16", "not-a-version"] {
            let bin = lib.path().join(version).join("bin");
            fs::create_dir_all(&bin).unwrap();
            fs::write(bin.join("initdb"), "").unwrap();
        }
        let found = Binaries::find_in(lib.path(), None).unwrap();
        assert_eq!(found.major, "16");
        assert_eq!(found.program("pg_ctl"), lib.path().join("16/bin/pg_ctl"));
    }

    #[test]
    fn shell_quoting_survives_single_quotes() {
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
