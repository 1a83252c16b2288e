//! Compare-and-set: a row is written only where it still holds what the batch read, in one
//! statement per chunk on PostgreSQL and one per row on MySQL/MariaDB and SQLite.

use std::collections::HashSet;

use sqlx::AnyConnection;
use sqlx::any::AnyArguments;

use super::{ColumnJob, Op, Read, Update, parse_row, select_list};
use crate::db::{ErrorClass, Pk, Raw, classify};
use crate::sql::{Dialect, Shape, Skip};

/// Write `updates` where each row still holds what was read. Returns the rows that did not
/// match (an application wrote them in between) and the rows whose new value the database
/// refused (too long for the column, not in its character set, out of range), each with
/// its reason: those are left as they were, and the rest of the batch is written.
pub(super) async fn compare_and_set(
    d: Dialect,
    conn: &mut AnyConnection,
    job: &ColumnJob,
    updates: &[Update],
) -> Result<Cas, sqlx::Error> {
    let mut out = Cas::default();
    if updates.is_empty() {
        return Ok(out);
    }
    match d {
        // Per row: no network round trip on SQLite, and its planner may scan the table
        // for each row of a joined VALUES list; MariaDB has no UPDATE ... RETURNING. A
        // failed statement undoes only itself on both.
        Dialect::MySql | Dialect::Sqlite => {
            let sql = single_sql(d, job);
            for u in updates {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
                q = bind_new(q, job, u);
                q = u.read.pk.bind(q);
                q = bind_old(q, job, &u.read);
                match q.execute(&mut *conn).await {
                    Ok(r) if r.rows_affected() == 1 => {}
                    Ok(_) => out.missed.push(u.read.pk.clone()),
                    Err(e) => match classify(&e) {
                        ErrorClass::Value(name) => out.refused.push((u.read.pk.clone(), name)),
                        _ => return Err(e),
                    },
                }
            }
            Ok(out)
        }
        Dialect::Postgres => {
            // Keep well below PostgreSQL's 65,535 parameters.
            for chunk in updates.chunks(1000) {
                // A refused value aborts the statement and, on PostgreSQL, the transaction:
                // the savepoint keeps the batch's other work, and the chunk is then written
                // row by row to find the rows at fault.
                savepoint(conn, "SAVEPOINT envelope_cas").await?;
                match cas_chunk(d, conn, job, chunk).await {
                    Ok(missed) => {
                        out.missed.extend(missed);
                        savepoint(conn, "RELEASE SAVEPOINT envelope_cas").await?;
                    }
                    Err(e) if matches!(classify(&e), ErrorClass::Value(_)) => {
                        savepoint(conn, "ROLLBACK TO SAVEPOINT envelope_cas").await?;
                        for u in chunk {
                            savepoint(conn, "SAVEPOINT envelope_row").await?;
                            match cas_chunk(d, conn, job, std::slice::from_ref(u)).await {
                                Ok(missed) => {
                                    out.missed.extend(missed);
                                    savepoint(conn, "RELEASE SAVEPOINT envelope_row").await?;
                                }
                                Err(e) => match classify(&e) {
                                    ErrorClass::Value(name) => {
                                        savepoint(conn, "ROLLBACK TO SAVEPOINT envelope_row")
                                            .await?;
                                        out.refused.push((u.read.pk.clone(), name));
                                    }
                                    _ => return Err(e),
                                },
                            }
                        }
                        savepoint(conn, "RELEASE SAVEPOINT envelope_cas").await?;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        }
    }
}

/// One `UPDATE ... FROM (VALUES ...) RETURNING` over `chunk` (PostgreSQL); returns the rows
/// that did not match.
async fn cas_chunk(
    d: Dialect,
    conn: &mut AnyConnection,
    job: &ColumnJob,
    chunk: &[Update],
) -> Result<Vec<Pk>, sqlx::Error> {
    let sql = batch_sql(d, job, chunk.len());
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for u in chunk {
        q = u.read.pk.bind(q);
        q = bind_old(q, job, &u.read);
        q = bind_new(q, job, u);
    }
    let rows = q.fetch_all(&mut *conn).await?;
    let mut matched = HashSet::with_capacity(rows.len());
    for row in &rows {
        matched.insert(Pk::get(row, 0, job.table.pk_kind)?);
    }
    Ok(chunk
        .iter()
        .map(|u| &u.read.pk)
        .filter(|pk| !matched.contains(*pk))
        .cloned()
        .collect())
}

/// The columns compared (old values, with their shapes) and written (new values), in bind
/// order.
fn columns(job: &ColumnJob) -> (Vec<Compared>, Vec<Written>) {
    let c = &job.column;
    let mut old = vec![(c.target.clone(), job.target_shape())];
    if job.reads_source() {
        old.extend(c.source_read.clone().map(|s| (s, job.source_shape())));
    }
    if job.reads_index() {
        old.extend(c.index.clone().map(|i| (i, Shape::Bytes)));
    }
    // (column, expression of the new value with `{}` for the parameter)
    let mut new = vec![(c.target.clone(), "{}".to_owned())];
    if let (Op::Decrypt, Some(source)) = (&job.op, &c.source) {
        new.push((
            source.clone(),
            c.source_write.clone().unwrap_or_else(|| "{}".into()),
        ));
    }
    if job.reads_index() {
        new.extend(c.index.clone().map(|i| (i, "{}".to_owned())));
    }
    (old, new)
}

/// One `UPDATE ... FROM (VALUES ...) RETURNING` over `rows` rows (PostgreSQL).
fn batch_sql(d: Dialect, job: &ColumnJob, rows: usize) -> String {
    let (old, new) = columns(job);
    let width = 1 + old.len() + new.len();
    let mut names = vec!["envelope_k".to_owned()];
    names.extend((0..old.len()).map(|i| format!("envelope_o{i}")));
    names.extend((0..new.len()).map(|i| format!("envelope_n{i}")));
    let mut p = 0;
    let values = (0..rows)
        .map(|_| {
            let row = (0..width)
                .map(|_| {
                    p += 1;
                    d.param(p)
                })
                .collect::<Vec<_>>();
            format!("({})", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let set = new
        .iter()
        .enumerate()
        .map(|(i, (col, expr))| {
            format!("{col} = {}", expr.replace("{}", &format!("envelope_n{i}")))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut cond = vec![format!(
        "{} = {}",
        job.table.pk,
        job.table.pk_kind.bound("envelope_k")
    )];
    cond.extend(
        old.iter()
            .enumerate()
            .map(|(i, (col, shape))| d.same_as(*shape, col, &format!("envelope_o{i}"))),
    );
    format!(
        "WITH envelope_x({}) AS (VALUES {values}) UPDATE {} SET {set} FROM envelope_x WHERE {} RETURNING {}",
        names.join(", "),
        job.table.table,
        cond.join(" AND "),
        job.table.pk_kind.read(d, &job.table.pk)
    )
}

/// One row's `UPDATE` (MySQL/MariaDB and SQLite).
fn single_sql(d: Dialect, job: &ColumnJob) -> String {
    let (old, new) = columns(job);
    let set = new
        .iter()
        .map(|(col, expr)| format!("{col} = {}", expr.replace("{}", "?")))
        .collect::<Vec<_>>()
        .join(", ");
    let mut cond = vec![format!("{} = ?", job.table.pk)];
    cond.extend(old.iter().map(|(col, shape)| d.same_as(*shape, col, "?")));
    format!(
        "UPDATE {} SET {set} WHERE {}",
        job.table.table,
        cond.join(" AND ")
    )
}

/// Read rows again, locked (PostgreSQL, MySQL) so the retry's update matches.
pub(super) async fn reread(
    d: Dialect,
    conn: &mut AnyConnection,
    job: &ColumnJob,
    pks: &[Pk],
) -> Result<Vec<Read>, sqlx::Error> {
    let mut out = Vec::new();
    for chunk in pks.chunks(500) {
        let params = (1..=chunk.len())
            .map(|i| job.table.pk_kind.bound(&d.param(i)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {} FROM {} WHERE {} IN ({params}) ORDER BY {}{}",
            select_list(d, job),
            job.table.table,
            job.table.pk,
            job.table.pk,
            d.lock_rows(Skip::None)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for pk in chunk {
            q = pk.bind(q);
        }
        for row in q.fetch_all(&mut *conn).await? {
            out.push(parse_row(job, &row)?);
        }
    }
    Ok(out)
}

type Q<'q> = sqlx::query::Query<'q, sqlx::Any, AnyArguments>;

fn bind_old<'q>(mut q: Q<'q>, job: &ColumnJob, read: &Read) -> Q<'q> {
    q = read.target.bind(q);
    if job.reads_source() {
        q = read
            .source
            .as_ref()
            .map_or(Raw::Null(job.source_shape()), Clone::clone)
            .bind(q);
    }
    if job.reads_index() {
        q = read
            .index
            .as_ref()
            .map_or(Raw::Null(Shape::Bytes), Clone::clone)
            .bind(q);
    }
    q
}

fn bind_new<'q>(mut q: Q<'q>, job: &ColumnJob, u: &Update) -> Q<'q> {
    q = u.target.bind(q);
    if matches!(job.op, Op::Decrypt) && job.column.config.source.is_some() {
        q = u
            .source
            .as_ref()
            .map_or(Raw::Null(job.source_shape()), Clone::clone)
            .bind(q);
    }
    if job.reads_index() {
        // No index computed (NULL plaintext, or text an index normalizer cannot read): keep.
        q = u
            .index
            .as_ref()
            .or(u.read.index.as_ref())
            .map_or(Raw::Null(Shape::Bytes), Clone::clone)
            .bind(q);
    }
    q
}

/// A column a compare-and-set compares: its expression and the shape of its value.
type Compared = (String, Shape);
/// A column a compare-and-set writes: the column and the expression of its new value, `{}`
/// standing for the parameter.
type Written = (String, String);

/// What a compare-and-set left unwritten.
#[derive(Default)]
pub(super) struct Cas {
    /// Rows that no longer held what was read.
    pub(super) missed: Vec<Pk>,
    /// Rows whose new value the database refused, with the reason.
    pub(super) refused: Vec<(Pk, &'static str)>,
}

async fn savepoint(conn: &mut AnyConnection, sql: &'static str) -> Result<(), sqlx::Error> {
    sqlx::query(sql).execute(&mut *conn).await.map(drop)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use envelope_core::{BlindIndexSpec, Label, Normalizer};

    use super::*;
    use crate::config::{BlindIndexConfig, ColumnConfig, Form, ValueType};
    use crate::db::PkKind;
    use crate::plan::{ColumnNames, ColumnPlan, TablePlan};

    /// `customers.email`, in place, with a blind index in `email_bidx`, quoted for `d`.
    fn job(d: Dialect, op: Op, pk_kind: PkKind) -> ColumnJob {
        let label = Label::new("customers.email").unwrap();
        let config = ColumnConfig {
            name: "email".into(),
            label: label.clone(),
            ty: ValueType::String,
            form: Form::Binary,
            source: None,
            blind_index: Some(BlindIndexConfig {
                column: "email_bidx".into(),
                spec: BlindIndexSpec::new(label, Normalizer::Exact),
            }),
        };
        let column = ColumnPlan {
            config,
            names: ColumnNames {
                target: "email".into(),
                source: None,
                index: Some("email_bidx".into()),
            },
            target: d.quote("email"),
            source: None,
            source_read: None,
            source_write: None,
            index: Some(d.quote("email_bidx")),
        };
        let table = TablePlan {
            name: "customers".into(),
            table: d.quote("customers"),
            pk: d.quote("id"),
            pk_kind,
            columns: vec![column.clone()],
        };
        ColumnJob::new(table, column, op, None, None)
    }

    #[test]
    fn postgres_writes_a_chunk_in_one_statement_that_returns_the_rows_it_matched() {
        let d = Dialect::Postgres;
        let sql = batch_sql(d, &job(d, Op::Encrypt, PkKind::Int), 2);
        assert_eq!(
            sql,
            "WITH envelope_x(envelope_k, envelope_o0, envelope_o1, envelope_n0, envelope_n1) \
             AS (VALUES ($1, $2, $3, $4, $5), ($6, $7, $8, $9, $10)) \
             UPDATE \"customers\" SET \"email\" = envelope_n0, \"email_bidx\" = envelope_n1 \
             FROM envelope_x WHERE \"id\" = envelope_k AND \
             \"email\" IS NOT DISTINCT FROM envelope_o0 AND \
             \"email_bidx\" IS NOT DISTINCT FROM envelope_o1 RETURNING CAST(\"id\" AS BIGINT)"
        );
    }

    #[test]
    fn mysql_and_sqlite_compare_every_column_read_byte_for_byte() {
        let d = Dialect::MySql;
        assert_eq!(
            single_sql(d, &job(d, Op::Encrypt, PkKind::Int)),
            "UPDATE `customers` SET `email` = ?, `email_bidx` = ? WHERE `id` = ? AND \
             BINARY `email` <=> BINARY ? AND BINARY `email_bidx` <=> BINARY ?"
        );
        let d = Dialect::Sqlite;
        assert_eq!(
            single_sql(d, &job(d, Op::Encrypt, PkKind::Text)),
            "UPDATE \"customers\" SET \"email\" = ?, \"email_bidx\" = ? WHERE \"id\" = ? AND \
             \"email\" IS ? AND \"email_bidx\" IS ?"
        );
    }

    #[test]
    fn rotate_neither_reads_nor_writes_the_blind_index() {
        let d = Dialect::Sqlite;
        let rotate = job(d, Op::Rotate(Arc::default()), PkKind::Int);
        let (old, new) = columns(&rotate);
        assert_eq!(old.len(), 1);
        assert_eq!(new, [("\"email\"".to_owned(), "{}".to_owned())]);
        let (old, new) = columns(&job(d, Op::Reindex, PkKind::Int));
        assert_eq!((old.len(), new.len()), (2, 2));
    }
}
