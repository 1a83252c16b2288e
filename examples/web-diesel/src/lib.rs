//! envelope with diesel: a patient register on axum + sync diesel (an r2d2 pool, queries in
//! `spawn_blocking`) whose `email`, `national_id`, `born` and `notes` are encrypted at rest, with a
//! blind index so patients can be found by e-mail. No sqlx: the key table is kept by
//! `envelope_diesel::DieselKeyStore`.
//!
//! What a team changes to encrypt a field: the `table!` keeps the column (its SQL type becomes
//! binary), the model's field type changes, and the blind index gets a column of its own:
//!
//! ```text
//!  diesel::table! { patients (id) {
//! -    email -> Text,
//! +    email -> Binary,
//! +    email_bidx -> Binary,
//!  } }
//!  struct Patient {
//! -    email: String,
//! +    email: Encrypted<String, PatientEmail>,
//! +    email_bidx: BlindIndex<PatientEmailIndex>,
//!  }
//! ```
//!
//! | route | does |
//! |---|---|
//! | `POST /patients` | create from `{"name", "email", "national_id"?, "born"? (YYYY-MM-DD), "notes"?}`; returns `{"id"}` |
//! | `GET /patients/{id}` | one patient |
//! | `GET /patients?email=...` | find by e-mail (blind index; case ignored) |
//! | `DELETE /patients/{id}` | delete |
//! | `GET /metrics` | KMS calls, cache hits and misses |
//!
//! Every error answer, unknown routes and methods included, is JSON: `{"error": "..."}`.
//!
//! Configuration, all optional: `PORT` (3001), `DATABASE_URL` (`web-diesel.db`, a SQLite file;
//! `postgres://…` with the feature `postgres`, `mysql://…` with `mysql`), `ENVELOPE_KMS` (`local`,
//! or a key URI such as `tencent://REGION/CMK`, see docs/PROVIDERS.md),
//! `ENVELOPE_MASTER_KEY_FILE` (`envelope-master.key`) for the local KMS.
#![forbid(unsafe_code)]

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::NaiveDate;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use envelope_core::dialect::{self, Kind};
use envelope_core::kms::KeyUri;
use envelope_core::{KeyStore, Keyring, KmsProvider, LocalKms, Normalizer};
use envelope_diesel::{BlindIndex, DieselKeyStore, Encrypted, blind_index, column};
use serde::{Deserialize, Serialize};

column!(
    /// `patients.email`.
    pub PatientEmail = "patients.email"
);
column!(
    /// `patients.national_id`.
    pub PatientNationalId = "patients.national_id"
);
column!(
    /// `patients.born`.
    pub PatientBorn = "patients.born"
);
column!(
    /// `patients.notes`.
    pub PatientNotes = "patients.notes"
);
blind_index!(
    /// The e-mail's blind index: case-folded, so lookups ignore case.
    pub PatientEmailIndex = "patients.email", CaseFolded
);

diesel::table! {
    /// The patients. `name` stays plaintext; the other fields are envelopes.
    patients (id) {
        /// A UUID.
        id -> Text,
        /// Plaintext.
        name -> Text,
        /// Encrypted.
        email -> Binary,
        /// The e-mail's blind index.
        email_bidx -> Binary,
        /// Encrypted.
        national_id -> Nullable<Binary>,
        /// Encrypted date.
        born -> Nullable<Binary>,
        /// Encrypted.
        notes -> Nullable<Binary>,
    }
}

/// A patient row: the model a diesel app already has, with encrypted field types.
#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = patients)]
struct Patient {
    id: String,
    name: String,
    email: Encrypted<String, PatientEmail>,
    email_bidx: BlindIndex<PatientEmailIndex>,
    national_id: Option<Encrypted<String, PatientNationalId>>,
    born: Option<Encrypted<NaiveDate, PatientBorn>>,
    notes: Option<Encrypted<String, PatientNotes>>,
}

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// A SQLite file path (or `sqlite://path`), `postgres://…` or `mysql://…`.
    pub database_url: String,
    /// `None` for the local KMS with `master_key_file`, or a key URI.
    pub kms: Option<KeyUri>,
    /// The local KMS's master key file.
    pub master_key_file: std::path::PathBuf,
    /// The key table's name.
    pub keys_table: String,
}

impl Config {
    /// Read the environment (see the crate docs).
    ///
    /// # Errors
    /// A message naming the bad variable.
    pub fn from_env() -> Result<Self, String> {
        let port = match std::env::var("PORT") {
            Ok(p) => p
                .parse()
                .map_err(|_| format!("PORT must be a port number, got {p:?}"))?,
            Err(_) => 3001,
        };
        let kms = match std::env::var("ENVELOPE_KMS").as_deref() {
            Ok("local") | Err(_) => None,
            Ok(uri) => Some(KeyUri::parse(uri).map_err(|e| format!("ENVELOPE_KMS: {e}"))?),
        };
        Ok(Config {
            port,
            database_url: std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "web-diesel.db".to_owned()),
            kms,
            master_key_file: std::env::var("ENVELOPE_MASTER_KEY_FILE")
                .unwrap_or_else(|_| "envelope-master.key".to_owned())
                .into(),
            keys_table: envelope_diesel::store::DEFAULT_TABLE.to_owned(),
        })
    }
}

/// The application's pool, one variant per database the build supports.
enum Db {
    Sqlite(Pool<ConnectionManager<SqliteConnection>>),
    #[cfg(feature = "postgres")]
    Postgres(Pool<ConnectionManager<PgConnection>>),
    #[cfg(feature = "mysql")]
    Mysql(Pool<ConnectionManager<MysqlConnection>>),
}

/// Run `$body` with `$conn` a connection of the pool, whatever its database: each arm is the
/// same diesel code, type-checked for its backend.
macro_rules! with_conn {
    ($db:expr, |$conn:ident| $body:expr) => {
        match $db {
            Db::Sqlite(pool) => {
                let $conn = &mut *pool.get().map_err(pool_error)?;
                $body
            }
            #[cfg(feature = "postgres")]
            Db::Postgres(pool) => {
                let $conn = &mut *pool.get().map_err(pool_error)?;
                $body
            }
            #[cfg(feature = "mysql")]
            Db::Mysql(pool) => {
                let $conn = &mut *pool.get().map_err(pool_error)?;
                $body
            }
        }
    };
}

const SQLITE_DDL: &str = "CREATE TABLE IF NOT EXISTS patients (id TEXT PRIMARY KEY, \
    name TEXT NOT NULL, email BLOB NOT NULL, email_bidx BLOB NOT NULL, national_id BLOB, \
    born BLOB, notes BLOB); \
    CREATE INDEX IF NOT EXISTS patients_email_bidx ON patients (email_bidx);";

/// Open the pool and the key store for `url`, and create the tables.
fn open(url: &str, keys_table: &str) -> Result<(Db, Arc<dyn KeyStore>, &'static str), String> {
    fn pool<C: diesel::r2d2::R2D2Connection + 'static>(
        url: &str,
    ) -> Result<Pool<ConnectionManager<C>>, String> {
        Pool::builder()
            .max_size(8)
            .build(ConnectionManager::new(url))
            .map_err(|e| format!("cannot connect to the database: {e}"))
    }
    fn store<C: envelope_diesel::store::KeyTableConnection>(
        url: &str,
        table: &str,
    ) -> Result<Arc<dyn KeyStore>, String>
    where
        C::Backend: envelope_diesel::store::KeyTableBackend,
    {
        let store = DieselKeyStore::<C>::connect(url)
            .and_then(|s| s.with_table(table))
            .map_err(|e| e.to_string())?;
        store
            .create_table()
            .map_err(|e| format!("cannot create the key table: {e}"))?;
        Ok(Arc::new(store))
    }
    // Replicas started together on a fresh database take turns, as for the key table.
    let ddl_error = |e: envelope_core::StoreError| format!("cannot create the patients table: {e}");
    // A plain path is a SQLite file.
    let d = match dialect::for_url(url) {
        Some(d) => d,
        None if !url.contains("://") => &dialect::Sqlite,
        None => return Err(unsupported(dialect::scheme(url))),
    };
    match d.kind() {
        #[cfg(feature = "postgres")]
        Kind::Postgres => {
            let db = pool::<PgConnection>(url)?;
            envelope_diesel::run_ddl_in_turn(
                &mut *db.get().map_err(pool_error_text)?,
                &[
                    "CREATE TABLE IF NOT EXISTS patients (id TEXT PRIMARY KEY, name TEXT NOT NULL, \
                     email BYTEA NOT NULL, email_bidx BYTEA NOT NULL, national_id BYTEA, \
                     born BYTEA, notes BYTEA); \
                     CREATE INDEX IF NOT EXISTS patients_email_bidx ON patients (email_bidx);",
                ],
            )
            .map_err(ddl_error)?;
            Ok((
                Db::Postgres(db),
                store::<PgConnection>(url, keys_table)?,
                d.name(),
            ))
        }
        #[cfg(feature = "mysql")]
        Kind::MySql => {
            // diesel knows `mysql://` only.
            let url = d.driver_url(url);
            let db = pool::<MysqlConnection>(&url)?;
            envelope_diesel::run_ddl_in_turn(
                &mut *db.get().map_err(pool_error_text)?,
                &[
                    "CREATE TABLE IF NOT EXISTS patients (id VARCHAR(36) PRIMARY KEY, \
                     name VARCHAR(200) NOT NULL, email VARBINARY(1024) NOT NULL, \
                     email_bidx VARBINARY(32) NOT NULL, national_id VARBINARY(512), \
                     born VARBINARY(512), notes MEDIUMBLOB, INDEX patients_email_bidx (email_bidx))",
                ],
            )
            .map_err(ddl_error)?;
            Ok((
                Db::Mysql(db),
                store::<MysqlConnection>(&url, keys_table)?,
                d.name(),
            ))
        }
        Kind::Sqlite => {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let db = pool::<SqliteConnection>(path)?;
            envelope_diesel::run_ddl_in_turn(
                &mut *db.get().map_err(pool_error_text)?,
                &[SQLITE_DDL],
            )
            .map_err(ddl_error)?;
            Ok((
                Db::Sqlite(db),
                store::<SqliteConnection>(path, keys_table)?,
                d.name(),
            ))
        }
        #[allow(unreachable_patterns)]
        _ => Err(unsupported(dialect::scheme(url))),
    }
}

/// A database URL this build cannot use.
fn unsupported(scheme: &str) -> String {
    format!(
        "DATABASE_URL {scheme}:// is not supported by this build: use a SQLite file path, \
         or build with `--features postgres` / `--features mysql` for postgres:// or mysql://"
    )
}

fn pool_error_text(e: diesel::r2d2::PoolError) -> String {
    format!("cannot connect to the database: {e}")
}

struct Inner {
    db: Db,
    keyring: Keyring,
    database: &'static str,
}

/// A started service: its pool, keyring and routes.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

impl App {
    /// Connect to the database and the KMS, create the tables if needed, and make the first
    /// data key.
    ///
    /// # Errors
    /// A message saying what could not be reached or set up.
    pub async fn start(config: Config) -> Result<App, String> {
        let (kms, cmk): (Arc<dyn KmsProvider>, String) = match &config.kms {
            None => {
                // A development database may make its master key on first use; with a database
                // server the key must exist (`envelope keygen`), so a lost volume never silently
                // becomes a new key.
                let server = config.database_url.contains("://")
                    && !config.database_url.starts_with("sqlite:");
                let kms = if server {
                    LocalKms::open(&config.master_key_file)
                } else {
                    LocalKms::open_or_create_for_development(&config.master_key_file)
                }
                .map_err(|e| e.to_string())?;
                let cmk = kms.cmk_id().to_owned();
                (Arc::new(kms), cmk)
            }
            Some(uri) => {
                let c = uri.connect().await.map_err(|e| e.to_string())?;
                (c.kms, c.cmk)
            }
        };
        // Sync diesel: connect and create the tables off the runtime's threads.
        let (url, table) = (config.database_url.clone(), config.keys_table.clone());
        let (db, store, database) = tokio::task::spawn_blocking(move || open(&url, &table))
            .await
            .map_err(|e| e.to_string())??;
        let keyring = Keyring::builder(kms, store)
            .cmk(cmk)
            .build()
            .map_err(|e| e.to_string())?;
        keyring
            .warm()
            .await
            .map_err(|e| format!("cannot make the first data key: {e}"))?;
        Ok(App {
            inner: Arc::new(Inner {
                db,
                keyring,
                database,
            }),
        })
    }

    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.inner.keyring
    }

    /// Which database, for the start-up line.
    pub fn database(&self) -> &'static str {
        self.inner.database
    }

    /// The routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/patients", get(find_by_email).post(create))
            .route("/patients/{id}", get(read).delete(remove))
            .route("/metrics", get(metrics))
            .fallback(no_route)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                with_keyring,
            ))
            .with_state(self.clone())
    }

    /// Run `work` with a connection in `spawn_blocking`, with this app's keyring entered on
    /// that thread (sync diesel's `ToSql`/`FromSql` find it there).
    async fn blocking<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Db) -> Result<T, ApiError> + Send + 'static,
    {
        let app = self.clone();
        tokio::task::spawn_blocking(move || {
            let _keyring = app.inner.keyring.enter();
            work(&app.inner.db)
        })
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    }
}

/// Every request's async part runs with this app's keyring as the task-local one (the blind
/// index is computed there); its blocking part enters it on the blocking thread.
async fn with_keyring(
    State(app): State<App>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    app.inner.keyring.install_for(next.run(request)).await
}

/// An error answer: a status and `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no patient with this id".into())
}

async fn no_route() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such route: /patients, /patients/{id} and /metrics are served".into(),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "this route does not take that method (/patients: GET, POST; /patients/{id}: GET, DELETE; /metrics: GET)"
            .into(),
    )
}

fn pool_error(e: diesel::r2d2::PoolError) -> ApiError {
    tracing::error!(error = %e, "database pool");
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "the database is unavailable".into(),
    )
}

fn internal(e: &diesel::result::Error) -> ApiError {
    // The report adds the envelope cause to diesel's message; it never holds a value or a key.
    tracing::error!(error = %envelope_diesel::report(e), "database or encryption failure");
    let message = match envelope_diesel::envelope_error(e) {
        Some(
            envelope_core::Error::Kms(_)
            | envelope_core::Error::Unavailable(envelope_core::Unavailable::Timeout { .. })
            | envelope_core::Error::Unavailable(envelope_core::Unavailable::WriteKey { .. }),
        ) => "the key service is unavailable; try again shortly",
        _ => "internal error",
    };
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, message.into())
}

fn key_service_unavailable(e: envelope_core::Error) -> ApiError {
    tracing::error!(error = %e, "blind index");
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "the key service is unavailable; try again shortly".into(),
    )
}

/// A patient as clients send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientInput {
    name: String,
    email: String,
    #[serde(default)]
    national_id: Option<String>,
    #[serde(default)]
    born: Option<NaiveDate>,
    #[serde(default)]
    notes: Option<String>,
}

/// A patient as the service returns it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct PatientOutput {
    id: String,
    name: String,
    email: String,
    national_id: Option<String>,
    born: Option<NaiveDate>,
    notes: Option<String>,
}

impl From<Patient> for PatientOutput {
    fn from(p: Patient) -> Self {
        PatientOutput {
            id: p.id,
            name: p.name,
            email: p.email.into_inner(),
            national_id: p.national_id.map(Encrypted::into_inner),
            born: p.born.map(Encrypted::into_inner),
            notes: p.notes.map(Encrypted::into_inner),
        }
    }
}

async fn create(
    State(app): State<App>,
    payload: Result<Json<PatientInput>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Json(input) = payload.map_err(|r| ApiError(r.status(), r.body_text()))?;
    let email = input.email.trim().to_owned();
    if input.name.trim().is_empty() || input.name.len() > 200 {
        return Err(bad_request("`name` must be 1 to 200 characters"));
    }
    if email.len() > 320 || !email.contains('@') {
        return Err(bad_request("`email` must be an e-mail address"));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let patient = Patient {
        id: id.clone(),
        name: input.name.trim().to_owned(),
        email_bidx: BlindIndex::of(&email).map_err(key_service_unavailable)?,
        email: Encrypted::new(email),
        national_id: input.national_id.map(Encrypted::new),
        born: input.born.map(Encrypted::new),
        notes: input.notes.map(Encrypted::new),
    };
    app.blocking(move |db| {
        with_conn!(db, |conn| diesel::insert_into(patients::table)
            .values(&patient)
            .execute(conn)
            .map_err(|e| internal(&e)))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "id": id }))))
}

async fn read(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<PatientOutput>, ApiError> {
    let found = app
        .blocking(move |db| {
            with_conn!(db, |conn| patients::table
                .find(&id)
                .select(Patient::as_select())
                .first(conn)
                .optional()
                .map_err(|e| internal(&e)))
        })
        .await?;
    found.map(|p| Json(p.into())).ok_or_else(not_found)
}

#[derive(Deserialize)]
struct EmailQuery {
    email: Option<String>,
}

async fn find_by_email(
    State(app): State<App>,
    query: Result<Query<EmailQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<PatientOutput>>, ApiError> {
    let Query(q) = query.map_err(|r| bad_request(r.body_text()))?;
    let email = q
        .email
        .filter(|e| !e.trim().is_empty())
        .ok_or_else(|| bad_request("the query parameter `email` is required"))?;
    // One probe per live index key, so rows are found during `envelope rotate --index`.
    let probes =
        BlindIndex::<PatientEmailIndex>::probes(&email).map_err(key_service_unavailable)?;
    let rows: Vec<Patient> = app
        .blocking(move |db| {
            with_conn!(db, |conn| patients::table
                .filter(patients::email_bidx.eq_any(&probes))
                .select(Patient::as_select())
                .load(conn)
                .map_err(|e| internal(&e)))
        })
        .await?;
    // A truncated index can match an unrelated value now and then: confirm on the plaintext.
    let wanted = Normalizer::CaseFolded.apply(&email).into_owned();
    Ok(Json(
        rows.into_iter()
            .filter(|p| Normalizer::CaseFolded.apply(&p.email) == wanted)
            .map(Into::into)
            .collect(),
    ))
}

async fn remove(State(app): State<App>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let deleted = app
        .blocking(move |db| {
            with_conn!(db, |conn| diesel::delete(patients::table.find(&id))
                .execute(conn)
                .map_err(|e| internal(&e)))
        })
        .await?;
    if deleted == 0 {
        return Err(not_found());
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn metrics(State(app): State<App>) -> Json<envelope_core::MetricsSnapshot> {
    Json(app.inner.keyring.metrics())
}
