//! Appends rows to an SQLite database on a volume, each in its own transaction, and prints
//! `ack <id>` once the commit has returned; `check` reports the database's integrity and
//! which rows it holds. See README.md.

use std::io::Write;
use std::process::ExitCode;

use rusqlite::{Connection, params};

fn db_path() -> String {
    std::env::var("DB_PATH").unwrap_or_else(|_| "/data/db.sqlite".into())
}

/// The payload of row `id`: 200 to 6,000 bytes that depend on the id alone, so rows span
/// and split pages and a damaged row can be told from a good one.
fn payload(id: i64) -> Vec<u8> {
    let mut state = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let len = 200 + (state % 5_800) as usize;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn open() -> rusqlite::Result<Connection> {
    let db = Connection::open(db_path())?;
    let mode = std::env::var("JOURNAL_MODE").unwrap_or_else(|_| "wal".into());
    let _: String = db.query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))?;
    db.execute_batch(
        "PRAGMA synchronous=FULL;
         CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, payload BLOB NOT NULL);",
    )?;
    Ok(db)
}

fn integrity(db: &Connection) -> rusqlite::Result<String> {
    let mut statement = db.prepare("PRAGMA integrity_check")?;
    let lines: Vec<String> = statement
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(lines.join("; "))
}

fn write_forever(db: &Connection) -> rusqlite::Result<()> {
    let last: i64 = db.query_row("SELECT coalesce(max(id), 0) FROM rows", [], |r| r.get(0))?;
    let mut out = std::io::stdout().lock();
    // The start time tells one start from another when no row came between.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "writer up: integrity {}, last id {last}, started {started}",
        integrity(db)?
    );
    let mut id = last;
    loop {
        id += 1;
        db.execute(
            "INSERT INTO rows (id, payload) VALUES (?1, ?2)",
            params![id, payload(id)],
        )?;
        // Autocommit: the INSERT has committed (and, with synchronous=FULL, been synced)
        // when execute returns.
        let _ = writeln!(out, "ack {id}");
        let _ = out.flush();
    }
}

fn check(db: &Connection) -> rusqlite::Result<()> {
    println!("integrity {}", integrity(db)?);
    let mut statement = db.prepare("SELECT id, payload FROM rows ORDER BY id")?;
    let mut rows = statement.query([])?;
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    let mut bad = 0u64;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let data: Vec<u8> = row.get(1)?;
        if data != payload(id) {
            bad += 1;
        }
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == id => *end = id,
            _ => ranges.push((id, id)),
        }
    }
    let ranges: Vec<String> = ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect();
    println!("ids {}", ranges.join(","));
    println!("bad {bad}");
    Ok(())
}

fn main() -> ExitCode {
    let result = open().and_then(|db| match std::env::args().nth(1).as_deref() {
        Some("check") => check(&db),
        _ => write_forever(&db),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sqlite-writer: {}: {e}", db_path());
            ExitCode::FAILURE
        }
    }
}
