//! `envelope encrypt`, `decrypt`, `rotate` and `verify`: one engine pass per configured
//! column.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use envelope_core::{KeyFilter, KeyId, KeyKind, Keyring};

use crate::config::Config;
use crate::context::{self, require_tables, select};
use crate::db::Context as _;
use crate::engine::{ColumnJob, Engine, Op, Settings};
use crate::error::Failure;
use crate::job::{Exclusive, Jobs};
use crate::plan::TablePlan;
use crate::report::{Output, Reporter, Summary};
use crate::retry::retrying;

/// Options shared by the migration commands.
#[derive(Clone, Debug)]
pub(crate) struct RunOptions {
    /// Only this table.
    pub(crate) table: Option<String>,
    /// Only this column (its `name`).
    pub(crate) column: Option<String>,
    /// The engine's settings.
    pub(crate) settings: Settings,
    /// How progress and the summary are shown.
    pub(crate) output: Output,
}

/// What `rotate` selects.
#[derive(Clone, Debug, Default)]
pub(crate) struct RotateSelection {
    /// These key ids.
    pub(crate) keys: Vec<KeyId>,
    /// Keys created longer ago than this.
    pub(crate) older_than: Option<Duration>,
    /// Keys already retired.
    pub(crate) retired: bool,
}

/// `envelope encrypt`, `decrypt`, `rotate` and `verify`.
///
/// # Errors
/// A [`Failure`] with its exit code.
pub(crate) async fn migrate(
    config: &Config,
    op: Op,
    rotate: Option<RotateSelection>,
    opts: RunOptions,
    stop: Arc<AtomicBool>,
) -> Result<(), Failure> {
    let tables = select(config, opts.table.as_deref(), opts.column.as_deref())?;
    let db = context::connect(config, opts.settings.workers as u32 + 2).await?;
    let plans = context::plan(&db, &tables).await?;
    let read_only = matches!(op, Op::Verify) || opts.settings.dry_run;
    if !matches!(op, Op::Verify) {
        require_tables(&db, config).await?;
    } else if !db.key_table_exists(&config.key_table).await? {
        return Err(Failure::Usage(format!(
            "the key table {} does not exist: check key_table (or run `envelope init`)",
            config.key_table
        )));
    }
    let keyring = context::keyring(config).await?;
    if matches!(op, Op::Encrypt | Op::Rotate(_)) && !read_only {
        // The first data key is committed to the key table before any value uses it.
        retrying("making a data key", opts.settings.patience, || {
            keyring.warm()
        })
        .await
        .map_err(|e| Failure::core(format!("making a data key with kms = {}", config.kms), e))?;
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
        return Err(Failure::Findings(problem));
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
            .map_err(|e| Failure::core("making the new data key", e))?;
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
