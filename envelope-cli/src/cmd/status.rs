//! `envelope status`, and the per-key value counts that `keys list --count` and `keys shred`
//! show too.

use std::collections::BTreeMap;

use sqlx::Row;

use crate::config::{Config, Form};
use crate::context::{self, select};
use crate::db::{Context as _, Db, Pk};
use crate::error::Failure;
use crate::job::Jobs;
use crate::plan::{ColumnPlan, TablePlan};
use crate::report::{ColumnKeys, Output};

/// `envelope status`: values per key id per column, and the job table's progress.
///
/// # Errors
/// A [`Failure`].
pub(crate) async fn status(config: &Config, output: &Output) -> Result<(), Failure> {
    let tables = select(config, None, None)?;
    let db = context::connect(config, 2).await?;
    let plans = context::plan(&db, &tables).await?;
    let mut columns = Vec::new();
    for t in &plans {
        for c in &t.columns {
            let per_key = values_per_key(&db, t, c).await?;
            columns.push(ColumnKeys {
                table: t.name.clone(),
                column: c.config.name.clone(),
                label: c.config.label.as_str().to_owned(),
                per_key,
            });
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
    c: &ColumnPlan,
) -> Result<BTreeMap<String, i64>, Failure> {
    let d = db.dialect;
    let what = || format!("counting values of {}.{}", t.name, c.config.name);
    match c.config.form {
        Form::Binary => {
            // One SQL expression on the key id at offset 2.
            let col = &c.target;
            let header_ok = d.has_envelope_header(col);
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
    let mut last: Option<Pk> = None;
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
            .map(|r| Pk::get(r, 0, t.pk_kind))
            .transpose()
            .context(|| format!("scanning {}", t.name))?;
    }
}

/// Values per key id, per configured column (`table.column`). Empty when no column is
/// configured.
pub(super) async fn value_counts(
    config: &Config,
    db: &Db,
) -> Result<BTreeMap<String, BTreeMap<String, i64>>, Failure> {
    let mut out = BTreeMap::new();
    if config.tables.is_empty() {
        return Ok(out);
    }
    let tables = context::select(config, None, None)?;
    for t in &context::plan(db, &tables).await? {
        for c in &t.columns {
            for (key, n) in values_per_key(db, t, c).await? {
                out.entry(key)
                    .or_insert_with(BTreeMap::new)
                    .insert(format!("{}.{}", t.name, c.config.name), n);
            }
        }
    }
    Ok(out)
}
