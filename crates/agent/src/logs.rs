//! Machine logs: every line a machine writes to stdout or stderr, timestamped, as JSON
//! lines in `machine.log` in its directory, rotated at a size bound (one older file,
//! `machine.log.1`, is kept). Readers get the recent lines and can follow new ones across
//! rotations. A destroyed machine's logs move to an archive kept for a retention period.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub const LOG_FILE: &str = "machine.log";
/// Size at which `machine.log` is rotated.
pub const ROTATE_BYTES: u64 = 8 * 1024 * 1024;
/// How long a destroyed machine's logs are kept.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest line kept whole; longer output is split.
const MAX_LINE: usize = 64 * 1024;

/// One line as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub timestamp: String,
    pub stream: String,
    pub message: String,
}

fn rotated(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".1");
    path.with_file_name(name)
}

/// Appends timestamped lines to a machine log, rotating it at a size bound.
pub struct LogWriter {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    limit: u64,
}

impl LogWriter {
    pub fn open(machine_dir: &Path) -> Self {
        Self::with_limit(&machine_dir.join(LOG_FILE), ROTATE_BYTES)
    }

    pub fn with_limit(path: &Path, limit: u64) -> Self {
        let written = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let file = OpenOptions::new().create(true).append(true).open(path).ok();
        Self {
            path: path.to_path_buf(),
            file,
            written,
            limit,
        }
    }

    pub fn line(&mut self, stream: &str, message: &str) {
        if self.written >= self.limit {
            let _ = std::fs::rename(&self.path, rotated(&self.path));
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
            self.written = 0;
        }
        let record = Record {
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            stream: stream.to_string(),
            message: message.to_string(),
        };
        let Ok(mut line) = serde_json::to_string(&record) else {
            return;
        };
        line.push('\n');
        if let Some(file) = self.file.as_mut()
            && file.write_all(line.as_bytes()).is_ok()
        {
            self.written += line.len() as u64;
        }
    }
}

/// Copies `pipe` into the log line by line until it closes (one thread per stream).
pub fn pump(
    stream: &'static str,
    pipe: impl Read + Send + 'static,
    log: std::sync::Arc<std::sync::Mutex<LogWriter>>,
) -> std::thread::JoinHandle<()> {
    let copy = move || {
        let mut reader = BufReader::new(pipe);
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match reader
                .by_ref()
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut buffer)
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buffer);
                    let text = text.trim_end_matches(['\n', '\r']);
                    log.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .line(stream, text);
                }
            }
        }
    };
    // A small stack: these threads live as long as the machine, in every supervisor.
    std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(copy)
        .unwrap_or_else(|_| std::thread::spawn(|| {}))
}

fn parse_lines(text: &str) -> impl Iterator<Item = Record> + '_ {
    text.lines().filter_map(|l| serde_json::from_str(l).ok())
}

/// The last `limit` records of the log at `path` (its rotated part included).
pub fn tail(path: &Path, limit: usize) -> Vec<Record> {
    let mut records: VecDeque<Record> = VecDeque::with_capacity(limit.min(4096));
    for file in [rotated(path), path.to_path_buf()] {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for record in parse_lines(&text) {
            if records.len() == limit {
                records.pop_front();
            }
            if limit > 0 {
                records.push_back(record);
            }
        }
    }
    records.into()
}

/// Follows a log from its current end: new records as they are written, across rotations.
pub struct Follower {
    path: PathBuf,
    file: Option<File>,
    inode: u64,
    offset: u64,
    partial: String,
}

impl Follower {
    /// Starts at the current end of `path` (or at its start once it appears).
    pub fn at_end(path: &Path) -> Self {
        let mut follower = Self {
            path: path.to_path_buf(),
            file: None,
            inode: 0,
            offset: 0,
            partial: String::new(),
        };
        if let Ok(mut file) = File::open(path) {
            follower.inode = file.metadata().map(|m| m.ino()).unwrap_or(0);
            follower.offset = file.seek(SeekFrom::End(0)).unwrap_or(0);
            follower.file = Some(file);
        }
        follower
    }

    fn drain_open_file(&mut self, out: &mut Vec<Record>) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let mut chunk = String::new();
        if file.read_to_string(&mut chunk).is_ok() {
            self.offset += chunk.len() as u64;
            self.partial.push_str(&chunk);
            if let Some(end) = self.partial.rfind('\n') {
                let complete: String = self.partial.drain(..=end).collect();
                out.extend(parse_lines(&complete));
            }
        }
    }

    /// Records written since the last call.
    pub fn poll(&mut self) -> Vec<Record> {
        let mut out = Vec::new();
        self.drain_open_file(&mut out);
        let current = std::fs::metadata(&self.path).ok();
        let replaced = match (&current, self.file.is_some()) {
            (Some(meta), true) => meta.ino() != self.inode || meta.len() < self.offset,
            (Some(_), false) => true,
            (None, _) => false,
        };
        if replaced {
            // Rotated (or created): the old file was read to its end above.
            if let Ok(file) = File::open(&self.path) {
                self.inode = file.metadata().map(|m| m.ino()).unwrap_or(0);
                self.offset = 0;
                self.partial.clear();
                self.file = Some(file);
                self.drain_open_file(&mut out);
            }
        }
        out
    }
}

/// Moves a machine's logs into the archive (`archive_dir/<id>/`) when it is destroyed.
pub fn archive(machine_dir: &Path, archive_dir: &Path, machine_id: &str) {
    let target = archive_dir.join(machine_id);
    if std::fs::create_dir_all(&target).is_err() {
        return;
    }
    let log = machine_dir.join(LOG_FILE);
    for file in [rotated(&log), log.clone()] {
        if let Some(name) = file.file_name() {
            let _ = std::fs::rename(&file, target.join(name));
        }
    }
    let _ = std::fs::write(target.join("destroyed_at"), chrono::Utc::now().to_rfc3339());
}

/// Removes archived logs older than `retention`.
pub fn expire(archive_dir: &Path, retention: Duration) {
    let Ok(entries) = std::fs::read_dir(archive_dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.filter_map(|e| e.ok()) {
        let marker = entry.path().join("destroyed_at");
        let age = std::fs::metadata(&marker)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok());
        if age.is_some_and(|age| age >= retention) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_one_older_file_and_tail_spans_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut writer = LogWriter::with_limit(&path, 200);
        for i in 0..20 {
            writer.line("stdout", &format!("line {i}"));
        }
        assert!(
            std::fs::metadata(&path).unwrap().len() < 400,
            "the live file stays near the bound"
        );
        assert!(rotated(&path).exists());
        let last = tail(&path, 3);
        let messages: Vec<&str> = last.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(messages, ["line 17", "line 18", "line 19"]);
        assert!(tail(&path, 0).is_empty());
    }

    #[test]
    fn follower_sees_new_lines_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut writer = LogWriter::with_limit(&path, 150);
        writer.line("stdout", "before");
        let mut follower = Follower::at_end(&path);
        assert!(follower.poll().is_empty(), "starts at the end");
        let mut seen = Vec::new();
        for i in 0..6 {
            writer.line("stderr", &format!("new {i}"));
            seen.extend(follower.poll().into_iter().map(|r| r.message));
        }
        assert!(rotated(&path).exists(), "the log rotated meanwhile");
        assert_eq!(seen, (0..6).map(|i| format!("new {i}")).collect::<Vec<_>>());
    }

    #[test]
    fn follower_waits_for_a_log_that_does_not_exist_yet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut follower = Follower::at_end(&path);
        assert!(follower.poll().is_empty());
        LogWriter::with_limit(&path, 1000).line("stdout", "first");
        assert_eq!(follower.poll()[0].message, "first");
    }

    #[test]
    fn archived_logs_expire_after_retention() {
        let dir = tempfile::tempdir().unwrap();
        let machine = dir.path().join("m");
        std::fs::create_dir_all(&machine).unwrap();
        LogWriter::open(&machine).line("stdout", "kept");
        let archive_dir = dir.path().join("archive");
        archive(&machine, &archive_dir, "m1");
        assert_eq!(
            tail(&archive_dir.join("m1").join(LOG_FILE), 10)[0].message,
            "kept"
        );
        expire(&archive_dir, Duration::from_secs(3600));
        assert!(archive_dir.join("m1").exists());
        expire(&archive_dir, Duration::ZERO);
        assert!(!archive_dir.join("m1").exists());
    }
}
