//! The key lifecycle: `envelope keys list | rewrap | retire | shred`, and the blind-index key
//! rotation of `envelope rotate --index`.
//!
//! These commands touch the key table only, except `rotate --index`, which recomputes one
//! blind-index column, and the counts of `list --count` and `shred`, which read the configured
//! columns. docs/KEYS.md is the operator's guide.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tracing::Instrument as _;

use envelope_core::kms::Connected;
use envelope_core::{
    EncryptionContext, KeyFilter, KeyId, KeyKind, KeyRecord, KeyStore, KmsProvider, StoreError,
};

use crate::commands::{self, Failure, RunOptions};
use crate::config::{Config, KeyUri};
use crate::db::Db;
use crate::engine::Op;
use crate::report::Output;

/// Which keys `retire` and `shred` act on. Keys match if any selector matches.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// These key ids (data or index keys).
    pub keys: Vec<KeyId>,
    /// Every data key of this scope (a tenant's).
    pub scope: Option<String>,
    /// Every index key of this blind-index label. Scopes and labels share the key table's
    /// `scope` column, so they are selected apart: `--scope acme` never selects the index keys
    /// of a label that happens to be called `acme`.
    pub label: Option<String>,
    /// Data keys created longer ago than this.
    pub older_than: Option<Duration>,
}

impl Selection {
    fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.scope.is_none()
            && self.label.is_none()
            && self.older_than.is_none()
    }

    fn matches(&self, k: &KeyRecord, cutoff: Option<SystemTime>) -> bool {
        let named = |n: &Option<String>| n.as_deref() == Some(k.scope.as_str());
        self.keys.contains(&k.id)
            || (k.kind == KeyKind::Data && named(&self.scope))
            || (k.kind == KeyKind::Index && named(&self.label))
            || (k.kind == KeyKind::Data && cutoff.is_some_and(|c| k.created_at < c))
    }
}

fn store_failure(what: &str, e: StoreError) -> Failure {
    match e {
        StoreError::Backend(_) => Failure::Unavailable(format!("{what}: {e}")),
        StoreError::MissingTable { .. } => Failure::Usage(format!("{what}: {e}")),
        e => Failure::Found(format!("{what}: {e}")),
    }
}

fn time(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn key_json(k: &KeyRecord) -> serde_json::Value {
    serde_json::json!({
        "id": k.id.to_hex(),
        "kind": k.kind.as_str(),
        "scope": k.scope,
        "provider": k.provider,
        "cmk_id": k.cmk_id,
        "created_at": time(k.created_at),
        "retired_at": k.retired_at.map(time),
    })
}

async fn all_keys(store: &Arc<dyn KeyStore>) -> Result<Vec<KeyRecord>, Failure> {
    store
        .list(&KeyFilter::all())
        .await
        .map_err(|e| store_failure("reading the key table", e))
}

/// The key table must exist: these commands never create it.
async fn open_key_table(config: &Config) -> Result<(Db, Arc<dyn KeyStore>), Failure> {
    let db = commands::connect(config, 2).await?;
    if !db.key_table_exists(&config.key_table).await? {
        return Err(Failure::Usage(format!(
            "the key table {} does not exist: check key_table (or run `envelope init`)",
            config.key_table
        )));
    }
    let (store, _) = commands::key_store(config)?;
    Ok((db, store))
}

/// Values per key id, per configured column (`table.column`). Empty when no column is
/// configured.
async fn value_counts(
    config: &Config,
    db: &Db,
) -> Result<BTreeMap<String, BTreeMap<String, i64>>, Failure> {
    let mut out = BTreeMap::new();
    if config.tables.is_empty() {
        return Ok(out);
    }
    let tables = commands::select(config, None, None)?;
    for t in &commands::plan(db, &tables).await? {
        for c in &t.columns {
            for (key, n) in commands::values_per_key(db, t, c).await? {
                out.entry(key)
                    .or_insert_with(BTreeMap::new)
                    .insert(format!("{}.{}", t.name, c.config.name), n);
            }
        }
    }
    Ok(out)
}

/// `envelope keys list`: every key row, and with `count` the values of each configured column
/// under each key.
///
/// # Errors
/// A [`Failure`].
pub async fn list(
    config: &Config,
    scope: Option<&str>,
    count: bool,
    output: &Output,
) -> Result<(), Failure> {
    let (db, store) = open_key_table(config).await?;
    let keys: Vec<KeyRecord> = all_keys(&store)
        .await?
        .into_iter()
        .filter(|k| scope.is_none_or(|s| s == k.scope))
        .collect();
    let counts = if count {
        Some(value_counts(config, &db).await?)
    } else {
        None
    };
    if *output == Output::Json {
        for k in &keys {
            let mut json = key_json(k);
            if let Some(counts) = &counts {
                json["values"] =
                    serde_json::json!(counts.get(&k.id.to_hex()).cloned().unwrap_or_default());
            }
            println!("{}", serde_json::json!({"event": "key", "key": json}));
        }
        if let Some(counts) = &counts {
            for (key, columns) in counts
                .iter()
                .filter(|(id, _)| !keys.iter().any(|k| k.id.to_hex() == **id))
            {
                println!(
                    "{}",
                    serde_json::json!({"event": "values_without_key", "key_id": key, "values": columns})
                );
            }
        }
        return Ok(());
    }
    if keys.is_empty() {
        println!("no keys in {}", config.key_table);
    } else {
        println!(
            "{:<32}  {:<5}  {:<16}  {:<8}  {:<24}  {:<20}  RETIRED",
            "ID", "KIND", "SCOPE", "PROVIDER", "CMK", "CREATED"
        );
    }
    for k in &keys {
        println!(
            "{:<32}  {:<5}  {:<16}  {:<8}  {:<24}  {:<20}  {}",
            k.id,
            k.kind.as_str(),
            k.scope,
            k.provider,
            k.cmk_id,
            time(k.created_at),
            k.retired_at.map_or_else(|| "-".to_owned(), time)
        );
        if let Some(counts) = &counts {
            match counts.get(&k.id.to_hex()) {
                Some(columns) => {
                    for (column, n) in columns {
                        println!("    {column}: {n} values");
                    }
                }
                None if k.kind == KeyKind::Data => {
                    println!("    no values in the configured columns")
                }
                None => {}
            }
        }
    }
    if let Some(counts) = &counts {
        for (key, columns) in counts
            .iter()
            .filter(|(id, _)| !keys.iter().any(|k| k.id.to_hex() == **id))
        {
            let what = if key == "not-an-envelope" {
                "values that are not envelopes (plaintext?)".to_owned()
            } else {
                format!(
                    "values under key {key}, which is not in the key table (shredded, or from another database): unreadable"
                )
            };
            println!("{what}:");
            for (column, n) in columns {
                println!("    {column}: {n}");
            }
        }
    }
    Ok(())
}

/// `envelope keys retire`: the selected live keys take no more writes. Running keyrings notice
/// within their `Policy::key_refresh`.
///
/// # Errors
/// A [`Failure`].
pub async fn retire(
    config: &Config,
    selection: &Selection,
    output: &Output,
) -> Result<(), Failure> {
    if selection.is_empty() {
        return Err(Failure::Usage(
            "say which keys: --key ID, --scope S, --label L or --older-than D".into(),
        ));
    }
    let (_, store) = open_key_table(config).await?;
    let keys = all_keys(&store).await?;
    check_ids_exist(&keys, &selection.keys)?;
    let cutoff = selection
        .older_than
        .and_then(|d| SystemTime::now().checked_sub(d));
    let chosen: Vec<&KeyRecord> = keys
        .iter()
        .filter(|k| k.retired_at.is_none() && selection.matches(k, cutoff))
        .collect();
    let now = SystemTime::now();
    for k in &chosen {
        store
            .retire(&k.id, now)
            .await
            .map_err(|e| store_failure(&format!("retiring key {}", k.id), e))?;
        let note = if k.kind == KeyKind::Index {
            format!(
                "retired index key {} of {}: new rows get their index under a new key; lookups probe both; run `envelope rotate --index` to recompute the older rows",
                k.id, k.scope
            )
        } else {
            format!("retired data key {} (scope {})", k.id, k.scope)
        };
        output.line(
            &note,
            serde_json::json!({"event": "retired", "key": key_json(k)}),
        );
    }
    output.line(
        &format!(
            "{} key(s) retired; running applications stop writing under them within their Policy::key_refresh (60 s by default); their values stay readable",
            chosen.len()
        ),
        serde_json::json!({"event": "summary", "summary": {"retired": chosen.len()}}),
    );
    Ok(())
}

fn check_ids_exist(keys: &[KeyRecord], ids: &[KeyId]) -> Result<(), Failure> {
    for id in ids {
        if !keys.iter().any(|k| k.id == *id) {
            return Err(Failure::Usage(format!(
                "--key {id}: no key in the key table has this id (see `envelope keys list`)"
            )));
        }
    }
    Ok(())
}

/// `envelope keys shred`: count the values each selected key makes unreadable, confirm, and
/// delete the key rows (crypto-shredding).
///
/// # Errors
/// A [`Failure`]; [`Failure::Usage`] without confirmation.
pub async fn shred(
    config: &Config,
    selection: &Selection,
    safety: ShredSafety,
    output: &Output,
) -> Result<(), Failure> {
    let ShredSafety {
        yes,
        force,
        key_refresh,
    } = safety;
    if selection.keys.is_empty() && selection.scope.is_none() && selection.label.is_none() {
        return Err(Failure::Usage(
            "say which keys: --key ID, --scope S or --label L".into(),
        ));
    }
    let (db, store) = open_key_table(config).await?;
    let keys = all_keys(&store).await?;
    check_ids_exist(&keys, &selection.keys)?;
    let chosen: Vec<&KeyRecord> = keys.iter().filter(|k| selection.matches(k, None)).collect();
    if chosen.is_empty() {
        return Err(Failure::Usage(match (&selection.scope, &selection.label) {
            (Some(s), _) => format!("no data key has scope {s} (see `envelope keys list`)"),
            (_, Some(l)) => format!("no index key has label {l} (see `envelope keys list`)"),
            _ => "no key matches (see `envelope keys list`)".into(),
        }));
    }
    // A key that still takes writes (not retired, or retired so recently that running
    // keyrings have not read the key table since) would lose every value written after the
    // count, which the count cannot show.
    let now = SystemTime::now();
    let live: Vec<String> = chosen
        .iter()
        .filter_map(|k| match k.retired_at {
            None => Some(format!(
                "{} ({} {}): not retired",
                k.id,
                k.kind.as_str(),
                k.scope
            )),
            Some(at) if at + key_refresh > now => Some(format!(
                "{} ({} {}): retired {} ago, less than --key-refresh {key_refresh:?}",
                k.id,
                k.kind.as_str(),
                k.scope,
                humantime(now.duration_since(at).unwrap_or_default())
            )),
            Some(_) => None,
        })
        .collect();
    if !live.is_empty() && !force {
        return Err(Failure::Usage(format!(
            "refusing to shred keys that running applications may still write under (nothing was deleted):\n  - {}\nretire them first (`envelope keys retire --key ID`) and shred after --key-refresh (every application's Policy::key_refresh) has passed, or pass --force if you know every writer is gone",
            live.join("\n  - ")
        )));
    }
    let counts = value_counts(config, &db).await?;
    let counted: Vec<String> = config
        .tables
        .iter()
        .flat_map(|t| {
            t.columns
                .iter()
                .map(move |c| format!("{}.{}", t.name, c.name))
        })
        .collect();
    let mut total = 0i64;
    for k in &chosen {
        let columns = counts.get(&k.id.to_hex()).cloned().unwrap_or_default();
        total += columns.values().sum::<i64>();
        let human = if k.kind == KeyKind::Index {
            format!(
                "key {} (index {}): lookups through this blind index stop finding rows indexed under it, and new rows get a new index key; no value becomes unreadable",
                k.id, k.scope
            )
        } else if columns.is_empty() {
            format!(
                "key {} ({} {}): no values in the configured columns",
                k.id,
                k.kind.as_str(),
                k.scope
            )
        } else {
            let list: Vec<String> = columns.iter().map(|(c, n)| format!("{c}: {n}")).collect();
            format!(
                "key {} ({} {}): makes unreadable {}",
                k.id,
                k.kind.as_str(),
                k.scope,
                list.join(", ")
            )
        };
        output.line(
            &human,
            serde_json::json!({"event": "shred_plan", "key": key_json(k), "values": columns}),
        );
    }
    let scope_note = if counted.is_empty() {
        "the configuration names no [[table]], so no value under these keys was counted".to_owned()
    } else {
        format!(
            "counted only in the configured columns ({}); a data key seals every column of its scope, so values in columns envelope.toml does not list become unreadable too and were not counted",
            counted.join(", ")
        )
    };
    output.line(
        &scope_note,
        serde_json::json!({"event": "shred_counted", "columns": counted}),
    );
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::Usage(format!(
                "shred deletes {} key(s) for good, making {total} counted value(s) (and any in unlisted columns) unreadable: pass --yes to confirm (stdin is not a terminal, so it cannot ask); nothing was deleted",
                chosen.len()
            )));
        }
        eprint!(
            "This deletes {} key(s) for good; the {total} value(s) counted above, and any in columns not listed, can never be read again.\nType `shred` to confirm: ",
            chosen.len()
        );
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .map_err(|e| Failure::Usage(format!("reading the confirmation: {e}")))?;
        if answer.trim() != "shred" {
            return Err(Failure::Usage("not confirmed; nothing was deleted".into()));
        }
    }
    let mut deleted = 0;
    for k in &chosen {
        if store
            .delete(&k.id)
            .await
            .map_err(|e| store_failure(&format!("deleting key {}", k.id), e))?
        {
            deleted += 1;
        }
        output.line(
            &format!("deleted key {}", k.id),
            serde_json::json!({"event": "shredded", "key_id": k.id.to_hex()}),
        );
    }
    output.line(
        &format!(
            "{deleted} key(s) deleted; running applications drop them from their caches within their Policy::key_refresh (60 s by default). Backups of the key table still hold them: see docs/KEYS.md"
        ),
        serde_json::json!({"event": "summary", "summary": {"shredded": deleted, "values": total}}),
    );
    Ok(())
}

/// What stands between `keys shred` and a mistake.
#[derive(Clone, Copy, Debug)]
pub struct ShredSafety {
    /// Confirmed without asking (`--yes`).
    pub yes: bool,
    /// Shred keys that are not retired, or retired less than `key_refresh` ago (`--force`).
    pub force: bool,
    /// How long running applications may go without reading the key table.
    pub key_refresh: Duration,
}

fn humantime(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// Where `keys rewrap` moves keys, and the providers that can unwrap them where they are now.
struct Rewrapper {
    destination: KeyUri,
    to: Connected,
    /// The configured `kms` and `also_read` KMSs, by URI.
    sources: Vec<(KeyUri, Arc<dyn KmsProvider>)>,
    /// The master keys `kms` and `also_read` name, by provider name: the only ones a row may
    /// be moved from (a provider that knows its own keys, the local one, decides for itself).
    trusted: Vec<(&'static str, String)>,
}

impl Rewrapper {
    async fn new(config: &Config, destination: KeyUri) -> Result<Self, Failure> {
        let to = commands::provider(&destination).await?;
        let mut sources = Vec::new();
        let mut trusted = Vec::new();
        for uri in std::iter::once(&config.kms).chain(&config.also_read) {
            if let Some(cmk) = uri.cmk() {
                trusted.push((uri.provider_name(), cmk.to_owned()));
            }
            if sources.iter().any(|(u, _): &(KeyUri, _)| u.same_kms(uri)) {
                continue;
            }
            let kms = if uri.same_kms(&destination) {
                to.kms.clone()
            } else {
                commands::provider(uri).await?.kms
            };
            sources.push((uri.clone(), kms));
        }
        Ok(Rewrapper {
            destination,
            to,
            sources,
            trusted,
        })
    }

    fn provider(&self) -> &str {
        self.to.kms.name()
    }

    fn done(&self, k: &KeyRecord) -> bool {
        k.provider == self.provider() && k.cmk_id == self.to.cmk
    }

    /// The key wrapped under the destination, from its row as it is now. Within one KMS the KMS
    /// rewraps it (ReEncrypt: the key never leaves Tencent or AWS); across KMSs the source
    /// unwraps it and the destination wraps it (the key passes through this process's memory
    /// only, as on every read).
    async fn rewrap(
        &self,
        record: &KeyRecord,
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, envelope_core::Error> {
        let Some((uri, source)) = self
            .sources
            .iter()
            .find(|(_, kms)| kms.name() == record.provider)
        else {
            let configured: Vec<String> = self.sources.iter().map(|(u, _)| u.to_string()).collect();
            return Err(envelope_core::Error::Config(
                envelope_core::ConfigError::new(
                    "also_read",
                    format!(
                        "it is wrapped by the '{}' KMS, which neither kms nor also_read names ({}): add that KMS's key URI to also_read",
                        record.provider,
                        configured.join(", ")
                    ),
                ),
            ));
        };
        let to = &self.to;
        let unwrapper = if uri.same_kms(&self.destination) {
            &to.kms
        } else {
            source
        };
        // The row's master key must be one the configuration names (N1 of the 2026-12-05
        // review): a row edited to name another key the credentials can use, and to hold a key
        // wrapped under it, passes every KMS-side check, and rewrapping it would launder the
        // substituted key under the destination, where every keyring trusts it.
        if unwrapper.holds_cmk(&record.cmk_id).is_none()
            && !self
                .trusted
                .iter()
                .any(|(p, c)| *p == record.provider && *c == record.cmk_id)
        {
            return Err(envelope_core::Error::Config(
                envelope_core::ConfigError::new(
                    "also_read",
                    format!(
                        "it names {} master key '{}', which neither kms nor also_read names, so it is not moved: if keys under that master key are yours, add its key URI to also_read (the applications must trust it too); otherwise the key table was edited",
                        record.provider, record.cmk_id
                    ),
                ),
            ));
        }
        // The same `envelope.kms` spans as the keyring's calls: provider and action, no body.
        let span = |provider: &str, action: &'static str| tracing::debug_span!(target: "envelope::kms", "envelope.kms", provider, action, key_id = %record.id);
        if uri.same_kms(&self.destination) {
            let call =
                to.kms
                    .re_encrypt(&record.wrapped, &record.cmk_id, context, &to.cmk, context);
            return Ok(call.instrument(span(to.kms.name(), "re_encrypt")).await?);
        }
        let key = source
            .decrypt(&record.cmk_id, &record.wrapped, context)
            .instrument(span(source.name(), "decrypt"))
            .await?;
        Ok(to
            .kms
            .encrypt(&to.cmk, &key, context)
            .instrument(span(to.kms.name(), "encrypt"))
            .await?)
    }
}

/// Retry a KMS or key-table call that failed for a reason worth retrying, for `patience`.
pub(crate) async fn retrying<T, F, Fut>(
    what: &str,
    patience: Duration,
    mut f: F,
) -> Result<T, envelope_core::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, envelope_core::Error>>,
{
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && started.elapsed() < patience => {
                eprintln!("envelope: {what}: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

fn transient(e: &envelope_core::Error) -> bool {
    match e {
        envelope_core::Error::Kms(k) => k.is_retryable(),
        envelope_core::Error::Unavailable(envelope_core::Unavailable::Timeout { .. }) => true,
        envelope_core::Error::Store(StoreError::Backend(_)) => true,
        _ => false,
    }
}

/// `envelope keys rewrap --to URI`: every key row not yet under the destination master key is
/// rewrapped under it (one KMS call per key), compare-and-set on its old wrapped bytes. No data
/// row is read or written; a rerun after a crash finishes the rest.
///
/// # Errors
/// A [`Failure`]: [`Failure::Found`] when some keys could not be rewrapped.
pub async fn rewrap(
    config: &Config,
    to: &str,
    patience: Duration,
    output: &Output,
    stop: Arc<AtomicBool>,
) -> Result<(), Failure> {
    let destination = KeyUri::parse(to).map_err(|e| Failure::Usage(format!("--to: {e}")))?;
    let rewrapper = Rewrapper::new(config, destination.clone()).await?;
    let cmk = rewrapper.to.cmk.clone();
    let (_, store) = open_key_table(config).await?;
    let keys = all_keys(&store).await?;
    let todo: Vec<&KeyRecord> = keys.iter().filter(|k| !rewrapper.done(k)).collect();
    let total = todo.len();
    output.line(
        &format!(
            "{total} of {} key(s) to rewrap under {destination} (CMK {cmk})",
            keys.len()
        ),
        serde_json::json!({"event": "rewrap_plan", "keys": keys.len(), "to_rewrap": total, "cmk_id": cmk}),
    );
    let (mut rewrapped, mut gone, mut failed) = (0usize, 0usize, Vec::new());
    let every = (total / 20).max(1);
    for (i, k) in todo.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            return Err(Failure::Interrupted);
        }
        match rewrap_one(&rewrapper, &store, k, patience).await {
            Ok(true) => rewrapped += 1,
            Ok(false) => gone += 1,
            Err(RewrapError::Unavailable(m)) => {
                return Err(Failure::Unavailable(format!(
                    "{m} ({rewrapped} key(s) rewrapped so far; run the same command again to finish)"
                )));
            }
            Err(RewrapError::Key(m)) => {
                eprintln!("envelope: key {}: {m}", k.id);
                failed.push(k.id);
            }
        }
        let done = i + 1;
        if *output == Output::Json {
            println!(
                "{}",
                serde_json::json!({"event": "progress", "key_id": k.id.to_hex(), "done": done, "total": total})
            );
        } else if done % every == 0 || done == total {
            println!("rewrapped {done}/{total}");
        }
    }
    output.line(
        &format!(
            "{rewrapped} key(s) rewrapped, {} already under {cmk}, {gone} deleted meanwhile, {} failed. Applications read these keys only if they trust {destination} (KeyringBuilder::trust_cmk or also_read, the CLI's kms or also_read): they must have trusted it before this rewrap, and keep trusting the old master key while any key row names it. Point `kms` at {destination} once every application does.",
            keys.len() - total,
            failed.len()
        ),
        serde_json::json!({"event": "summary", "summary": {
            "rewrapped": rewrapped,
            "already": keys.len() - total,
            "deleted_meanwhile": gone,
            "failed": failed.iter().map(KeyId::to_hex).collect::<Vec<_>>(),
        }}),
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Found(format!(
            "{} key(s) could not be rewrapped (see above); they stay under their old master key",
            failed.len()
        )))
    }
}

enum RewrapError {
    /// The KMS or the key table stayed unavailable: stop, a rerun finishes.
    Unavailable(String),
    /// This key cannot be rewrapped (its context is corrupt, the KMS refuses it).
    Key(String),
}

/// Rewrap one key row; `Ok(false)` when the row was deleted meanwhile.
async fn rewrap_one(
    rewrapper: &Rewrapper,
    store: &Arc<dyn KeyStore>,
    record: &KeyRecord,
    patience: Duration,
) -> Result<bool, RewrapError> {
    let (provider, cmk) = (rewrapper.provider(), rewrapper.to.cmk.as_str());
    let classify = |e: envelope_core::Error| {
        if transient(&e) {
            RewrapError::Unavailable(e.to_string())
        } else {
            RewrapError::Key(e.to_string())
        }
    };
    let mut record = record.clone();
    for _ in 0..3 {
        let context = EncryptionContext::from_json(&record.kms_context)
            .map_err(|e| RewrapError::Key(format!("kms_context is not a JSON object: {e}")))?;
        let wrapped = retrying("rewrapping", patience, || {
            rewrapper.rewrap(&record, &context)
        })
        .await
        .map_err(classify)?;
        let stored = retrying("updating the key table", patience, || async {
            match store
                .rewrap(&record.id, &record.wrapped, provider, cmk, &wrapped)
                .await
            {
                Err(StoreError::Backend(e)) => {
                    Err(envelope_core::Error::Store(StoreError::Backend(e)))
                }
                other => Ok(other),
            }
        })
        .await
        .map_err(classify)?;
        match stored {
            Ok(()) => return Ok(true),
            Err(StoreError::NotFound(_)) => return Ok(false),
            Err(StoreError::Conflict(_)) => {
                // Another process rewrapped it meanwhile: done if it is under the destination,
                // else try again from what is stored now.
                match store.get(&record.id).await {
                    Ok(None) => return Ok(false),
                    Ok(Some(now)) if now.provider == provider && now.cmk_id == cmk => {
                        return Ok(true);
                    }
                    Ok(Some(now)) => record = now,
                    Err(e) => return Err(classify(envelope_core::Error::Store(e))),
                }
            }
            Err(e) => return Err(RewrapError::Key(e.to_string())),
        }
    }
    Err(RewrapError::Key(
        "rewrapped concurrently three times in a row; run again".into(),
    ))
}

/// `envelope rotate --index TABLE.COLUMN`: a new index key for the column's blind index, every
/// row's index recomputed under it, then the old key deleted. Lookups that probe every key of
/// the label (`BlindIndex::probes`) find every row at every moment.
///
/// 1. If no rotation of the label is in progress, its live index key is retired; the next user
///    (this process, or an application) makes the new one.
/// 2. Wait until every running keyring has read the key table since (`key_refresh`): from then
///    on they write under the new key and probe both.
/// 3. Recompute every row's index from its decrypted value, compare-and-set (a resumable job).
/// 4. Delete the old key(s).
///
/// A rerun after a crash continues at the step it stopped in.
///
/// # Errors
/// A [`Failure`].
pub async fn rotate_index(
    config: &Config,
    target: &str,
    key_refresh: Duration,
    mut opts: RunOptions,
    stop: Arc<AtomicBool>,
) -> Result<(), Failure> {
    let (table, column) = find_index_column(config, target)?;
    let spec = column
        .blind_index
        .as_ref()
        .map(|b| b.spec.clone())
        .ok_or_else(|| {
            Failure::Usage(format!("{target} has no blind_index in the configuration"))
        })?;
    let label = spec.label().as_str().to_owned();
    let output = opts.output;
    let (_, store) = open_key_table(config).await?;
    let filter = KeyFilter {
        kind: Some(KeyKind::Index),
        scope: Some(label.clone()),
        include_retired: true,
        ..KeyFilter::default()
    };
    let list = async || {
        store
            .list(&filter)
            .await
            .map_err(|e| store_failure("reading the key table", e))
    };
    let keys = list().await?;
    if keys.is_empty() {
        return Err(Failure::Usage(format!(
            "{label} has no index key yet, so there is nothing to rotate (`envelope encrypt` makes it)"
        )));
    }
    let db = commands::connect(config, 2).await?;
    let jobs = crate::job::Jobs::new(db, &config.job_table);
    let job_name = format!("{}:{}.{}", Op::Reindex.name(), table, column.name);
    let resuming = jobs.unfinished_params(&job_name).await?.is_some();
    let in_progress = keys.iter().any(|k| k.retired_at.is_some());
    let dry_run = opts.settings.dry_run;
    if !resuming && !in_progress && !dry_run {
        let now = SystemTime::now();
        for k in keys.iter().filter(|k| k.retired_at.is_none()) {
            store
                .retire(&k.id, now)
                .await
                .map_err(|e| store_failure("retiring the index key", e))?;
            output.line(
                &format!("retired index key {} of {label}: new indexes use a new key", k.id),
                serde_json::json!({"event": "index_key_retired", "key_id": k.id.to_hex(), "label": label}),
            );
        }
    }
    // The new key: made now unless an application made it first.
    let keyring = commands::keyring(config).await?;
    keyring
        .refresh_keys()
        .await
        .map_err(|e| commands::core_failure("reading the key table", e))?;
    if !dry_run {
        keyring
            .blind_index(&spec, b"")
            .await
            .map_err(|e| commands::core_failure("making the new index key", e))?;
    }
    let keys = list().await?;
    let Some(live) = keys.iter().find(|k| k.retired_at.is_none()).cloned() else {
        return Err(Failure::Usage(format!(
            "{label} has no live index key (dry run: nothing was changed)"
        )));
    };
    let old: Vec<KeyRecord> = keys.into_iter().filter(|k| k.id != live.id).collect();
    output.line(
        &format!(
            "index key {} of {label} is live; {} older key(s) to replace",
            live.id,
            old.len()
        ),
        serde_json::json!({"event": "index_keys", "live": live.id.to_hex(), "old": old.iter().map(|k| k.id.to_hex()).collect::<Vec<_>>()}),
    );

    // Every running keyring must write under the new key and probe it before rows move to it.
    let changed = old
        .iter()
        .filter_map(|k| k.retired_at)
        .chain([live.created_at])
        .max()
        .unwrap_or(live.created_at);
    let ready = changed + key_refresh + Duration::from_secs(2);
    if let Ok(wait) = ready.duration_since(SystemTime::now())
        && !dry_run
    {
        output.line(
            &format!(
                "waiting {:.0?} until running applications have read the key table (--key-refresh {key_refresh:?}: their Policy::key_refresh)",
                wait
            ),
            serde_json::json!({"event": "waiting", "seconds": wait.as_secs_f64()}),
        );
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Err(Failure::Interrupted);
            }
            tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
        }
    }

    opts.table = Some(table.clone());
    opts.column = Some(column.name.clone());
    commands::migrate(config, Op::Reindex, None, opts, stop).await?;
    if dry_run {
        return Ok(());
    }
    // Only a pass that reached every row frees the old keys: `--limit` stops early, and with
    // `--shard` the other shards may still be working. Until then rows indexed under an old
    // key are found only through it.
    let (ranges, done) = jobs.pass_state(&job_name).await?;
    if ranges == 0 || done < ranges {
        output.line(
            &format!(
                "{} of {ranges} range(s) of {label}'s reindex pass are left (--limit, or other shards still running): the old index key(s) are kept, and lookups that probe every key still find every row; run `envelope rotate --index {target}` again (or let the other shards finish) to complete the rotation",
                ranges - done
            ),
            serde_json::json!({"event": "index_rotation_unfinished", "label": label, "ranges": ranges, "done": done}),
        );
        return Ok(());
    }

    // Every row is indexed under the live key: the old keys are no longer needed by anyone.
    let now_live = list().await?.into_iter().find(|k| k.retired_at.is_none());
    if now_live.as_ref().map(|k| k.id) != Some(live.id) {
        return Err(Failure::Found(format!(
            "the live index key of {label} changed during the pass (another rotation?); old keys kept: run `envelope rotate --index {target}` again"
        )));
    }
    for k in &old {
        store
            .delete(&k.id)
            .await
            .map_err(|e| store_failure("deleting the old index key", e))?;
    }
    output.line(
        &format!(
            "rotation of {label} finished: every row is indexed under {}; {} old index key(s) deleted",
            live.id,
            old.len()
        ),
        serde_json::json!({"event": "index_rotated", "label": label, "live": live.id.to_hex(), "deleted": old.len()}),
    );
    Ok(())
}

/// `TABLE.COLUMN`: the table's name and the encrypted column's name, its blind-index column's
/// name, or its label.
fn find_index_column(
    config: &Config,
    target: &str,
) -> Result<(String, crate::config::ColumnConfig), Failure> {
    let (t, c) = target.split_once('.').unwrap_or((target, ""));
    for table in &config.tables {
        for column in &table.columns {
            let Some(b) = &column.blind_index else {
                continue;
            };
            let by_name = table.name == t && (column.name == c || b.column == c);
            if by_name || column.label.as_str() == target {
                return Ok((table.name.clone(), column.clone()));
            }
        }
    }
    Err(Failure::Usage(format!(
        "--index {target}: no configured column with a blind_index is called that (use TABLE.COLUMN)"
    )))
}
