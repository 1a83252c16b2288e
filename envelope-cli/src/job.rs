//! The job table: one row per primary-key range of a job, with its checkpoint (`last_pk`), its
//! lease and its counters. A batch moves its range's checkpoint in the same transaction as the
//! rows it changed, so after `kill -9` a rerun redoes at most one uncommitted batch and never
//! skips one. Ranges are leased: several workers, processes or machines share one job, and a
//! range whose worker died is taken over when its lease expires.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::AnyConnection;
use sqlx::Row;

use crate::db::{Context, Db, DbError, Pk, PkKind};
use crate::plan::TablePlan;
use crate::sql::{Dialect, Skip};

/// Milliseconds since the Unix epoch on this machine's clock (leases assume the machines
/// sharing a job agree on the time to well within the lease).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The job table's DDL.
pub(crate) fn ddl(d: Dialect, table: &str) -> String {
    let t = d.quote(table);
    let (text, flag) = match d {
        Dialect::MySql => ("LONGTEXT", "TINYINT"),
        _ => ("TEXT", "SMALLINT"),
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (\
         job VARCHAR(255) NOT NULL, \
         range_no INTEGER NOT NULL, \
         range_start {text} NULL, \
         range_end {text} NULL, \
         last_pk {text} NULL, \
         done {flag} NOT NULL DEFAULT 0, \
         lease_owner VARCHAR(255) NULL, \
         lease_expires BIGINT NULL, \
         params {text} NULL, \
         rows_seen BIGINT NOT NULL DEFAULT 0, \
         rows_written BIGINT NOT NULL DEFAULT 0, \
         rows_retried BIGINT NOT NULL DEFAULT 0, \
         rows_failed BIGINT NOT NULL DEFAULT 0, \
         started_at BIGINT NOT NULL, \
         updated_at BIGINT NOT NULL, \
         PRIMARY KEY (job, range_no))"
    )
}

/// Why a command may not work on a column now.
#[derive(Debug)]
pub(crate) enum Exclusive {
    /// Another command (this job) holds live leases on the column.
    Busy(String),
    /// The job table could not be read.
    Db(DbError),
}

impl From<DbError> for Exclusive {
    fn from(e: DbError) -> Self {
        Exclusive::Db(e)
    }
}

/// One leased range.
#[derive(Clone, Debug)]
pub(crate) struct Range {
    /// Its number within the job.
    pub(crate) no: i64,
    /// Rows with keys greater than this (exclusive); `None` from the first row.
    pub(crate) start: Option<Pk>,
    /// Up to and including this key; `None` to the last row.
    pub(crate) end: Option<Pk>,
    /// The last key of the last committed batch.
    pub(crate) last: Option<Pk>,
}

impl Range {
    /// Where the next batch starts (exclusive).
    pub(crate) fn resume_after(&self) -> Option<&Pk> {
        self.last.as_ref().or(self.start.as_ref())
    }
}

/// A batch's counters, added to the range's row with its checkpoint.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counts {
    /// Rows examined.
    pub(crate) seen: i64,
    /// Rows updated.
    pub(crate) written: i64,
    /// Rows whose update lost a race with the application and were re-read.
    pub(crate) retried: i64,
    /// Rows with a value that failed (left untouched).
    pub(crate) failed: i64,
}

/// The job table of one database.
#[derive(Clone, Debug)]
pub(crate) struct Jobs {
    db: Db,
    table: String,
}

/// The state of a job's ranges as this process sees them.
pub(crate) enum Claim {
    /// A range to work on, leased to us.
    Range(Range),
    /// Ranges remain but are leased to live workers (or are being planned): try again later.
    Wait(Duration),
    /// Every range this process may take is done.
    Finished,
}

impl Jobs {
    /// The job table `table` in `db`.
    pub(crate) fn new(db: Db, table: &str) -> Jobs {
        Jobs {
            table: db.dialect.quote(table),
            db,
        }
    }

    /// Create the table if it does not exist.
    ///
    /// # Errors
    /// A [`DbError`].
    pub(crate) async fn create_table(&self, name: &str) -> Result<(), DbError> {
        sqlx::query(sqlx::AssertSqlSafe(ddl(self.db.dialect, name)))
            .execute(&self.db.pool)
            .await
            .context(|| format!("creating the job table {name}"))?;
        Ok(())
    }

    fn p(&self, n: usize) -> String {
        self.db.dialect.param(n)
    }

    /// The parameters an unfinished run of `job` was started with (`None`: no unfinished run).
    ///
    /// # Errors
    /// A [`DbError`].
    pub(crate) async fn unfinished_params(
        &self,
        job: &str,
    ) -> Result<Option<Option<String>>, DbError> {
        let sql = format!(
            "SELECT params FROM {} WHERE job = {} AND done = 0 ORDER BY range_no LIMIT 1",
            self.table,
            self.p(1)
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job)
            .fetch_optional(&self.db.pool)
            .await
            .context(|| format!("reading job {job}"))?;
        row.map(|r| r.try_get::<Option<String>, _>(0))
            .transpose()
            .context(|| format!("reading job {job}"))
    }

    /// Before a command works on a column: refuse when another command holds live leases on
    /// it (two commands rewriting one column would both finish on a mixed column), and start a
    /// new pass of `job` when another command wrote the column after the unfinished pass began
    /// (its checkpoints no longer say which rows are done). Returns a note when a pass was
    /// dropped.
    ///
    /// # Errors
    /// [`Exclusive::Busy`] naming the other command, or a database error.
    pub(crate) async fn claim_column(&self, job: &str) -> Result<Option<String>, Exclusive> {
        let what = || format!("reading the job table for {job}");
        let d = self.db.dialect;
        let column = job.split_once(':').map_or(job, |(_, c)| c);
        let sql = format!(
            "SELECT job, {}, {}, {}, {}, {} FROM {} GROUP BY job",
            d.int(&format!(
                "SUM(CASE WHEN done = 0 AND lease_owner IS NOT NULL AND lease_expires >= {} THEN 1 ELSE 0 END)",
                self.p(1)
            )),
            d.int("MAX(updated_at)"),
            d.int("MIN(started_at)"),
            d.int("COUNT(*)"),
            d.int("SUM(done)"),
            self.table
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now_ms())
            .fetch_all(&self.db.pool)
            .await
            .context(what)?;
        let mut mine = None;
        let mut others_last = None::<i64>;
        for r in &rows {
            let name: String = r.try_get(0).context(what)?;
            if name.split_once(':').map(|(_, c)| c) != Some(column) {
                continue;
            }
            let (live, updated, started, ranges, done): (i64, i64, i64, i64, i64) = (
                r.try_get(1).context(what)?,
                r.try_get(2).context(what)?,
                r.try_get(3).context(what)?,
                r.try_get(4).context(what)?,
                r.try_get(5).context(what)?,
            );
            if name == job {
                mine = (done < ranges).then_some(started);
            } else {
                if live > 0 {
                    return Err(Exclusive::Busy(name));
                }
                others_last = Some(others_last.map_or(updated, |l| l.max(updated)));
            }
        }
        match (mine, others_last) {
            (Some(started), Some(other)) if other >= started => {
                let sql = format!("DELETE FROM {} WHERE job = {}", self.table, self.p(1));
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(job)
                    .execute(&self.db.pool)
                    .await
                    .context(what)?;
                Ok(Some(format!(
                    "{job}: the unfinished pass is not resumed, because another command wrote the column since it began; a new pass starts"
                )))
            }
            _ => Ok(None),
        }
    }

    /// The current pass of `job`: its number of ranges and how many are done (over every
    /// shard and process).
    ///
    /// # Errors
    /// A [`DbError`].
    pub(crate) async fn pass_state(&self, job: &str) -> Result<(i64, i64), DbError> {
        let what = || format!("reading job {job}");
        let d = self.db.dialect;
        let sql = format!(
            "SELECT {}, {} FROM {} WHERE job = {}",
            d.int("COUNT(*)"),
            d.int("SUM(done)"),
            self.table,
            self.p(1)
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job)
            .fetch_one(&self.db.pool)
            .await
            .context(what)?;
        Ok((
            row.try_get::<i64, _>(0).context(what)?,
            row.try_get::<i64, _>(1).context(what)?,
        ))
    }

    /// Make sure `job` has ranges to work on: keep an unfinished run's ranges (resume), or plan
    /// a new pass over the table (first run, or the last run finished). Returns whether it
    /// resumes.
    ///
    /// # Errors
    /// A [`DbError`].
    pub(crate) async fn prepare(
        &self,
        job: &str,
        table: &TablePlan,
        range_rows: i64,
        params: Option<&str>,
    ) -> Result<bool, DbError> {
        let what = || format!("planning job {job}");
        let d = self.db.dialect;
        let (ranges, done) = self.pass_state(job).await?;
        if ranges > 0 && done < ranges {
            return Ok(true);
        }
        // Integer keys split into ranges of about `range_rows` keys by arithmetic; text and
        // UUID keys at boundaries sampled from the table, about `range_rows` rows apart.
        let mut bounds: Vec<Bounds> = vec![(None, None)];
        if table.pk_kind == PkKind::Int {
            let sql = format!(
                "SELECT {lo}, {hi} FROM {t}",
                lo = format_args!("MIN({})", table.pk_kind.read(d, &table.pk)),
                hi = format_args!("MAX({})", table.pk_kind.read(d, &table.pk)),
                t = table.table
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_one(&self.db.pool)
                .await
                .context(what)?;
            let lo: Option<i64> = row.try_get(0).context(what)?;
            let hi: Option<i64> = row.try_get(1).context(what)?;
            if let (Some(lo), Some(hi)) = (lo, hi) {
                bounds = int_ranges(lo, hi, range_rows);
            }
        } else {
            let cuts = self.sample_boundaries(table, range_rows).await?;
            bounds = ranges_between(cuts);
        }
        let mut tx = self.db.pool.begin().await.context(what)?;
        let sql = format!("DELETE FROM {} WHERE job = {}", self.table, self.p(1));
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job)
            .execute(&mut *tx)
            .await
            .context(what)?;
        let now = now_ms();
        for (no, (start, end)) in bounds.iter().enumerate() {
            let sql = format!(
                "INSERT INTO {} (job, range_no, range_start, range_end, params, started_at, updated_at) \
                 VALUES ({}, {}, {}, {}, {}, {}, {})",
                self.table,
                self.p(1),
                self.p(2),
                self.p(3),
                self.p(4),
                self.p(5),
                self.p(6),
                self.p(7)
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(job)
                .bind(no as i64)
                .bind(start.as_ref().map(Pk::to_checkpoint))
                .bind(end.as_ref().map(Pk::to_checkpoint))
                .bind(params.map(str::to_owned))
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await
                .context(what)?;
        }
        tx.commit().await.context(what)?;
        Ok(false)
    }

    /// Keys about `range_rows` rows apart, in key order (`OFFSET` over the primary key's index:
    /// read once, when a pass is planned).
    async fn sample_boundaries(
        &self,
        table: &TablePlan,
        range_rows: i64,
    ) -> Result<Vec<Pk>, DbError> {
        let d = self.db.dialect;
        let what = || format!("sampling the keys of {}", table.name);
        let sql = format!("SELECT {} FROM {}", d.int("COUNT(*)"), table.table);
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.db.pool)
            .await
            .context(what)?;
        let n = (rows / range_rows.max(1)).clamp(1, 1000);
        let step = rows / n;
        let mut cuts = Vec::new();
        for i in 1..n {
            let sql = format!(
                "SELECT {} FROM {} ORDER BY {} LIMIT 1 OFFSET {}",
                table.pk_kind.read(d, &table.pk),
                table.table,
                table.pk,
                i * step - 1
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_optional(&self.db.pool)
                .await
                .context(what)?;
            if let Some(row) = row {
                let pk = Pk::get(&row, 0, table.pk_kind).context(what)?;
                // Compared in the database's collation, not here. Rows that move while sampling
                // can only make two ranges overlap (compare-and-set makes that harmless), never
                // leave a gap: the ranges still cover every key.
                if cuts.last() != Some(&pk) {
                    cuts.push(pk);
                }
            }
        }
        Ok(cuts)
    }

    /// Lease the next free (or expired) range of `job` that this shard may take.
    ///
    /// # Errors
    /// A [`DbError`].
    pub(crate) async fn claim(
        &self,
        job: &str,
        owner: &str,
        lease: Duration,
        shard: Option<(u32, u32)>,
        pk_kind: PkKind,
    ) -> Result<Claim, DbError> {
        let what = || format!("leasing a range of job {job}");
        let d = self.db.dialect;
        let now = now_ms();
        let shard_sql = match shard {
            Some((i, n)) => format!(" AND (range_no % {n}) = {i}"),
            None => String::new(),
        };
        let mut conn = self.db.pool.acquire().await.context(what)?;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, d.begin_write())
            .await
            .context(what)?;
        let lock = d.lock_rows(Skip::Locked);
        let sql = format!(
            "SELECT range_no, range_start, range_end, last_pk FROM {t} \
             WHERE job = {p1} AND done = 0 AND (lease_owner IS NULL OR lease_expires < {p2}){shard_sql} \
             ORDER BY range_no LIMIT 1{lock}",
            t = self.table,
            p1 = self.p(1),
            p2 = self.p(2),
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .context(what)?;
        let Some(row) = row else {
            tx.rollback().await.context(what)?;
            // Nothing free: are ranges left at all, and when does the first lease run out?
            let sql = format!(
                "SELECT {}, {} FROM {} WHERE job = {} AND done = 0{shard_sql}",
                d.int("COUNT(*)"),
                d.int_or_null("MIN(lease_expires)"),
                self.table,
                self.p(1)
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(job)
                .fetch_one(&mut *conn)
                .await
                .context(what)?;
            let left: i64 = row.try_get(0).context(what)?;
            let expires: Option<i64> = row.try_get(1).context(what)?;
            return Ok(if left == 0 {
                Claim::Finished
            } else {
                let wait = expires.map_or(500, |e| (e - now).clamp(50, 1000));
                Claim::Wait(Duration::from_millis(wait as u64))
            });
        };
        let no: i64 = row.try_get(0).context(what)?;
        let pk = |i: usize| -> Result<Option<Pk>, DbError> {
            let s: Option<String> = row.try_get(i).context(what)?;
            Ok(s.and_then(|s| Pk::from_checkpoint(pk_kind, &s)))
        };
        let range = Range {
            no,
            start: pk(1)?,
            end: pk(2)?,
            last: pk(3)?,
        };
        let sql = format!(
            "UPDATE {} SET lease_owner = {}, lease_expires = {}, updated_at = {} WHERE job = {} AND range_no = {}",
            self.table,
            self.p(1),
            self.p(2),
            self.p(3),
            self.p(4),
            self.p(5)
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .bind(now + lease.as_millis() as i64)
            .bind(now)
            .bind(job)
            .bind(no)
            .execute(&mut *tx)
            .await
            .context(what)?;
        tx.commit().await.context(what)?;
        Ok(Claim::Range(range))
    }

    /// Inside a batch's transaction: move the checkpoint to `last`, add the counters, renew the
    /// lease, and mark the range done when `done`. Returns false when the lease was lost (another
    /// worker took the range over): the caller must roll back.
    ///
    /// # Errors
    /// A [`DbError`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn checkpoint(
        &self,
        conn: &mut AnyConnection,
        job: &str,
        range: i64,
        owner: &str,
        last: Option<&Pk>,
        counts: Counts,
        lease: Duration,
        done: bool,
    ) -> Result<bool, DbError> {
        let now = now_ms();
        let sql = format!(
            "UPDATE {t} SET last_pk = COALESCE({p1}, last_pk), rows_seen = rows_seen + {p2}, \
             rows_written = rows_written + {p3}, rows_retried = rows_retried + {p4}, \
             rows_failed = rows_failed + {p5}, lease_expires = {p6}, updated_at = {p7}, \
             done = {p8}, lease_owner = {owner_after} \
             WHERE job = {p9} AND range_no = {p10} AND lease_owner = {p11}",
            t = self.table,
            p1 = self.p(1),
            p2 = self.p(2),
            p3 = self.p(3),
            p4 = self.p(4),
            p5 = self.p(5),
            p6 = self.p(6),
            p7 = self.p(7),
            p8 = self.p(8),
            owner_after = if done { "NULL" } else { "lease_owner" },
            p9 = self.p(9),
            p10 = self.p(10),
            p11 = self.p(11),
        );
        let r = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(last.map(Pk::to_checkpoint))
            .bind(counts.seen)
            .bind(counts.written)
            .bind(counts.retried)
            .bind(counts.failed)
            .bind(now + lease.as_millis() as i64)
            .bind(now)
            .bind(i16::from(done))
            .bind(job)
            .bind(range)
            .bind(owner)
            .execute(&mut *conn)
            .await
            .context(|| format!("checkpointing job {job}"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Give a range's lease back (on interruption), so that a rerun takes it at once.
    ///
    /// # Errors
    /// A [`DbError`].
    pub(crate) async fn release(&self, job: &str, range: i64, owner: &str) -> Result<(), DbError> {
        let sql = format!(
            "UPDATE {} SET lease_owner = NULL, lease_expires = NULL WHERE job = {} AND range_no = {} AND lease_owner = {}",
            self.table,
            self.p(1),
            self.p(2),
            self.p(3)
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job)
            .bind(range)
            .bind(owner)
            .execute(&self.db.pool)
            .await
            .context(|| format!("releasing a range of job {job}"))?;
        Ok(())
    }

    /// Every job's progress, for `envelope status`.
    ///
    /// # Errors
    /// A [`DbError`].
    pub(crate) async fn summary(&self) -> Result<Vec<JobSummary>, DbError> {
        let what = || "reading the job table".to_owned();
        let d = self.db.dialect;
        let sql = format!(
            "SELECT job, {}, {}, {}, {}, {}, {}, {}, {}, {} FROM {} GROUP BY job ORDER BY job",
            d.int("COUNT(*)"),
            d.int("SUM(done)"),
            d.int("SUM(rows_seen)"),
            d.int("SUM(rows_written)"),
            d.int("SUM(rows_retried)"),
            d.int("SUM(rows_failed)"),
            d.int("MIN(started_at)"),
            d.int("MAX(updated_at)"),
            d.int(&format!(
                "SUM(CASE WHEN lease_owner IS NOT NULL AND lease_expires >= {} THEN 1 ELSE 0 END)",
                self.p(1)
            )),
            self.table
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now_ms())
            .fetch_all(&self.db.pool)
            .await
            .context(what)?;
        let sql = format!(
            "SELECT job, lease_owner FROM {} WHERE done = 0 AND lease_owner IS NOT NULL AND lease_expires >= {}",
            self.table,
            self.p(1)
        );
        let leases = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now_ms())
            .fetch_all(&self.db.pool)
            .await
            .context(what)?;
        let mut owners: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for r in &leases {
            let job: String = r.try_get(0).context(what)?;
            let owner: String = r.try_get(1).context(what)?;
            owners.entry(job).or_default().push(owner);
        }
        rows.iter()
            .map(|r| {
                let job: String = r.try_get(0)?;
                Ok(JobSummary {
                    owners: owners.remove(&job).unwrap_or_default(),
                    job,
                    ranges: r.try_get(1)?,
                    done: r.try_get(2)?,
                    seen: r.try_get(3)?,
                    written: r.try_get(4)?,
                    retried: r.try_get(5)?,
                    failed: r.try_get(6)?,
                    started_at: r.try_get(7)?,
                    updated_at: r.try_get(8)?,
                    leased: r.try_get(9)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .context(what)
    }
}

/// One job's progress.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct JobSummary {
    /// `encrypt:customers.email` and so on.
    pub(crate) job: String,
    /// Ranges in the current pass.
    pub(crate) ranges: i64,
    /// Ranges finished.
    pub(crate) done: i64,
    /// Rows examined.
    pub(crate) seen: i64,
    /// Rows updated.
    pub(crate) written: i64,
    /// Rows re-read after losing a race with the application.
    pub(crate) retried: i64,
    /// Rows left untouched because their value failed.
    pub(crate) failed: i64,
    /// When the pass began (ms since the epoch).
    pub(crate) started_at: i64,
    /// The last checkpoint (ms since the epoch).
    pub(crate) updated_at: i64,
    /// Ranges currently leased by a live worker.
    pub(crate) leased: i64,
    /// The owners of those leases (`host:pid:tag`).
    pub(crate) owners: Vec<String>,
}

impl JobSummary {
    /// Whether a process may still be working on the job: a live lease whose owner is on
    /// another machine, or is a process of this machine that still exists. A process killed
    /// here (`kill -9`) leaves leases that look live until they expire.
    pub(crate) fn running(&self) -> bool {
        let host = this_host();
        self.leased > 0
            && self.owners.iter().any(|o| {
                let mut parts = o.rsplitn(3, ':');
                let (_, pid, owner_host) = (parts.next(), parts.next(), parts.next());
                match (owner_host, pid.and_then(|p| p.parse::<u32>().ok())) {
                    (Some(h), Some(pid)) if h == host => {
                        std::path::Path::new(&format!("/proc/{pid}")).exists()
                    }
                    _ => true,
                }
            })
    }
}

/// A range's bounds: after the first key (exclusive; `None` from the start) up to the second
/// (inclusive; `None` to the end).
type Bounds = (Option<Pk>, Option<Pk>);

/// Integer keys `lo..=hi` in ranges of about `range_rows` keys (at most 10,000 ranges), by
/// arithmetic: together they cover every key, once.
fn int_ranges(lo: i64, hi: i64, range_rows: i64) -> Vec<Bounds> {
    let span = (i128::from(hi) - i128::from(lo) + 1).max(1);
    let n = (span / i128::from(range_rows.max(1))).clamp(1, 10_000) as i64;
    let step = (span / i128::from(n)).max(1);
    (0..n)
        .map(|i| {
            let at = |k: i64| Pk::Int((i128::from(lo) + step * i128::from(k) - 1) as i64);
            ((i > 0).then(|| at(i)), (i + 1 < n).then(|| at(i + 1)))
        })
        .collect()
}

/// The ranges between sampled keys `cuts` (in key order): from the start to the first cut, from
/// each cut to the next, and from the last to the end.
fn ranges_between(cuts: Vec<Pk>) -> Vec<Bounds> {
    let mut starts = vec![None];
    starts.extend(cuts.iter().cloned().map(Some));
    let mut ends: Vec<Option<Pk>> = cuts.into_iter().map(Some).collect();
    ends.push(None);
    starts.into_iter().zip(ends).collect()
}

/// This machine's name, as lease owners record it.
pub(crate) fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ranges that hold `k` (after the start, up to and including the end).
    fn holding(ranges: &[Bounds], k: i64) -> usize {
        ranges
            .iter()
            .filter(|(start, end)| {
                start.as_ref().is_none_or(|s| Pk::Int(k) > *s)
                    && end.as_ref().is_none_or(|e| Pk::Int(k) <= *e)
            })
            .count()
    }

    #[test]
    fn integer_ranges_cover_every_key_once() {
        for (lo, hi, rows) in [(1, 1000, 100), (-50, 49, 7), (5, 5, 100), (0, 99, 1000)] {
            let ranges = int_ranges(lo, hi, rows);
            for k in lo - 2..=hi + 2 {
                let outside = k < lo || k > hi;
                // The first and last ranges are open-ended, so keys outside [lo, hi] (rows
                // inserted since) are covered too.
                assert_eq!(
                    holding(&ranges, k),
                    1,
                    "{lo}..={hi} by {rows}: key {k} ({outside})"
                );
            }
        }
        assert_eq!(int_ranges(1, 1000, 100).len(), 10);
        assert_eq!(int_ranges(1, 1000, 100)[1].0, Some(Pk::Int(100)));
    }

    #[test]
    fn integer_ranges_are_capped_and_survive_the_extremes() {
        assert_eq!(int_ranges(0, 10_000_000, 1).len(), 10_000);
        let whole = int_ranges(i64::MIN, i64::MAX, 1_000_000);
        assert_eq!(whole.len(), 10_000);
        assert_eq!(holding(&whole, i64::MIN), 1);
        assert_eq!(holding(&whole, i64::MAX), 1);
        assert_eq!(holding(&whole, 0), 1);
    }

    #[test]
    fn sampled_cuts_make_ranges_from_start_to_end() {
        let cuts = vec![Pk::Text("g".into()), Pk::Text("p".into())];
        assert_eq!(
            ranges_between(cuts),
            vec![
                (None, Some(Pk::Text("g".into()))),
                (Some(Pk::Text("g".into())), Some(Pk::Text("p".into()))),
                (Some(Pk::Text("p".into())), None),
            ]
        );
        assert_eq!(ranges_between(Vec::new()), vec![(None, None)]);
    }
}
