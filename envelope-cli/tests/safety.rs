//! The operator tool never destroys what it is given (the security review of 2026-12-05, issue
//! #24), on real databases:
//!
//! - a configured name that the database resolves to a column already in another role (MariaDB
//!   and SQLite ignore case) is refused before anything is written;
//! - a value the database refuses (too long for a `VARCHAR(n)`, not in a latin1 column's
//!   character set) fails that row, by name, and leaves it as it was; the rest of the batch is
//!   written. On MariaDB this holds with a non-strict server `sql_mode`, where a sealed value
//!   would otherwise be cut short silently;
//! - compare-and-set compares the bytes the application wrote: a latin1 column's non-ASCII
//!   values are encrypted (not "contended" forever), and on PostgreSQL a change in case only,
//!   under a case-insensitive ICU collation, is not overwritten.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{Kind, Target, lit};
use envelope_core::{Label, format};
use sqlx::Row;

/// The text of a text-form column's rows, by id.
async fn texts(t: &Target, table: &str, column: &str) -> Vec<(i64, Option<String>)> {
    let sql = format!("SELECT id, {column} FROM {table} ORDER BY id");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&t.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Open a text-form value.
async fn open_text(t: &Target, label: &str, value: &str) -> String {
    let keyring = t.keyring().await;
    let blob = format::from_text(value).unwrap_or_else(|e| panic!("{value:?}: {e}"));
    let pt = keyring
        .decrypt(&Label::new(label.to_owned()).unwrap(), &blob)
        .await
        .unwrap();
    String::from_utf8(pt).unwrap()
}

/// Wait until a job's ranges are planned (its first batch reads right after), then a little
/// more, so that what the test does next lands inside the batch's pause after its read.
async fn inside_the_first_batch(t: &Target) {
    let sql = format!(
        "SELECT COUNT(*) FROM {} WHERE job LIKE 'encrypt:%'",
        t.table("jobs")
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
            .fetch_one(&t.pool)
            .await
            .unwrap_or(0);
        if n > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
}

fn stdout_stderr(out: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `name = "email"` with `blind_index = { column = "Email" }` (and the same for the primary
/// key): one column in two roles on MariaDB and SQLite, a column that does not exist on
/// PostgreSQL. Refused with exit 2 and nothing written, on every database.
async fn case_variant_names_are_refused(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("roles");
    let blob = t.blob();
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email {blob}, email_bidx {blob})"
    ))
    .await;
    for i in 1..=5 {
        t.exec(&format!(
            "INSERT INTO {table} VALUES ({i}, {}, NULL)",
            t.bytes_literal(format!("user{i}@example.com").as_bytes())
        ))
        .await;
    }
    let before = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT email FROM {table} ORDER BY id"
    )))
    .fetch_all(&t.pool)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<Vec<u8>, _>(0))
    .collect::<Vec<_>>();
    let configs = [
        (
            "id",
            "name = \"email\"\nlabel = \"roles.email\"\ntype = \"string\"\nblind_index = { column = \"Email\" }",
        ),
        (
            "id",
            "name = \"EMAIL\"\nlabel = \"roles.email\"\ntype = \"string\"\nblind_index = { column = \"email\" }",
        ),
        (
            "ID",
            "name = \"id\"\nlabel = \"roles.id\"\ntype = \"string\"\nform = \"text\"",
        ),
    ];
    t.write_config("");
    t.expect(&["init"], 0);
    for (pk, column) in configs {
        t.write_config(&format!(
            "[[table]]\nname = \"{table}\"\nprimary_key = \"{pk}\"\n\n[[table.column]]\n{column}\n"
        ));
        let out = t.envelope(&["encrypt"]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{kind:?} {column}: {}",
            stdout_stderr(&out)
        );
        let out = t.envelope(&["encrypt", "--dry-run"]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{kind:?} {column}: {}",
            stdout_stderr(&out)
        );
    }
    let after = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT email, email_bidx FROM {table} ORDER BY id"
    )))
    .fetch_all(&t.pool)
    .await
    .unwrap();
    for (row, want) in after.iter().zip(&before) {
        assert_eq!(&row.get::<Vec<u8>, _>(0), want, "{kind:?}: a value changed");
        assert!(row.get::<Option<Vec<u8>>, _>(1).is_none());
    }
}

/// Sets MariaDB's global `sql_mode` for the time of a test (new sessions inherit it) and puts
/// the old one back on drop.
struct GlobalSqlMode {
    url: String,
    old: String,
}

impl GlobalSqlMode {
    async fn set(t: &Target, mode: &str) -> GlobalSqlMode {
        let old: String = sqlx::query_scalar("SELECT CAST(@@GLOBAL.sql_mode AS CHAR)")
            .fetch_one(&t.pool)
            .await
            .unwrap();
        t.exec(&format!("SET GLOBAL sql_mode = {}", lit(mode)))
            .await;
        GlobalSqlMode {
            url: t.url.clone(),
            old,
        }
    }
}

impl Drop for GlobalSqlMode {
    fn drop(&mut self) {
        // A fresh connection on a thread of its own: drop may run inside the test's runtime.
        let (url, old) = (self.url.clone(), self.old.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection as _;
                let mut c = sqlx::AnyConnection::connect(&url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SET GLOBAL sql_mode = {}",
                    lit(&old)
                )))
                .execute(&mut c)
                .await
                .unwrap();
            });
        })
        .join()
        .unwrap();
    }
}

/// A value the application lengthens while the tool works on its batch no longer fits its
/// `VARCHAR(100)` once sealed. The row fails by name (`ValueTooLong`, exit 1) and keeps the
/// application's value; the others are encrypted. On MariaDB the server's `sql_mode` is made
/// non-strict for the run, where the sealed value used to be cut to 100 characters silently
/// (exit 0, the plaintext gone and the ciphertext unreadable); on PostgreSQL the refusal used to
/// stop the whole job as "unreachable" (exit 3).
async fn a_value_too_long_fails_its_row(kind: Kind) {
    if kind == Kind::Sqlite {
        return; // SQLite does not enforce VARCHAR lengths
    }
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let _mode = if kind == Kind::MySql {
        Some(GlobalSqlMode::set(&t, "NO_ENGINE_SUBSTITUTION").await)
    } else {
        None
    };
    let table = t.table("width");
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, note VARCHAR(100))"
    ))
    .await;
    let short = |i: i64| format!("note-{i:05}");
    let long = "l".repeat(40);
    let text_len = |n: usize| 4 + format::sealed_len(n).div_ceil(3) * 4;
    assert!(text_len(short(1).len()) <= 100 && text_len(long.len()) > 100);
    let rows = 20;
    for i in 1..=rows {
        t.exec(&format!(
            "INSERT INTO {table} VALUES ({i}, {})",
            lit(&short(i))
        ))
        .await;
    }
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n[[table.column]]\nname = \"note\"\nlabel = \"width.note\"\ntype = \"string\"\nform = \"text\"\n"
    ));
    t.expect(&["init"], 0);
    let child = t.spawn(&["encrypt", "--json", "--debug-pause-after-read", "2s"]);
    // While the batch is between its read and its writes, the application lengthens row 7.
    inside_the_first_batch(&t).await;
    t.exec(&format!(
        "UPDATE {table} SET note = {} WHERE id = 7",
        lit(&long)
    ))
    .await;
    let out = child.wait_with_output().unwrap();
    let all = stdout_stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{kind:?}: {all}");
    let summary = Target::summary(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        summary["columns"][0]["failures"]["ValueTooLong"], 1,
        "{kind:?}: {all}"
    );
    assert!(!all.contains(&long), "a message quotes the value: {all}");
    for (id, v) in texts(&t, &table, "note").await {
        let v = v.unwrap();
        if id == 7 {
            assert_eq!(v, long, "{kind:?}: the application's value was not kept");
        } else {
            assert_eq!(open_text(&t, "width.note", &v).await, short(id));
        }
    }
}

/// MariaDB: an in-place text column in latin1 (and one in GBK) holding non-ASCII text. The
/// compare-and-set matches the value as the application wrote it, so every row is encrypted
/// (they used to be reported "contended" on every run, never encrypted); `decrypt` puts the
/// text back; a value the column's character set cannot hold fails its row by name and stays
/// sealed, and no message quotes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_latin1_and_gbk_columns_in_place() {
    let Some(t) = Target::new(Kind::MySql).await else {
        return;
    };
    let table = t.table("charsets");
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, \
         l VARCHAR(255) CHARACTER SET latin1, g VARCHAR(255) CHARACTER SET gbk)"
    ))
    .await;
    let latin = ["café", "naïve Zoë", "plain"];
    let gbk = ["中文", "汉字测试", "plain"];
    for (i, (l, g)) in latin.iter().zip(gbk).enumerate() {
        t.exec(&format!(
            "INSERT INTO {table} VALUES ({}, {}, {})",
            i + 1,
            lit(l),
            lit(g)
        ))
        .await;
    }
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n\
         [[table.column]]\nname = \"l\"\nlabel = \"cs.l\"\ntype = \"string\"\nform = \"text\"\n\n\
         [[table.column]]\nname = \"g\"\nlabel = \"cs.g\"\ntype = \"string\"\nform = \"text\"\n"
    ));
    t.expect(&["init"], 0);
    t.expect(&["encrypt"], 0);
    for (id, v) in texts(&t, &table, "l").await {
        assert_eq!(
            open_text(&t, "cs.l", &v.unwrap()).await,
            latin[id as usize - 1]
        );
    }
    for (id, v) in texts(&t, &table, "g").await {
        assert_eq!(
            open_text(&t, "cs.g", &v.unwrap()).await,
            gbk[id as usize - 1]
        );
    }
    t.expect(&["verify"], 0);

    // A value sealed by the application that latin1 cannot hold: decrypt fails that row only.
    let keyring = t.keyring().await;
    let sealed = keyring
        .encrypt(&Label::new("cs.l").unwrap(), "中文".as_bytes())
        .await
        .unwrap();
    let sealed = format::to_text(&sealed);
    t.exec(&format!(
        "UPDATE {table} SET l = {} WHERE id = 3",
        lit(&sealed)
    ))
    .await;
    let out = t.envelope(&["decrypt", "--yes", "--json", "--column", "l"]);
    let all = stdout_stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let summary = Target::summary(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        summary["columns"][0]["failures"]["NotInCharacterSet"], 1,
        "{all}"
    );
    assert!(!all.contains("中文") && !all.contains("\\xE4"), "{all}");
    let got = texts(&t, &table, "l").await;
    assert_eq!(got[0].1.as_deref(), Some("café"));
    assert_eq!(got[1].1.as_deref(), Some("naïve Zoë"));
    assert_eq!(got[2].1.as_deref(), Some(sealed.as_str()));
}

/// PostgreSQL: an in-place text column under a case-insensitive ICU collation. The application
/// changes a value in case only while the tool's batch is between its read and its write: the
/// compare-and-set sees the change (it used to match, and seal the old value over the new).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nondeterministic_collation_keeps_a_change_in_case() {
    let Some(t) = Target::new(Kind::Postgres).await else {
        return;
    };
    let collation = t.table("ci");
    t.exec(&format!(
        "CREATE COLLATION IF NOT EXISTS {collation} (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
    ))
    .await;
    let table = t.table("collated");
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email TEXT COLLATE {collation})"
    ))
    .await;
    for i in 1..=3 {
        t.exec(&format!(
            "INSERT INTO {table} VALUES ({i}, 'user{i}@example.com')"
        ))
        .await;
    }
    // The collation really ignores case.
    let same: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT email = 'USER1@EXAMPLE.COM' FROM {table} WHERE id = 1"
    )))
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert!(same);
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n[[table.column]]\nname = \"email\"\nlabel = \"ci.email\"\ntype = \"string\"\nform = \"text\"\n"
    ));
    t.expect(&["init"], 0);
    let child = t.spawn(&["encrypt", "--debug-pause-after-read", "2s"]);
    inside_the_first_batch(&t).await;
    let started = Instant::now();
    t.exec(&format!(
        "UPDATE {table} SET email = 'User2@Example.COM' WHERE id = 2"
    ))
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the update waited for the tool: the test no longer races"
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stdout_stderr(&out));
    let got = texts(&t, &table, "email").await;
    assert_eq!(
        open_text(&t, "ci.email", got[1].1.as_deref().unwrap()).await,
        "User2@Example.COM",
        "the application's change in case was overwritten"
    );
    assert_eq!(
        open_text(&t, "ci.email", got[0].1.as_deref().unwrap()).await,
        "user1@example.com"
    );
    t.exec(&format!("DROP TABLE {table}")).await;
    t.exec(&format!("DROP COLLATION {collation}")).await;
}

/// `verify` checks blind indexes: a sealed row whose index is missing, or is not the index of
/// its value, is one a lookup would silently miss, reported by name (exit 1).
async fn verify_checks_blind_indexes(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("bidx");
    let blob = t.blob();
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email {blob}, email_bidx {blob})"
    ))
    .await;
    for i in 1..=6 {
        t.exec(&format!(
            "INSERT INTO {table} VALUES ({i}, {}, NULL)",
            t.bytes_literal(format!("user{i}@example.com").as_bytes())
        ))
        .await;
    }
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n[[table.column]]\nname = \"email\"\nlabel = \"bidx.email\"\ntype = \"string\"\nblind_index = {{ column = \"email_bidx\", normalizer = \"case-folded\" }}\n"
    ));
    t.expect(&["init"], 0);
    t.expect(&["encrypt"], 0);
    t.expect(&["verify"], 0);
    t.exec(&format!(
        "UPDATE {table} SET email_bidx = NULL WHERE id = 2"
    ))
    .await;
    let other: Vec<u8> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT email_bidx FROM {table} WHERE id = 5"
    )))
    .fetch_one(&t.pool)
    .await
    .unwrap();
    t.exec(&format!(
        "UPDATE {table} SET email_bidx = {} WHERE id = 3",
        t.bytes_literal(&other)
    ))
    .await;
    let out = t.expect(&["verify", "--json"], 1);
    let summary = Target::summary(&out);
    let column = &summary["columns"][0];
    assert_eq!(column["failures"]["IndexMissing"], 1, "{kind:?}: {out}");
    assert_eq!(column["failures"]["IndexMismatch"], 1, "{kind:?}: {out}");
    let rows: Vec<String> = column["failing_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(rows, ["2", "3"], "{kind:?}: {out}");
    // `encrypt` fills the missing one again; the wrong one stays for the operator (or
    // `rotate --index`, which recomputes every index).
    t.expect(&["encrypt"], 0);
    t.expect(
        &[
            "rotate",
            "--index",
            &format!("{table}.email"),
            "--key-refresh",
            "0s",
        ],
        0,
    );
    t.expect(&["verify"], 0);
}

/// Commands on one column take turns, and a pass is not resumed over another command's work:
/// `decrypt` refuses while `encrypt` holds live leases; `status` shows the `encrypt` killed
/// with SIGKILL as interrupted at once; after `decrypt` has run, the next `encrypt` starts a
/// new pass (it used to resume at the old checkpoints, leave the rows before them in
/// plaintext, and exit 0).
async fn commands_on_one_column_take_turns(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("turns");
    t.plaintext_emails(&table, 200).await;
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n[[table.column]]\nname = \"email\"\nlabel = \"turns.email\"\ntype = \"string\"\n"
    ));
    t.expect(&["init"], 0);
    let mut encrypt = t.spawn(&[
        "encrypt",
        "--batch-size",
        "10",
        "--debug-pause-after-read",
        "100ms",
        "--lease",
        "1s",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while t.rows_seen("encrypt:").await < 50 {
        assert!(Instant::now() < deadline, "encrypt made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = t.envelope(&["decrypt", "--yes"]);
    let all = stdout_stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{kind:?}: {all}");
    assert!(all.contains("is working on"), "{kind:?}: {all}");
    encrypt.kill().unwrap(); // SIGKILL, to this child's pid only
    encrypt.wait().unwrap();
    let status = t.expect(&["status"], 0);
    assert!(
        status.contains("interrupted: its process is gone"),
        "{kind:?}: {status}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await; // the leases expire
    t.expect(&["decrypt", "--yes"], 0);
    let out = t.envelope(&["encrypt"]);
    let all = stdout_stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{kind:?}: {all}");
    assert!(all.contains("not resumed"), "{kind:?}: {all}");
    t.expect(&["verify"], 0);
}

/// A mixed-case key table name is one name for the key store (which writes it unquoted) and
/// for the CLI's checks: on PostgreSQL `init` used to create `envelopekeys_…` and every other
/// command then asked for `envelope init` forever.
async fn a_mixed_case_key_table_name_works(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("mixed");
    t.plaintext_emails(&table, 10).await;
    let config = format!(
        "database_url = {url:?}\nkms = \"local://{key}\"\nkey_table = \"EnvelopeKeys_{suffix}\"\njob_table = \"{jobs}\"\n\n\
         [[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n[[table.column]]\nname = \"email\"\nlabel = \"mixed.email\"\ntype = \"string\"\n",
        url = t.url,
        key = t.dir.path().join("master.key").display(),
        suffix = t.suffix,
        jobs = t.table("jobs"),
    );
    std::fs::write(t.dir.path().join("envelope.toml"), config).unwrap();
    t.expect(&["init"], 0);
    t.expect(&["encrypt"], 0);
    t.expect(&["verify"], 0);
    t.expect(&["keys", "list"], 0);
    t.expect(&["status"], 0);
}

/// A sealed `string` value whose plaintext is not UTF-8, with no blind index yet: the case-folded
/// normalizer cannot read it. That is the value's failure (`PlaintextType`, exit 1), not a KMS
/// outage: it used to be retried for `--patience` and end with exit 3.
async fn a_value_the_normalizer_cannot_read_fails_its_row(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("utf8");
    let blob = t.blob();
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email {blob}, email_bidx {blob})"
    ))
    .await;
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n[[table.column]]\nname = \"email\"\nlabel = \"utf8.email\"\ntype = \"string\"\nblind_index = {{ column = \"email_bidx\", normalizer = \"case-folded\" }}\n"
    ));
    t.expect(&["init"], 0);
    let keyring = t.keyring().await;
    let label = Label::new("utf8.email").unwrap();
    for (id, pt) in [(1, &b"ok@example.com"[..]), (2, &[0xff, 0xfe, 0x41][..])] {
        let sealed = keyring.encrypt(&label, pt).await.unwrap();
        t.exec(&format!(
            "INSERT INTO {table} VALUES ({id}, {}, NULL)",
            t.bytes_literal(&sealed)
        ))
        .await;
    }
    let started = Instant::now();
    let out = t.envelope(&["encrypt", "--json", "--patience", "20s"]);
    let all = stdout_stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{kind:?}: {all}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{kind:?}: it was retried"
    );
    let summary = Target::summary(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        summary["columns"][0]["failures"]["PlaintextType"], 1,
        "{all}"
    );
    assert_eq!(summary["columns"][0]["written"], 1, "{all}");
}

per_database!(
    a_value_the_normalizer_cannot_read_fails_its_row,
    a_mixed_case_key_table_name_works,
    commands_on_one_column_take_turns,
    case_variant_names_are_refused,
    a_value_too_long_fails_its_row,
    verify_checks_blind_indexes
);
