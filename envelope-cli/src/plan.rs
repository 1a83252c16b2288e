//! Planning: the configured tables checked against the database before any write (tables,
//! columns, primary keys, and that each column's SQL type can hold its form and its longest
//! value), and the SQL that reads and writes each source column.

use crate::config::{ColumnConfig, Form, TableConfig, ValueType};
use crate::db::{ColumnInfo, Context as _, Db, DbError, PkKind};
use crate::sql::Dialect;

/// A column's names as the catalog spells them.
#[derive(Clone, Debug)]
pub(crate) struct ColumnNames {
    /// The encrypted column.
    pub(crate) target: String,
    /// The source column.
    pub(crate) source: Option<String>,
    /// The blind-index column.
    pub(crate) index: Option<String>,
}

/// What the engine knows about one configured column after checking the schema.
#[derive(Clone, Debug)]
pub(crate) struct ColumnPlan {
    /// The configuration.
    pub(crate) config: ColumnConfig,
    /// The catalog's names of the columns it uses.
    pub(crate) names: ColumnNames,
    /// The quoted target column.
    pub(crate) target: String,
    /// The quoted source column.
    pub(crate) source: Option<String>,
    /// The expression reading the source (the quoted source column, cast to a canonical shape).
    pub(crate) source_read: Option<String>,
    /// The expression writing a source value back (`{}` is the bind parameter).
    pub(crate) source_write: Option<String>,
    /// The quoted blind-index column.
    pub(crate) index: Option<String>,
}

/// What the engine knows about one configured table after checking the schema.
#[derive(Clone, Debug)]
pub(crate) struct TablePlan {
    /// The table's configured name.
    pub(crate) name: String,
    /// The quoted table.
    pub(crate) table: String,
    /// The quoted primary-key column.
    pub(crate) pk: String,
    /// How keys are read and bound.
    pub(crate) pk_kind: PkKind,
    /// The columns.
    pub(crate) columns: Vec<ColumnPlan>,
}

/// Check the configured tables against the database, before any write: tables, columns,
/// primary keys, and that each column's SQL type can hold its form and its longest value.
///
/// # Errors
/// A list of every problem found (each says what to change), or a database error.
pub(crate) async fn plan(
    db: &Db,
    tables: &[TableConfig],
) -> Result<Result<Vec<TablePlan>, Vec<String>>, DbError> {
    let d = db.dialect;
    let mut problems = Vec::new();
    let mut plans = Vec::new();
    for t in tables {
        if !db.table_exists(&t.name).await? {
            problems.push(format!("table {} does not exist", t.name));
            continue;
        }
        let pk_info = db.column_info(&t.name, &t.primary_key).await?;
        let (pk_kind, pk_name) = match pk_info {
            None => {
                problems.push(format!(
                    "table {}: primary key column {} does not exist",
                    t.name, t.primary_key
                ));
                continue;
            }
            Some(info) => match PkKind::of(d, &info) {
                Ok(k) => (k, info.name),
                Err(why) => {
                    problems.push(format!(
                        "table {}: primary key {}: {why}",
                        t.name, t.primary_key
                    ));
                    continue;
                }
            },
        };
        let mut columns = Vec::new();
        for c in &t.columns {
            match plan_column(db, t, c).await? {
                Ok(p) => columns.push(p),
                Err(mut why) => problems.append(&mut why),
            }
        }
        // Each column has one role, by the names the catalog resolved: a blind index written
        // over its own encrypted column would replace every value by its digest.
        let mut roles: Vec<(&str, String)> = vec![(&pk_name, "the primary key".to_owned())];
        for c in &columns {
            let name = &c.config.name;
            roles.push((
                &c.names.target,
                format!("the encrypted column of entry {name:?}"),
            ));
            if let Some(s) = &c.names.source {
                roles.push((s, format!("the source of entry {name:?}")));
            }
            if let Some(i) = &c.names.index {
                roles.push((i, format!("the blind-index column of entry {name:?}")));
            }
        }
        for (i, (a, role_a)) in roles.iter().enumerate() {
            if let Some((_, role_b)) = roles[..i].iter().find(|(b, _)| a == b) {
                problems.push(format!(
                    "table {}: column {a} would be both {role_b} and {role_a} (the database resolves the configured names to the same column): give each role its own column",
                    t.name
                ));
            }
        }
        plans.push(TablePlan {
            name: t.name.clone(),
            table: d.quote(&t.name),
            pk: d.quote(&pk_name),
            pk_kind,
            columns,
        });
    }
    Ok(if problems.is_empty() {
        Ok(plans)
    } else {
        Err(problems)
    })
}

async fn plan_column(
    db: &Db,
    t: &TableConfig,
    c: &ColumnConfig,
) -> Result<Result<ColumnPlan, Vec<String>>, DbError> {
    let d = db.dialect;
    let at = |col: &str| format!("{}.{col}", t.name);
    let mut problems = Vec::new();
    let target_info = db.column_info(&t.name, &c.name).await?;
    let source_info = match &c.source {
        Some(s) => match db.column_info(&t.name, s).await? {
            Some(i) => Some(i),
            None => {
                problems.push(format!(
                    "{}: the source column does not exist (check `source`)",
                    at(s)
                ));
                None
            }
        },
        None => None,
    };
    let Some(target_info) = target_info else {
        problems.push(format!(
            "{}: the column does not exist{}",
            at(&c.name),
            if c.source.is_some() {
                " (add it before encrypting, see docs/MIGRATING.md)"
            } else {
                ""
            }
        ));
        return Ok(Err(problems));
    };
    if let Err(why) = form_fits(d, c.form, &target_info) {
        problems.push(format!("{}: {why}", at(&c.name)));
    }
    let mut index_name = None;
    if let Some(b) = &c.blind_index {
        match db.column_info(&t.name, &b.column).await? {
            None => problems.push(format!(
                "{}: the blind-index column does not exist",
                at(&b.column)
            )),
            Some(info) => {
                index_name = Some(info.name.clone());
                if let Err(why) = form_fits(d, Form::Binary, &info) {
                    problems.push(format!("{} (blind index): {why}", at(&b.column)));
                } else if let Some(n) = info.max_len.filter(|n| (*n as usize) < b.spec.len()) {
                    problems.push(format!(
                        "{} (blind index): holds {n} bytes, the index has {}",
                        at(&b.column),
                        b.spec.len()
                    ));
                }
            }
        }
    }
    let (source_read, source_write) = match (&c.source, &source_info) {
        (Some(s), Some(info)) => match source_sql(d, c.ty, &d.quote(&info.name), info) {
            Ok((r, w)) => (Some(r), Some(w)),
            Err(why) => {
                problems.push(format!("{}: {why}", at(s)));
                (None, None)
            }
        },
        _ => (None, None),
    };
    if !problems.is_empty() {
        return Ok(Err(problems));
    }
    // The longest value must fit once sealed.
    if let Some(capacity) = capacity(d, c.form, &target_info) {
        let longest_expr = match &source_read {
            Some(read) => d.octet_length(read),
            None => d.octet_length(&d.quote(&target_info.name)),
        };
        let sql = format!(
            "SELECT CAST(MAX({longest_expr}) AS {}) FROM {}",
            if d == Dialect::MySql {
                "SIGNED"
            } else {
                "BIGINT"
            },
            d.quote(&t.name)
        );
        let longest: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&db.pool)
            .await
            .context(|| format!("measuring the longest value of {}", at(&c.name)))?;
        let plaintext = c.ty.fixed_len().or(longest.map(|l| l.max(0) as usize));
        if let Some(len) = plaintext {
            let sealed = envelope_core::format::sealed_len(len);
            let need = match c.form {
                Form::Binary => sealed,
                Form::Text => 4 + sealed.div_ceil(3) * 4,
            };
            if need as u64 > capacity {
                problems.push(format!(
                    "{}: the longest value needs {need} {} once sealed, but {} holds {capacity}: widen the column first",
                    at(&c.name),
                    if c.form == Form::Text { "characters" } else { "bytes" },
                    target_info.full
                ));
                return Ok(Err(problems));
            }
        }
    }
    let names = ColumnNames {
        source: source_info.map(|i| i.name),
        index: index_name,
        target: target_info.name,
    };
    Ok(Ok(ColumnPlan {
        config: c.clone(),
        target: d.quote(&names.target),
        source: names.source.as_deref().map(|s| d.quote(s)),
        source_read,
        source_write,
        index: names.index.as_deref().map(|i| d.quote(i)),
        names,
    }))
}

/// Whether a column type can hold the form at all.
fn form_fits(d: Dialect, form: Form, info: &ColumnInfo) -> Result<(), String> {
    let t = info.ty.as_str();
    match (d, form) {
        (Dialect::Sqlite, _) => Ok(()),
        (Dialect::Postgres, Form::Binary) if t == "bytea" => Ok(()),
        (Dialect::Postgres, Form::Text) if matches!(t, "text" | "varchar") => Ok(()),
        (Dialect::Postgres, Form::Text) if t == "bpchar" => Err(format!(
            "{} pads values with spaces and cannot hold the text form: use text or varchar",
            info.full
        )),
        (Dialect::MySql, Form::Binary)
            if matches!(
                t,
                "varbinary" | "blob" | "tinyblob" | "mediumblob" | "longblob"
            ) =>
        {
            Ok(())
        }
        (Dialect::MySql, Form::Text)
            if matches!(
                t,
                "varchar" | "text" | "tinytext" | "mediumtext" | "longtext"
            ) =>
        {
            Ok(())
        }
        (_, Form::Binary) => Err(format!(
            "{} cannot hold binary envelope values: use {} (or form = \"text\" with a text column)",
            info.full,
            if d == Dialect::Postgres {
                "bytea"
            } else {
                "VARBINARY(n) or a BLOB type"
            }
        )),
        (_, Form::Text) => Err(format!(
            "{} cannot hold text-form envelope values: use {} (or the binary form)",
            info.full,
            if d == Dialect::Postgres {
                "text or varchar(n)"
            } else {
                "VARCHAR(n) or a TEXT type"
            }
        )),
    }
}

/// How many bytes (binary) or characters (text) a column holds; `None` for unbounded.
fn capacity(d: Dialect, form: Form, info: &ColumnInfo) -> Option<u64> {
    if let Some(n) = info.max_len {
        return Some(n.max(0) as u64);
    }
    match (d, form, info.ty.as_str()) {
        (Dialect::MySql, _, "tinyblob" | "tinytext") => Some(255),
        (Dialect::MySql, _, "blob" | "text") => Some(65_535),
        (Dialect::MySql, _, "mediumblob" | "mediumtext") => Some(16_777_215),
        _ => None,
    }
}

/// The read and write expressions of a source column of SQL type `info` holding `ty` values:
/// the read gives a canonical shape ([`Raw::Int`](crate::db::Raw::Int) for integers and booleans, text for text-like
/// types, bytes for bytes); the write (`{}` is the parameter) turns that shape back into the
/// column's type.
fn source_sql(
    d: Dialect,
    ty: ValueType,
    col: &str,
    info: &ColumnInfo,
) -> Result<(String, String), String> {
    let t = info.ty.as_str();
    let refuse = || {
        Err(format!(
            "a {} column cannot be the source of {} values",
            info.full,
            ty.name()
        ))
    };
    let pg_int = matches!(t, "int2" | "int4" | "int8");
    let my_int = matches!(t, "tinyint" | "smallint" | "mediumint" | "int" | "bigint");
    let pg_text = matches!(t, "text" | "varchar" | "bpchar" | "citext");
    let my_text = matches!(
        t,
        "char" | "varchar" | "text" | "tinytext" | "mediumtext" | "longtext"
    );
    let plain = || (col.to_owned(), "{}".to_owned());
    let pg_cast_back = |read: String| (read, format!("CAST({{}} AS {t})"));
    Ok(match (d, ty) {
        (
            Dialect::Sqlite,
            ValueType::Timestamp
            | ValueType::Datetime
            | ValueType::Date
            | ValueType::Json
            | ValueType::Uuid
            | ValueType::String
            | ValueType::U64,
        ) => (format!("CAST({col} AS TEXT)"), "{}".to_owned()),
        (Dialect::Sqlite, _) => plain(),

        (Dialect::Postgres, ValueType::Bytes) if t == "bytea" => plain(),
        (Dialect::Postgres, ValueType::String) if pg_text => {
            (format!("CAST({col} AS TEXT)"), "{}".into())
        }
        (
            Dialect::Postgres,
            ValueType::I16 | ValueType::I32 | ValueType::I64 | ValueType::U16 | ValueType::U32,
        ) if pg_int => (format!("CAST({col} AS BIGINT)"), "{}".into()),
        // PostgreSQL has no unsigned types: u64 values live in bigint (up to 2^63 - 1) or numeric.
        (Dialect::Postgres, ValueType::U64) if pg_int || t == "numeric" => {
            pg_cast_back(format!("CAST({col} AS TEXT)"))
        }
        (Dialect::Postgres, ValueType::Bool) if t == "bool" => (
            format!("CAST({col} AS INTEGER)"),
            "CAST(CAST({} AS INTEGER) AS boolean)".into(),
        ),
        (Dialect::Postgres, ValueType::Uuid) if t == "uuid" || pg_text => {
            pg_cast_back(format!("CAST({col} AS TEXT)"))
        }
        // ISO output (the session's DateStyle): a BC date reads as `0044-03-15 BC`, which the
        // date parser refuses, rather than as the wrong year.
        (Dialect::Postgres, ValueType::Date) if t == "date" => {
            pg_cast_back(format!("CAST({col} AS TEXT)"))
        }
        (Dialect::Postgres, ValueType::Timestamp) if t == "timestamptz" => pg_cast_back(format!(
            "to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"AD')"
        )),
        (Dialect::Postgres, ValueType::Timestamp) if t == "timestamp" => pg_cast_back(format!(
            "to_char({col}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"AD')"
        )),
        (Dialect::Postgres, ValueType::Datetime) if t == "timestamp" => {
            pg_cast_back(format!("to_char({col}, 'YYYY-MM-DD\"T\"HH24:MI:SS.USAD')"))
        }
        (Dialect::Postgres, ValueType::Json) if matches!(t, "json" | "jsonb") || pg_text => {
            pg_cast_back(format!("CAST({col} AS TEXT)"))
        }

        (Dialect::MySql, ValueType::Bytes)
            if matches!(
                t,
                "varbinary" | "binary" | "blob" | "tinyblob" | "mediumblob" | "longblob"
            ) =>
        {
            plain()
        }
        (Dialect::MySql, ValueType::String) if my_text => {
            (format!("CAST({col} AS CHAR)"), "{}".into())
        }
        (
            Dialect::MySql,
            ValueType::I16
            | ValueType::I32
            | ValueType::I64
            | ValueType::Bool
            | ValueType::U16
            | ValueType::U32,
        ) if my_int => (format!("CAST({col} AS SIGNED)"), "{}".into()),
        // As text: BIGINT UNSIGNED goes beyond i64.
        (Dialect::MySql, ValueType::U64) if my_int => (format!("CAST({col} AS CHAR)"), "{}".into()),
        (Dialect::MySql, ValueType::Uuid) if my_text || t == "uuid" => {
            (format!("CAST({col} AS CHAR)"), "{}".into())
        }
        (Dialect::MySql, ValueType::Date) if t == "date" => {
            (format!("DATE_FORMAT({col}, '%Y-%m-%d')"), "{}".into())
        }
        (Dialect::MySql, ValueType::Timestamp) if matches!(t, "datetime" | "timestamp") => (
            format!("DATE_FORMAT({col}, '%Y-%m-%dT%H:%i:%s.%fZ')"),
            "{}".into(),
        ),
        (Dialect::MySql, ValueType::Datetime) if matches!(t, "datetime" | "timestamp") => (
            format!("DATE_FORMAT({col}, '%Y-%m-%dT%H:%i:%s.%f')"),
            "{}".into(),
        ),
        (Dialect::MySql, ValueType::Json) if t == "json" || my_text => {
            (format!("CAST({col} AS CHAR)"), "{}".into())
        }
        _ => return refuse(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_types_that_cannot_hold_a_form_are_refused() {
        let info = |ty: &str| ColumnInfo {
            name: "c".into(),
            ty: ty.into(),
            full: ty.into(),
            max_len: None,
        };
        assert!(form_fits(Dialect::Postgres, Form::Binary, &info("text")).is_err());
        assert!(form_fits(Dialect::Postgres, Form::Text, &info("bytea")).is_err());
        assert!(
            form_fits(Dialect::Postgres, Form::Text, &info("bpchar"))
                .unwrap_err()
                .contains("pads")
        );
        assert!(form_fits(Dialect::MySql, Form::Binary, &info("varchar")).is_err());
        assert!(form_fits(Dialect::MySql, Form::Binary, &info("blob")).is_ok());
        assert_eq!(
            capacity(Dialect::MySql, Form::Binary, &info("blob")),
            Some(65_535)
        );
        assert!(source_sql(Dialect::Postgres, ValueType::I64, "c", &info("text")).is_err());
        assert!(source_sql(Dialect::MySql, ValueType::Date, "c", &info("date")).is_ok());
    }
}
