//! `envelope rotate --index TABLE.COLUMN`: a blind index's key replaced without a moment where
//! lookups miss.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use envelope_core::{KeyFilter, KeyKind, KeyRecord};

use super::migrate::{RunOptions, migrate};
use crate::config::{ColumnConfig, Config};
use crate::context::{self, open_key_table};
use crate::engine::Op;
use crate::error::Failure;
use crate::job::Jobs;

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
pub(crate) async fn rotate_index(
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
            .map_err(|e| Failure::store("reading the key table", e))
    };
    let keys = list().await?;
    if keys.is_empty() {
        return Err(Failure::Usage(format!(
            "{label} has no index key yet, so there is nothing to rotate (`envelope encrypt` makes it)"
        )));
    }
    let db = context::connect(config, 2).await?;
    let jobs = Jobs::new(db, &config.job_table);
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
                .map_err(|e| Failure::store("retiring the index key", e))?;
            output.line(
                &format!("retired index key {} of {label}: new indexes use a new key", k.id),
                serde_json::json!({"event": "index_key_retired", "key_id": k.id.to_hex(), "label": label}),
            );
        }
    }
    // The new key: made now unless an application made it first.
    let keyring = context::keyring(config).await?;
    keyring
        .refresh_keys()
        .await
        .map_err(|e| Failure::core("reading the key table", e))?;
    if !dry_run {
        keyring
            .blind_index(&spec, b"")
            .await
            .map_err(|e| Failure::core("making the new index key", e))?;
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
    migrate(config, Op::Reindex, None, opts, stop).await?;
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
        return Err(Failure::Findings(format!(
            "the live index key of {label} changed during the pass (another rotation?); old keys kept: run `envelope rotate --index {target}` again"
        )));
    }
    for k in &old {
        store
            .delete(&k.id)
            .await
            .map_err(|e| Failure::store("deleting the old index key", e))?;
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
fn find_index_column(config: &Config, target: &str) -> Result<(String, ColumnConfig), Failure> {
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
