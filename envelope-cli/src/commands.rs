//! The operator commands over a configured database: `init`, `encrypt`, `decrypt`, `rotate`,
//! `verify` and `status`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use envelope_core::kms::Connected;
use envelope_core::{KeyFilter, KeyId, KeyKind, KeyStore, Keyring};
use envelope_sqlx::SqlxKeyStore;
use sqlx::Row;

use crate::config::{Config, Form, KeyUri, TableConfig};
use crate::db::{self, Context, Db, DbError, Dialect, TablePlan};
use crate::engine::{ColumnJob, Engine, Op, Settings, Stop};
use crate::job::{Exclusive, Jobs};
use crate::report::{Output, Reporter, Summary};

/// How a command ended, with its exit code.
#[derive(Debug)]
pub enum Failure {
    /// 1: values that fail, plaintext left, or values left untouched.
    Found(String),
    /// 2: bad usage or configuration.
    Usage(String),
    /// 3: the database or the KMS cannot be reached.
    Unavailable(String),
    /// 130: SIGINT or SIGTERM; the current batch was committed.
    Interrupted,
}

impl Failure {
    /// The process exit code.
    pub fn code(&self) -> u8 {
        match self {
            Failure::Found(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Unavailable(_) => 3,
            Failure::Interrupted => 130,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Found(m) | Failure::Usage(m) | Failure::Unavailable(m) => f.write_str(m),
            Failure::Interrupted => f.write_str(
                "interrupted: the last batch was committed and checkpointed; run the same command again to resume",
            ),
        }
    }
}

impl From<DbError> for Failure {
    fn from(e: DbError) -> Self {
        if e.is_unreachable() {
            Failure::Unavailable(format!(
                "{e} (is the database running, and is database_url right?)"
            ))
        } else {
            Failure::Usage(e.to_string())
        }
    }
}

impl From<Stop> for Failure {
    fn from(s: Stop) -> Self {
        match s {
            Stop::Interrupted => Failure::Interrupted,
            Stop::Unavailable(m) => Failure::Unavailable(m),
            Stop::Failed(m) => Failure::Found(m),
        }
    }
}

pub(crate) fn core_failure(context: &str, e: envelope_core::Error) -> Failure {
    use envelope_core::Error as E;
    match e {
        E::Config(_) | E::Misuse(_) | E::MasterKeyMissing(_) => {
            Failure::Usage(format!("{context}: {}", e.report()))
        }
        _ => Failure::Unavailable(format!("{context}: {}", e.report())),
    }
}

/// Options shared by the migration commands.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Only this table.
    pub table: Option<String>,
    /// Only this column (its `name`).
    pub column: Option<String>,
    /// The engine's settings.
    pub settings: Settings,
    /// How progress and the summary are shown.
    pub output: Output,
}

/// The selected tables, with only the selected columns.
pub(crate) fn select(
    config: &Config,
    table: Option<&str>,
    column: Option<&str>,
) -> Result<Vec<TableConfig>, Failure> {
    let mut out = Vec::new();
    for t in &config.tables {
        if table.is_some_and(|n| n != t.name) {
            continue;
        }
        let mut t = t.clone();
        t.columns.retain(|c| column.is_none_or(|n| n == c.name));
        if !t.columns.is_empty() {
            out.push(t);
        }
    }
    if out.is_empty() {
        return Err(Failure::Usage(match (table, column) {
            (None, None) => {
                "the configuration names no [[table]]: add the tables and columns to encrypt".into()
            }
            _ => format!(
                "no configured column matches --table {} --column {}",
                table.unwrap_or("*"),
                column.unwrap_or("*")
            ),
        }));
    }
    Ok(out)
}

pub(crate) async fn connect(config: &Config, connections: u32) -> Result<Db, Failure> {
    Db::connect(&config.database_url, connections)
        .await
        .map_err(|e| match e.source {
            sqlx::Error::Configuration(_) => Failure::Usage(e.to_string()),
            _ => Failure::Unavailable(format!(
                "{e} (check database_url, and that the server is running)"
            )),
        })
}

pub(crate) async fn plan(db: &Db, tables: &[TableConfig]) -> Result<Vec<TablePlan>, Failure> {
    match db::plan(db, tables).await? {
        Ok(plans) => Ok(plans),
        Err(problems) => Err(Failure::Usage(format!(
            "the configuration does not match the database (nothing was written):\n  - {}",
            problems.join("\n  - ")
        ))),
    }
}

/// The KMS provider and CMK of a key URI. Credentials come from the environment only.
pub(crate) async fn provider(uri: &KeyUri) -> Result<Connected, Failure> {
    uri.connect().await.map_err(|e| match (uri, &e) {
        (KeyUri::Local { path }, _) => Failure::Usage(format!(
            "kms = {uri}: {e} (create one with `envelope keygen --out {}`)",
            path.display()
        )),
        (_, envelope_core::Error::Config(_)) => Failure::Usage(format!("kms = {uri}: {e}")),
        _ => core_failure(&format!("kms = {uri}"), e),
    })
}

/// What the configured `also_read` URIs add to the CLI's keyring.
pub(crate) struct Readers {
    /// Other KMSs, each with the master key its URI names.
    pub(crate) kmss: Vec<Connected>,
    /// Further master keys of the KMS `kms` names (where a rewrap within one KMS moves keys
    /// to or from), read by `kms`'s own provider.
    pub(crate) own_cmks: Vec<String>,
}

/// The providers and master keys of the configured `also_read` URIs. The keyring unwraps a key
/// only under a master key named here or by `kms`: never on the key row's own word.
pub(crate) async fn readers(config: &Config) -> Result<Readers, Failure> {
    let mut readers = Readers {
        kmss: Vec::new(),
        own_cmks: Vec::new(),
    };
    for uri in &config.also_read {
        if uri.same_kms(&config.kms) {
            // `kms`'s own provider reads its keys (a local key file names no master key: the
            // local provider knows the keys it holds).
            readers.own_cmks.extend(uri.cmk().map(str::to_owned));
            continue;
        }
        readers.kmss.push(provider(uri).await?);
    }
    Ok(readers)
}

/// The key table of the configured database.
pub(crate) fn key_store(config: &Config) -> Result<(Arc<dyn KeyStore>, KeyTable), Failure> {
    let url = &config.database_url;
    let table = &config.key_table;
    let bad = |e: envelope_core::Error| Failure::Usage(format!("key_table {table}: {e}"));
    Ok(match Dialect::of_url(url) {
        Some(Dialect::Postgres) => {
            let s = Arc::new(
                SqlxKeyStore::<sqlx::Postgres>::connect_lazy(url)
                    .and_then(|s| s.with_table(table))
                    .map_err(bad)?,
            );
            (s.clone(), KeyTable::Postgres(s))
        }
        Some(Dialect::MySql) => {
            let url = url.replacen("mariadb:", "mysql:", 1);
            let s = Arc::new(
                SqlxKeyStore::<sqlx::MySql>::connect_lazy(&url)
                    .and_then(|s| s.with_table(table))
                    .map_err(bad)?,
            );
            (s.clone(), KeyTable::MySql(s))
        }
        Some(Dialect::Sqlite) => {
            let s = Arc::new(
                SqlxKeyStore::<sqlx::Sqlite>::connect_lazy(url)
                    .and_then(|s| s.with_table(table))
                    .map_err(bad)?,
            );
            (s.clone(), KeyTable::Sqlite(s))
        }
        None => {
            return Err(Failure::Usage(
                "database_url must start with postgres://, mysql:// or sqlite:".into(),
            ));
        }
    })
}

/// The typed store, for creating its table.
pub(crate) enum KeyTable {
    Postgres(Arc<SqlxKeyStore<sqlx::Postgres>>),
    MySql(Arc<SqlxKeyStore<sqlx::MySql>>),
    Sqlite(Arc<SqlxKeyStore<sqlx::Sqlite>>),
}

impl KeyTable {
    async fn create(&self) -> Result<(), envelope_core::StoreError> {
        match self {
            KeyTable::Postgres(s) => s.create_table().await,
            KeyTable::MySql(s) => s.create_table().await,
            KeyTable::Sqlite(s) => s.create_table().await,
        }
    }
}

pub(crate) async fn keyring(config: &Config) -> Result<Keyring, Failure> {
    let Connected { kms, cmk } = provider(&config.kms).await?;
    let readers = readers(config).await?;
    let (store, _) = key_store(config)?;
    let scope = config.scope.clone();
    // `build` reads the key table through the keyring's own runtime: off the async threads.
    tokio::task::spawn_blocking(move || {
        let mut builder = Keyring::builder(kms, store).cmk(cmk);
        for cmk in readers.own_cmks {
            builder = builder.trust_cmk(cmk);
        }
        for reader in readers.kmss {
            builder = builder.also_read(reader);
        }
        if let Some(scope) = scope {
            builder = builder.default_scope(scope);
        }
        builder.build()
    })
    .await
    .map_err(|e| Failure::Unavailable(format!("starting the keyring: {e}")))?
    .map_err(|e| core_failure("starting the keyring", e))
}

pub(crate) async fn require_tables(db: &Db, config: &Config) -> Result<(), Failure> {
    for (what, name, exists) in [
        (
            "key table",
            &config.key_table,
            db.key_table_exists(&config.key_table).await?,
        ),
        (
            "job table",
            &config.job_table,
            db.table_exists(&config.job_table).await?,
        ),
    ] {
        if !exists {
            return Err(Failure::Usage(format!(
                "the {what} {name} does not exist: run `envelope init` first"
            )));
        }
    }
    Ok(())
}

/// How long `envelope init` retries a KMS that fails with a transient error.
const INIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// `envelope init`: create the key table and the job table (idempotent), and check that the
/// KMS answers by making a data key (retired at once: it is never used).
///
/// # Errors
/// A [`Failure`].
pub async fn init(config: &Config, output: &Output) -> Result<(), Failure> {
    let db = connect(config, 2).await?;
    let (_, table) = key_store(config)?;
    table.create().await.map_err(|e| {
        Failure::Unavailable(format!("creating the key table {}: {e}", config.key_table))
    })?;
    Jobs::new(db.clone(), &config.job_table)
        .create_table(&config.job_table)
        .await?;
    let keyring = keyring(config).await?;
    // A transient KMS failure (a throttled or briefly failing service) is retried for a while
    // before init reports the KMS unreachable.
    crate::keys::retrying("making a data key", INIT_PATIENCE, || keyring.warm())
        .await
        .map_err(|e| core_failure(&format!("making a data key with kms = {}", config.kms), e))?;
    // That key was made only to show that the KMS answers: it takes no writes.
    keyring
        .retire_active_keys()
        .await
        .map_err(|e| core_failure("retiring the test data key", e))?;
    output.line(
        &format!(
            "ready: key table {}, job table {}, KMS {} answers",
            config.key_table, config.job_table, config.kms
        ),
        serde_json::json!({
            "event": "init",
            "key_table": config.key_table,
            "job_table": config.job_table,
            "kms": config.kms.to_string(),
        }),
    );
    Ok(())
}

/// What `rotate` selects.
#[derive(Clone, Debug, Default)]
pub struct RotateSelection {
    /// These key ids.
    pub keys: Vec<KeyId>,
    /// Keys created longer ago than this.
    pub older_than: Option<Duration>,
    /// Keys already retired.
    pub retired: bool,
}

/// `envelope encrypt`, `decrypt`, `rotate` and `verify`.
///
/// # Errors
/// A [`Failure`] with its exit code.
pub async fn migrate(
    config: &Config,
    op: Op,
    rotate: Option<RotateSelection>,
    opts: RunOptions,
    stop: Arc<AtomicBool>,
) -> Result<(), Failure> {
    let tables = select(config, opts.table.as_deref(), opts.column.as_deref())?;
    let db = connect(config, opts.settings.workers as u32 + 2).await?;
    let plans = plan(&db, &tables).await?;
    let read_only = matches!(op, Op::Verify) || opts.settings.dry_run;
    if !matches!(op, Op::Verify) {
        require_tables(&db, config).await?;
    } else if !db.key_table_exists(&config.key_table).await? {
        return Err(Failure::Usage(format!(
            "the key table {} does not exist: check key_table (or run `envelope init`)",
            config.key_table
        )));
    }
    let keyring = keyring(config).await?;
    if matches!(op, Op::Encrypt | Op::Rotate(_)) && !read_only {
        // The first data key is committed to the key table before any value uses it.
        crate::keys::retrying("making a data key", opts.settings.patience, || {
            keyring.warm()
        })
        .await
        .map_err(|e| core_failure(&format!("making a data key with kms = {}", config.kms), e))?;
    }
    let jobs = Jobs::new(db.clone(), &config.job_table);
    // One command at a time on a column, and no pass resumed over another command's writes.
    if !read_only {
        for t in &plans {
            for c in &t.columns {
                let name = format!("{}:{}.{}", op.name(), t.name, c.config.name);
                match jobs.claim_column(&name).await {
                    Ok(None) => {}
                    Ok(Some(note)) => opts.output.line(
                        &note,
                        serde_json::json!({"event": "pass_restarted", "job": name}),
                    ),
                    Err(Exclusive::Busy(other)) => {
                        return Err(Failure::Usage(format!(
                            "{other} is working on {}.{} (its leases are live: a process runs it, or was killed less than --lease ago); wait for it, or stop it, before running {} (nothing was written)",
                            t.name,
                            c.config.name,
                            op.name()
                        )));
                    }
                    Err(Exclusive::Db(e)) => return Err(e.into()),
                }
            }
        }
    }

    // Rotation: which keys, decided once (or taken from the interrupted run being resumed).
    let (op, params) = match (op, rotate) {
        (Op::Rotate(_), Some(selection)) => {
            let (keys, params) =
                rotation_keys(&keyring, &jobs, &plans, selection, read_only).await?;
            (Op::Rotate(Arc::new(keys)), Some(params))
        }
        (op, _) => (op, None),
    };

    let mut columns = Vec::new();
    for t in &plans {
        for c in &t.columns {
            columns.push(Arc::new(ColumnJob::new(
                t.clone(),
                c.clone(),
                op.clone(),
                params.clone(),
                opts.settings.limit,
            )));
        }
    }
    for job in &columns {
        let sql = format!(
            "SELECT {} FROM {}",
            db.dialect.int("COUNT(*)"),
            job.table.table
        );
        let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&db.pool)
            .await
            .context(|| format!("counting the rows of {}", job.table.name))?;
        job.stats.total.store(total, Ordering::Relaxed);
    }

    let engine = Arc::new(Engine::new(db, jobs, keyring, opts.settings.clone(), stop));
    let reporter = Reporter::start(&opts.output, &op, &columns);
    let mut outcome = Ok(());
    for job in &columns {
        let r = engine.run(job.clone()).await;
        reporter.column_done(job);
        if let Err(stop) = r {
            outcome = Err(stop);
            break;
        }
    }
    reporter.finish();

    let summary = Summary::of(&op, &columns, opts.settings.dry_run);
    opts.output.summary(&summary);
    outcome?;
    if let Some(problem) = summary.problem(&op) {
        return Err(Failure::Found(problem));
    }
    Ok(())
}

async fn rotation_keys(
    keyring: &Keyring,
    jobs: &Jobs,
    plans: &[TablePlan],
    selection: RotateSelection,
    read_only: bool,
) -> Result<(HashSet<KeyId>, String), Failure> {
    let parse = |params: &str| -> Option<HashSet<KeyId>> {
        let ids: Vec<String> = serde_json::from_str(params).ok()?;
        ids.iter().map(|s| s.parse().ok()).collect()
    };
    if !read_only {
        for t in plans {
            for c in &t.columns {
                let name = format!("rotate:{}.{}", t.name, c.config.name);
                if let Some(Some(params)) = jobs.unfinished_params(&name).await?
                    && let Some(keys) = parse(&params)
                {
                    return Ok((keys, params));
                }
            }
        }
    }
    let scope = keyring.default_scope().as_str().to_owned();
    let filter = KeyFilter {
        kind: Some(KeyKind::Data),
        scope: Some(scope.clone()),
        include_retired: true,
        ..KeyFilter::default()
    };
    let store = keyring.store().clone();
    let all = store
        .list(&filter)
        .await
        .map_err(|e| Failure::Unavailable(format!("reading the key table: {e}")))?;
    for id in &selection.keys {
        if !all.iter().any(|k| k.id == *id) {
            return Err(Failure::Usage(format!(
                "--key {id}: no data key of scope {scope} has this id (see `envelope status`)"
            )));
        }
    }
    let cutoff = selection
        .older_than
        .and_then(|d| SystemTime::now().checked_sub(d));
    let any_selector =
        !selection.keys.is_empty() || selection.older_than.is_some() || selection.retired;
    let chosen: Vec<_> = all
        .iter()
        .filter(|k| {
            !any_selector
                || selection.keys.contains(&k.id)
                || cutoff.is_some_and(|c| k.created_at < c)
                || (selection.retired && k.retired_at.is_some())
        })
        .collect();
    // New writes must not go on under a key being rotated away: start a new one first.
    let mut keys: HashSet<KeyId> = chosen.iter().map(|k| k.id).collect();
    if !read_only && (!any_selector || chosen.iter().any(|k| k.retired_at.is_none())) {
        let new = keyring
            .rotate(keyring.default_scope())
            .await
            .map_err(|e| core_failure("making the new data key", e))?;
        keys.remove(&new);
    }
    // The rotated keys take no more writes from anyone: running applications move to new keys
    // within their key_refresh, so the pass does not chase values written under them.
    if !read_only {
        let now = SystemTime::now();
        for k in chosen
            .iter()
            .filter(|k| k.retired_at.is_none() && keys.contains(&k.id))
        {
            store.retire(&k.id, now).await.map_err(|e| {
                Failure::Unavailable(format!("retiring the rotated key {}: {e}", k.id))
            })?;
        }
    }
    let mut ids: Vec<String> = keys.iter().map(KeyId::to_hex).collect();
    ids.sort();
    let params = serde_json::to_string(&ids).unwrap_or_default();
    Ok((keys, params))
}

/// `envelope status`: values per key id per column, and the job table's progress.
///
/// # Errors
/// A [`Failure`].
pub async fn status(config: &Config, output: &Output) -> Result<(), Failure> {
    let tables = select(config, None, None)?;
    let db = connect(config, 2).await?;
    let plans = plan(&db, &tables).await?;
    let mut columns = Vec::new();
    for t in &plans {
        for c in &t.columns {
            let per_key = values_per_key(&db, t, c).await?;
            columns.push(serde_json::json!({
                "table": t.name,
                "column": c.config.name,
                "label": c.config.label.as_str(),
                "per_key": per_key,
            }));
        }
    }
    let jobs = if db.table_exists(&config.job_table).await? {
        Jobs::new(db.clone(), &config.job_table).summary().await?
    } else {
        Vec::new()
    };
    output.status(&columns, &jobs);
    Ok(())
}

/// How many values of a column each key id holds (`not-an-envelope` for values whose header is
/// not an envelope's; `verify` tells which really open).
pub(crate) async fn values_per_key(
    db: &Db,
    t: &TablePlan,
    c: &db::ColumnPlan,
) -> Result<BTreeMap<String, i64>, Failure> {
    let d = db.dialect;
    let what = || format!("counting values of {}.{}", t.name, c.config.name);
    match c.config.form {
        Form::Binary => {
            // One SQL expression on the key id at offset 2.
            let col = &c.target;
            let header_ok = match d {
                Dialect::Postgres => {
                    format!("get_byte({col}, 0) = 1 AND octet_length({col}) >= 47")
                }
                Dialect::MySql => format!("ASCII({col}) = 1 AND LENGTH({col}) >= 47"),
                Dialect::Sqlite => format!("substr({col}, 1, 1) = x'01' AND length({col}) >= 47"),
            };
            let sql = format!(
                "SELECT CASE WHEN {header_ok} THEN {} ELSE 'not-an-envelope' END AS envelope_key, {} \
                 FROM {} WHERE {col} IS NOT NULL GROUP BY envelope_key ORDER BY envelope_key",
                d.key_id_hex(col),
                d.int("COUNT(*)"),
                t.table
            );
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_all(&db.pool)
                .await
                .context(what)?;
            Ok(rows
                .iter()
                .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?)))
                .collect::<Result<_, sqlx::Error>>()
                .context(what)?)
        }
        Form::Text => text_key_counts(db, t, &c.target).await,
    }
}

/// Key ids of a text-form column, counted by a keyset scan (the key id sits inside the base64).
async fn text_key_counts(
    db: &Db,
    t: &TablePlan,
    col: &str,
) -> Result<BTreeMap<String, i64>, Failure> {
    let d = db.dialect;
    let mut counts = BTreeMap::new();
    let mut last: Option<db::Pk> = None;
    loop {
        let sql = format!(
            "SELECT {}, {col} FROM {} WHERE {col} IS NOT NULL{} ORDER BY {} LIMIT 5000",
            t.pk_kind.read(d, &t.pk),
            t.table,
            if last.is_some() {
                format!(" AND {} > {}", t.pk, t.pk_kind.bound(&d.param(1)))
            } else {
                String::new()
            },
            t.pk
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(pk) = &last {
            q = pk.bind(q);
        }
        let rows = q
            .fetch_all(&db.pool)
            .await
            .context(|| format!("scanning {}", t.name))?;
        for row in &rows {
            let v: Option<String> = row.try_get(1).ok();
            let key = v
                .and_then(|s| envelope_core::format::from_text(&s).ok())
                .and_then(|b| envelope_core::format::peek_key_id(&b).ok())
                .map_or_else(|| "not-an-envelope".to_owned(), |k| k.to_hex());
            *counts.entry(key).or_default() += 1;
        }
        if rows.len() < 5000 {
            return Ok(counts);
        }
        last = rows
            .last()
            .map(|r| db::Pk::get(r, 0, t.pk_kind))
            .transpose()
            .context(|| format!("scanning {}", t.name))?;
    }
}
