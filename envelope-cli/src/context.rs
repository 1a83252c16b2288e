//! The services every command shares: the database, its plan, the key table, the KMS
//! providers and the keyring, each made from the configuration in one way.

use std::sync::Arc;

use envelope_core::kms::Connected;
use envelope_core::{KeyFilter, KeyRecord, KeyStore, Keyring};
use envelope_sqlx::SqlxKeyStore;

use crate::config::{Config, KeyUri, TableConfig};
use crate::db::Db;
use crate::error::Failure;
use crate::plan::{self, TablePlan};
use crate::sql::Dialect;

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

/// A pool of `connections` to the configured database.
pub(crate) async fn connect(config: &Config, connections: u32) -> Result<Db, Failure> {
    Db::connect(&config.database_url, connections)
        .await
        .map_err(Failure::Connect)
}

/// The selected tables as the database has them, or what does not fit.
pub(crate) async fn plan(db: &Db, tables: &[TableConfig]) -> Result<Vec<TablePlan>, Failure> {
    match plan::plan(db, tables).await? {
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
        _ => Failure::core(format!("kms = {uri}"), e),
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
            let url = Dialect::MySql.driver_url(url);
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
    pub(crate) async fn create(&self) -> Result<(), envelope_core::StoreError> {
        match self {
            KeyTable::Postgres(s) => s.create_table().await,
            KeyTable::MySql(s) => s.create_table().await,
            KeyTable::Sqlite(s) => s.create_table().await,
        }
    }
}

/// The keyring: `kms` and the `also_read` master keys, over the configured key table.
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
    .map_err(|e| Failure::core("starting the keyring", e))
}

/// The key table and the job table must exist: the writing commands never create them.
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

/// Every key row.
pub(crate) async fn all_keys(store: &Arc<dyn KeyStore>) -> Result<Vec<KeyRecord>, Failure> {
    store
        .list(&KeyFilter::all())
        .await
        .map_err(|e| Failure::store("reading the key table", e))
}

/// The key table must exist: these commands never create it.
pub(crate) async fn open_key_table(config: &Config) -> Result<(Db, Arc<dyn KeyStore>), Failure> {
    let db = connect(config, 2).await?;
    if !db.key_table_exists(&config.key_table).await? {
        return Err(Failure::Usage(format!(
            "the key table {} does not exist: check key_table (or run `envelope init`)",
            config.key_table
        )));
    }
    let (store, _) = key_store(config)?;
    Ok((db, store))
}
