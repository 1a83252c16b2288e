//! The key lifecycle: `envelope keys list | retire | shred`.
//!
//! These commands touch the key table only, except the counts of `list --count` and `shred`,
//! which read the configured columns. docs/KEYS.md is the operator's guide.

use std::io::IsTerminal as _;
use std::time::{Duration, SystemTime};

use envelope_core::{KeyId, KeyKind, KeyRecord};

use super::status::value_counts;
use crate::config::Config;
use crate::context::{all_keys, open_key_table};
use crate::error::Failure;
use crate::report::{Output, key_json};

/// Which keys `retire` and `shred` act on. Keys match if any selector matches.
#[derive(Clone, Debug, Default)]
pub(crate) struct Selection {
    /// These key ids (data or index keys).
    pub(crate) keys: Vec<KeyId>,
    /// Every data key of this scope (a tenant's).
    pub(crate) scope: Option<String>,
    /// Every index key of this blind-index label. Scopes and labels share the key table's
    /// `scope` column, so they are selected apart: `--scope acme` never selects the index keys
    /// of a label that happens to be called `acme`.
    pub(crate) label: Option<String>,
    /// Data keys created longer ago than this.
    pub(crate) older_than: Option<Duration>,
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

/// `envelope keys list`: every key row, and with `count` the values of each configured column
/// under each key.
///
/// # Errors
/// A [`Failure`].
pub(crate) async fn list(
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
    output.keys(&config.key_table, &keys, counts.as_ref());
    Ok(())
}

/// `envelope keys retire`: the selected live keys take no more writes. Running keyrings notice
/// within their `Policy::key_refresh`.
///
/// # Errors
/// A [`Failure`].
pub(crate) async fn retire(
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
            .map_err(|e| Failure::store(format!("retiring key {}", k.id), e))?;
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
pub(crate) async fn shred(
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
            .map_err(|e| Failure::store(format!("deleting key {}", k.id), e))?
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
pub(crate) struct ShredSafety {
    /// Confirmed without asking (`--yes`).
    pub(crate) yes: bool,
    /// Shred keys that are not retired, or retired less than `key_refresh` ago (`--force`).
    pub(crate) force: bool,
    /// How long running applications may go without reading the key table.
    pub(crate) key_refresh: Duration,
}

fn humantime(d: Duration) -> String {
    format!("{}s", d.as_secs())
}
