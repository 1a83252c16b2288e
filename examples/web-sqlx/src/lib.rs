//! envelope's showcase: a customer service on axum + sqlx whose `email`, `phone`, `national_id`
//! and `notes` are encrypted at rest, with a blind index so customers can be found by e-mail.
//!
//! | route | does |
//! |---|---|
//! | `POST /customers` | create from `{"name", "email", "phone"?, "national_id"?, "notes"?}`; returns `{"id"}` |
//! | `GET /customers/{id}` | one customer |
//! | `GET /customers?email=...` | find by e-mail (blind index; case and surrounding spaces ignored) |
//! | `GET /customers?limit=50&after=ID` | list in id order, `limit` (1 to 500, default 50) at a time, after the id `after` (the last id of the previous page) |
//! | `PUT /customers/{id}` | replace |
//! | `DELETE /customers/{id}` | delete |
//! | `GET /metrics` | envelope's metrics in Prometheus text format (KMS calls by action and outcome with their latency, key-cache hits and misses, rotations, bridge waits, key-table calls) |
//! | `GET /metrics.json` | this keyring's counters as JSON |
//!
//! Every error answer, unknown routes and methods included, is JSON: `{"error": "..."}`. An id
//! that is not a UUID is 400, an unknown one 404.
//!
//! Configuration, all optional: `PORT` (3000), `DATABASE_URL` (`sqlite://web-sqlx.db?mode=rwc`;
//! `postgres://...` and `mysql://...` work too), `ENVELOPE_KMS` (`local`; `tencent` with
//! `ENVELOPE_CMK` and the `TENCENTCLOUD_*` variables; or any key URI such as
//! `aws://REGION/KEY` or `vault://HOST:PORT/MOUNT/KEY`, see docs/PROVIDERS.md),
//! `ENVELOPE_ALSO_READ` (comma-separated key URIs whose keys it must still read: another KMS
//! and its master key, or another master key of `ENVELOPE_KMS`'s own KMS; list the destination
//! of `envelope keys rewrap` here before the rewrap starts, and the old master key after the
//! move for as long as keys remain under it), `ENVELOPE_MASTER_KEY_FILE` (`envelope-master.key`) or
//! `ENVELOPE_LOCAL_MASTER_KEY` for the local KMS.
#![forbid(unsafe_code)]

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use envelope_core::dialect::{self, Dialect, Kind};
use envelope_core::kms::KeyUri;
use envelope_core::kms::tencent::{TencentConfig, TencentKms};
use envelope_core::{Keyring, KmsProvider, LocalKms, Normalizer};
use envelope_sqlx::{AsJson, BlindIndex, Encrypted, blind_index, column};
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;

column!(
    /// `customers.email`.
    pub CustomerEmail = "customers.email"
);
column!(
    /// `customers.phone`.
    pub CustomerPhone = "customers.phone"
);
column!(
    /// `customers.national_id`.
    pub CustomerNationalId = "customers.national_id"
);
column!(
    /// `customers.notes`.
    pub CustomerNotes = "customers.notes"
);
blind_index!(
    /// The e-mail's blind index: case-folded, so lookups ignore case.
    pub CustomerEmailIndex = "customers.email", CaseFolded
);

/// Which KMS holds the master key.
#[derive(Debug, Clone)]
pub enum KmsChoice {
    /// The local provider with a master key file. On the default SQLite database the file is
    /// created on first use (mode 0600, development only); with a database server it must
    /// exist (`envelope keygen --out PATH`), so a missing volume never silently becomes a new key.
    LocalFile(std::path::PathBuf),
    /// The local provider with a key from `ENVELOPE_LOCAL_MASTER_KEY`.
    LocalEnv,
    /// Tencent Cloud KMS (or the emulator, via the endpoint) and a CMK id.
    Tencent(Box<TencentConfig>, String),
    /// Any provider by key URI, credentials from the environment.
    Uri(KeyUri),
}

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Where the data lives.
    pub database_url: String,
    /// The KMS.
    pub kms: KmsChoice,
    /// The customers table's name.
    pub customers_table: String,
    /// The key table's name.
    pub keys_table: String,
    /// The keyring's policy (key lifetimes, cache, how often the key table is re-read).
    pub policy: envelope_core::Policy,
    /// Other master keys whose keys the keyring must read (`ENVELOPE_ALSO_READ`): of another
    /// KMS, or of the KMS `kms` names. The keyring reads keys only under these and `kms`'s.
    pub also_read: Vec<KeyUri>,
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
            Err(_) => 3000,
        };
        let database_url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "sqlite://web-sqlx.db?mode=rwc".to_owned());
        let kms = match std::env::var("ENVELOPE_KMS").as_deref() {
            Ok("tencent") => {
                let cmk = std::env::var("ENVELOPE_CMK").map_err(|_| {
                    "ENVELOPE_KMS=tencent needs ENVELOPE_CMK (the CMK id)".to_owned()
                })?;
                let config = TencentConfig::from_env().map_err(|e| e.to_string())?;
                KmsChoice::Tencent(Box::new(config), cmk)
            }
            Ok("local") | Err(_) => {
                if std::env::var_os(envelope_core::LocalKms::MASTER_KEY_ENV).is_some() {
                    KmsChoice::LocalEnv
                } else {
                    KmsChoice::LocalFile(
                        std::env::var("ENVELOPE_MASTER_KEY_FILE")
                            .unwrap_or_else(|_| "envelope-master.key".to_owned())
                            .into(),
                    )
                }
            }
            Ok(uri) if uri.contains("://") => {
                KmsChoice::Uri(KeyUri::parse(uri).map_err(|e| format!("ENVELOPE_KMS: {e}"))?)
            }
            Ok(other) => {
                return Err(format!(
                    "ENVELOPE_KMS must be `local`, `tencent` or a key URI (aws://REGION/KEY, vault://HOST/MOUNT/KEY, ...), got {other:?}"
                ));
            }
        };
        let also_read = std::env::var("ENVELOPE_ALSO_READ")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| KeyUri::parse(u).map_err(|e| format!("ENVELOPE_ALSO_READ: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            port,
            database_url,
            kms,
            customers_table: "customers".to_owned(),
            keys_table: envelope_sqlx::DEFAULT_TABLE.to_owned(),
            policy: envelope_core::Policy::default(),
            also_read,
        })
    }
}

/// The database of `url`, by its scheme.
fn dialect_of(url: &str) -> Result<&'static dyn Dialect, String> {
    dialect::for_url(url).ok_or_else(|| {
        format!(
            "DATABASE_URL must start with sqlite:, postgres: or mysql:, got {:?}",
            dialect::scheme(url)
        )
    })
}

/// The customers table, as this database spells its types.
fn customers_ddl(d: &dyn Dialect, t: &str) -> Vec<String> {
    match d.kind() {
        Kind::Sqlite | Kind::Postgres => {
            let blob = if d.kind() == Kind::Sqlite {
                "BLOB"
            } else {
                "BYTEA"
            };
            vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {t} (id TEXT PRIMARY KEY, name TEXT NOT NULL, \
                     email {blob} NOT NULL, email_bidx {blob} NOT NULL, phone {blob}, \
                     national_id {blob}, notes {blob})"
                ),
                format!("CREATE INDEX IF NOT EXISTS {t}_email_bidx ON {t} (email_bidx)"),
            ]
        }
        Kind::MySql => vec![format!(
            "CREATE TABLE IF NOT EXISTS {t} (id VARCHAR(36) PRIMARY KEY, name VARCHAR(200) NOT NULL, \
             email VARBINARY(1024) NOT NULL, email_bidx VARBINARY(32) NOT NULL, phone VARBINARY(512), \
             national_id VARBINARY(512), notes MEDIUMBLOB, INDEX {t}_email_bidx (email_bidx))"
        )],
    }
}

struct Inner {
    pool: AnyPool,
    dialect: &'static dyn Dialect,
    keyring: Keyring,
    table: String,
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
        // Before the keyring: it registers its hot-path counters with the recorder it finds.
        prometheus();
        let dialect = dialect_of(&config.database_url)?;
        let (kms, cmk): (Arc<dyn KmsProvider>, String) = match &config.kms {
            KmsChoice::LocalFile(path) => {
                let kms = if dialect.kind() == Kind::Sqlite {
                    LocalKms::open_or_create_for_development(path)
                } else {
                    LocalKms::open(path)
                }
                .map_err(|e| e.to_string())?;
                let cmk = kms.cmk_id().to_owned();
                (Arc::new(kms), cmk)
            }
            KmsChoice::LocalEnv => {
                let kms = LocalKms::from_env()
                    .map_err(|e| e.to_string())?
                    .ok_or("ENVELOPE_LOCAL_MASTER_KEY vanished")?;
                let cmk = kms.cmk_id().to_owned();
                (Arc::new(kms), cmk)
            }
            KmsChoice::Tencent(c, cmk) => (
                Arc::new(TencentKms::new((**c).clone()).map_err(|e| e.to_string())?),
                cmk.clone(),
            ),
            KmsChoice::Uri(uri) => {
                let c = uri.connect().await.map_err(|e| e.to_string())?;
                (c.kms, c.cmk)
            }
        };
        // A URI of the same kind of KMS as `kms` names another master key of it (one provider
        // per kind): trusted, and read by `kms`'s provider. Any other is a KMS of its own.
        let (mut trusted, mut readers) = (Vec::new(), Vec::new());
        for uri in &config.also_read {
            match uri.cmk() {
                Some(cmk) if uri.provider_name() == kms.name() => trusted.push(cmk.to_owned()),
                _ => readers.push(uri.connect().await.map_err(|e| e.to_string())?),
            }
        }
        let url = &config.database_url;
        let store = envelope_sqlx::key_store_for_url(url, &config.keys_table)
            .await
            .map_err(|e| format!("key table: {e}"))?;
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(8)
            .connect(&dialect.driver_url(url))
            .await
            .map_err(|e| format!("cannot connect to the database: {e}"))?;
        // Replicas started together on a fresh database take turns, as for the key table.
        envelope_sqlx::run_ddl_in_turn(&pool, &customers_ddl(dialect, &config.customers_table))
            .await
            .map_err(|e| format!("cannot create the customers table: {e}"))?;
        let builder = trusted
            .into_iter()
            .fold(Keyring::builder(kms, store).cmk(cmk), |b, c| b.trust_cmk(c));
        let keyring = readers
            .into_iter()
            .fold(builder, |b, r| b.also_read(r))
            .policy(config.policy.clone())
            .build()
            .map_err(|e| e.to_string())?;
        keyring
            .warm()
            .await
            .map_err(|e| format!("cannot make the first data key: {e}"))?;
        Ok(App {
            inner: Arc::new(Inner {
                pool,
                dialect,
                keyring,
                table: config.customers_table,
            }),
        })
    }

    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.inner.keyring
    }

    /// Which database, for the start-up line.
    pub fn database(&self) -> &'static str {
        self.inner.dialect.name()
    }

    /// The routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/customers", get(list_or_find).post(create))
            .route("/customers/{id}", get(read).put(replace).delete(remove))
            .route("/metrics", get(prometheus_text))
            .route("/metrics.json", get(metrics))
            .fallback(no_route)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                with_keyring,
            ))
            .with_state(self.clone())
    }
}

/// Every request runs with this app's keyring as the task-local one, so several apps (or tests)
/// can share a process.
async fn with_keyring(State(app): State<App>, request: Request, next: Next) -> Response {
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
    ApiError(StatusCode::NOT_FOUND, "no customer with this id".into())
}

async fn no_route() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such route: see the routes in the crate docs (/customers, /customers/{id}, /metrics)"
            .into(),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "this route does not take that method (/customers: GET, POST; /customers/{id}: GET, PUT, DELETE; /metrics, /metrics.json: GET)"
            .into(),
    )
}

/// A customer id from the path: a UUID, or 400.
fn customer_id(id: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| {
            bad_request("a customer id is a UUID, such as 67e55044-10b1-426f-9247-bb680e5fe0c8")
        })
}

fn internal(e: &sqlx::Error) -> ApiError {
    // Log the kind of failure, never a value: errors from envelope carry no plaintext.
    tracing::error!(error = %e, "database or encryption failure");
    let message = match envelope_sqlx::envelope_error(e) {
        Some(
            envelope_core::Error::Kms(_)
            | envelope_core::Error::Unavailable(envelope_core::Unavailable::Timeout { .. })
            | envelope_core::Error::Unavailable(envelope_core::Unavailable::WriteKey { .. }),
        ) => "the key service is unavailable; try again shortly",
        _ => "internal error",
    };
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, message.into())
}

/// A customer as clients send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerInput {
    name: String,
    email: String,
    #[serde(default)]
    phone: Option<String>,
    #[serde(default)]
    national_id: Option<String>,
    #[serde(default)]
    notes: Option<serde_json::Value>,
}

impl CustomerInput {
    fn validate(&self) -> Result<(), ApiError> {
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(bad_request("`name` must be 1 to 200 characters"));
        }
        let email = self.email.trim();
        if email.len() > 320
            || !email.contains('@')
            || email.starts_with('@')
            || email.ends_with('@')
        {
            return Err(bad_request("`email` must be an e-mail address"));
        }
        if self.phone.as_ref().is_some_and(|p| p.len() > 64) {
            return Err(bad_request("`phone` must be at most 64 characters"));
        }
        if self.national_id.as_ref().is_some_and(|p| p.len() > 64) {
            return Err(bad_request("`national_id` must be at most 64 characters"));
        }
        Ok(())
    }
}

/// A customer as the service returns it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct CustomerOutput {
    id: String,
    name: String,
    email: String,
    phone: Option<String>,
    national_id: Option<String>,
    notes: Option<serde_json::Value>,
}

#[derive(sqlx::FromRow)]
struct CustomerRow {
    id: String,
    name: String,
    email: Encrypted<String, CustomerEmail>,
    phone: Option<Encrypted<String, CustomerPhone>>,
    national_id: Option<Encrypted<String, CustomerNationalId>>,
    notes: Option<Encrypted<AsJson<serde_json::Value>, CustomerNotes>>,
}

impl From<CustomerRow> for CustomerOutput {
    fn from(r: CustomerRow) -> Self {
        CustomerOutput {
            id: r.id,
            name: r.name,
            email: r.email.into_inner(),
            phone: r.phone.map(Encrypted::into_inner),
            national_id: r.national_id.map(Encrypted::into_inner),
            notes: r.notes.map(|n| n.into_inner().0),
        }
    }
}

const COLUMNS: &str = "id, name, email, phone, national_id, notes";

fn body(payload: Result<Json<CustomerInput>, JsonRejection>) -> Result<CustomerInput, ApiError> {
    let Json(input) = payload.map_err(|r| ApiError(r.status(), r.body_text()))?;
    input.validate()?;
    Ok(input)
}

/// Bind the customer's fields in column order: name, email, email_bidx, phone, national_id,
/// notes. Sealing happens here, in `Encode`.
fn bind_fields(
    query: sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments>,
    input: CustomerInput,
) -> Result<sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments>, ApiError> {
    let bidx = email_index(&input.email)?;
    Ok(query
        .bind(input.name.trim().to_owned())
        .bind(Encrypted::<String, CustomerEmail>::new(
            input.email.trim().to_owned(),
        ))
        .bind(bidx)
        .bind(input.phone.map(Encrypted::<String, CustomerPhone>::new))
        .bind(
            input
                .national_id
                .map(Encrypted::<String, CustomerNationalId>::new),
        )
        .bind(
            input
                .notes
                .map(|n| Encrypted::<_, CustomerNotes>::new(AsJson(n))),
        ))
}

fn email_index(email: &str) -> Result<BlindIndex<CustomerEmailIndex>, ApiError> {
    BlindIndex::of(email).map_err(key_service_unavailable)
}

/// The probes of a lookup: one per live index key, so rows are found throughout
/// `envelope rotate --index customers.email`.
fn email_probes(email: &str) -> Result<Vec<BlindIndex<CustomerEmailIndex>>, ApiError> {
    BlindIndex::probes(email).map_err(key_service_unavailable)
}

fn key_service_unavailable(e: envelope_core::Error) -> ApiError {
    tracing::error!(error = %e, "blind index");
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "the key service is unavailable; try again shortly".into(),
    )
}

async fn create(
    State(app): State<App>,
    payload: Result<Json<CustomerInput>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let input = body(payload)?;
    let id = uuid::Uuid::new_v4().to_string();
    let a = &app.inner;
    let sql = format!(
        "INSERT INTO {} (id, name, email, email_bidx, phone, national_id, notes) VALUES ({})",
        a.table,
        a.dialect.placeholders(1, 7)
    );
    let query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.clone());
    bind_fields(query, input)?
        .execute(&a.pool)
        .await
        .map_err(|e| internal(&e))?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "id": id }))))
}

async fn read(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<CustomerOutput>, ApiError> {
    let id = customer_id(&id)?;
    let a = &app.inner;
    let sql = format!(
        "SELECT {COLUMNS} FROM {} WHERE id = {}",
        a.table,
        a.dialect.placeholder(1)
    );
    let row: Option<CustomerRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&a.pool)
        .await
        .map_err(|e| internal(&e))?;
    row.map(|r| Json(r.into())).ok_or_else(not_found)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    email: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
}

/// The default and the largest page of `GET /customers`.
const PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

async fn list_or_find(
    State(app): State<App>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<CustomerOutput>>, ApiError> {
    let Query(q) = query.map_err(|r| bad_request(r.body_text()))?;
    match q.email {
        Some(_) if q.limit.is_some() || q.after.is_some() => Err(bad_request(
            "`email` finds customers; `limit` and `after` page through the list: use one or the other",
        )),
        Some(email) => find_by_email(&app, &email).await,
        None => list(&app, q.limit, q.after.as_deref()).await,
    }
}

async fn list(
    app: &App,
    limit: Option<u32>,
    after: Option<&str>,
) -> Result<Json<Vec<CustomerOutput>>, ApiError> {
    let limit = limit.unwrap_or(PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(bad_request(format!(
            "`limit` is 1 to {MAX_PAGE}, got {limit}"
        )));
    }
    let after = after.map(customer_id).transpose()?;
    let a = &app.inner;
    let filter = match after {
        Some(_) => format!("WHERE id > {}", a.dialect.placeholder(1)),
        None => String::new(),
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM {} {filter} ORDER BY id LIMIT {limit}",
        a.table
    );
    let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
    if let Some(after) = after {
        query = query.bind(after);
    }
    let rows: Vec<CustomerRow> = query.fetch_all(&a.pool).await.map_err(|e| internal(&e))?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

async fn find_by_email(app: &App, email: &str) -> Result<Json<Vec<CustomerOutput>>, ApiError> {
    if email.trim().is_empty() {
        return Err(bad_request("the query parameter `email` is empty"));
    }
    let a = &app.inner;
    let probes = email_probes(email)?;
    let sql = format!(
        "SELECT {COLUMNS} FROM {} WHERE email_bidx IN ({})",
        a.table,
        a.dialect.placeholders(1, probes.len())
    );
    let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
    for probe in probes {
        query = query.bind(probe);
    }
    let rows: Vec<CustomerRow> = query.fetch_all(&a.pool).await.map_err(|e| internal(&e))?;
    // A truncated index can match an unrelated value now and then: confirm on the plaintext.
    let wanted = Normalizer::CaseFolded.apply(email).into_owned();
    Ok(Json(
        rows.into_iter()
            .filter(|r| Normalizer::CaseFolded.apply(&r.email) == wanted)
            .map(Into::into)
            .collect(),
    ))
}

async fn replace(
    State(app): State<App>,
    Path(id): Path<String>,
    payload: Result<Json<CustomerInput>, JsonRejection>,
) -> Result<Json<CustomerOutput>, ApiError> {
    let id = customer_id(&id)?;
    let input = body(payload)?;
    let a = &app.inner;
    let p = |n| a.dialect.placeholder(n);
    let sql = format!(
        "UPDATE {} SET name = {}, email = {}, email_bidx = {}, phone = {}, national_id = {}, notes = {} WHERE id = {}",
        a.table,
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7)
    );
    let done = bind_fields(sqlx::query(sqlx::AssertSqlSafe(sql)), input)?
        .bind(id.clone())
        .execute(&a.pool)
        .await
        .map_err(|e| internal(&e))?;
    // Read back what was stored; an unknown id answers 404 there. (MySQL reports no affected
    // rows for an update that changed nothing, so the count cannot tell a missing row.)
    let _ = done;
    read(State(app.clone()), Path(id)).await
}

async fn remove(State(app): State<App>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let id = customer_id(&id)?;
    let a = &app.inner;
    let sql = format!(
        "DELETE FROM {} WHERE id = {}",
        a.table,
        a.dialect.placeholder(1)
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .execute(&a.pool)
        .await
        .map_err(|e| internal(&e))?;
    if done.rows_affected() == 0 {
        return Err(not_found());
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn metrics(State(app): State<App>) -> Json<envelope_core::MetricsSnapshot> {
    Json(app.inner.keyring.metrics())
}

/// The process's Prometheus recorder, installed at the first `App::start`. `None` when the
/// embedding program installed a `metrics` recorder of its own: envelope reports to that one.
fn prometheus() -> Option<&'static metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .inspect_err(|e| tracing::warn!(error = %e, "no Prometheus recorder"))
                .ok()
        })
        .as_ref()
}

async fn prometheus_text() -> Response {
    match prometheus() {
        Some(handle) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed in this process: read the metrics there".into(),
        )
        .into_response(),
    }
}
