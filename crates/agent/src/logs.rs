//! Machine logs: every line a machine writes to stdout or stderr, timestamped, as JSON
//! lines in `machine.log` in its directory, rotated at a size bound with a bounded number
//! of older files (`machine.log.1` the newest of them), like Docker's json-file driver with
//! max-size and max-file. Readers get the recent lines and can follow new ones across
//! rotations. A destroyed machine's logs move to an archive kept for a retention period.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub const LOG_FILE: &str = "machine.log";
/// The machine's log limits, written by the agent before each start, read by its supervisor.
pub const LIMITS_FILE: &str = "log-limits.json";
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

/// How much of its log a machine keeps: files of up to `max_size` bytes, `max_files` of
/// them in all (the live one included), as Docker's json-file max-size and max-file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLimits {
    pub max_size: u64,
    pub max_files: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_size: 10 * 1024 * 1024,
            max_files: 3,
        }
    }
}

impl LogLimits {
    /// Limits that keep at least one line and one file.
    pub fn new(max_size: u64, max_files: u32) -> Self {
        Self {
            max_size: max_size.max(1),
            max_files: max_files.max(1),
        }
    }

    /// Records the limits for the machine in `machine_dir`.
    pub fn save(&self, machine_dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(machine_dir.join(LIMITS_FILE), text)
    }

    /// The limits recorded for the machine in `machine_dir`, or the defaults.
    pub fn load(machine_dir: &Path) -> Self {
        std::fs::read(machine_dir.join(LIMITS_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<LogLimits>(&bytes).ok())
            .map(|l| Self::new(l.max_size, l.max_files))
            .unwrap_or_default()
    }
}

/// The `n`th older file of the log at `path` (`machine.log.n`).
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{n}"));
    path.with_file_name(name)
}

/// The older files of the log at `path` that exist, oldest first.
fn rotated_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..)
        .map(|n| rotated(path, n))
        .take_while(|p| p.exists())
        .collect();
    files.reverse();
    files
}

/// Appends timestamped lines to a machine log, rotating it at a size bound.
pub struct LogWriter {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    limits: LogLimits,
}

impl LogWriter {
    /// The log of the machine in `machine_dir`, under the limits recorded there.
    pub fn open(machine_dir: &Path) -> Self {
        Self::with_limits(&machine_dir.join(LOG_FILE), LogLimits::load(machine_dir))
    }

    pub fn with_limits(path: &Path, limits: LogLimits) -> Self {
        let written = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let file = OpenOptions::new().create(true).append(true).open(path).ok();
        Self {
            path: path.to_path_buf(),
            file,
            written,
            limits,
        }
    }

    /// Shifts `machine.log` → `.1` → `.2` …, dropping what falls beyond `max_files`.
    fn rotate(&self) {
        let keep_older = self.limits.max_files - 1;
        let mut beyond = keep_older.max(1);
        while rotated(&self.path, beyond).exists() {
            if beyond > keep_older {
                let _ = std::fs::remove_file(rotated(&self.path, beyond));
            }
            beyond += 1;
        }
        if keep_older == 0 {
            let _ = std::fs::remove_file(&self.path);
            return;
        }
        for n in (1..keep_older).rev() {
            let _ = std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1));
        }
        let _ = std::fs::rename(&self.path, rotated(&self.path, 1));
    }

    pub fn line(&mut self, stream: &str, message: &str) {
        if self.written >= self.limits.max_size {
            self.rotate();
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

/// The last `limit` records of the log at `path` (its older files included).
pub fn tail(path: &Path, limit: usize) -> Vec<Record> {
    let mut records: VecDeque<Record> = VecDeque::with_capacity(limit.min(4096));
    let mut files = rotated_files(path);
    files.push(path.to_path_buf());
    for file in files {
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
    let mut files = rotated_files(&log);
    files.push(log);
    for file in files {
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
        let mut writer = LogWriter::with_limits(&path, LogLimits::new(200, 2));
        for i in 0..20 {
            writer.line("stdout", &format!("line {i}"));
        }
        assert!(
            std::fs::metadata(&path).unwrap().len() < 400,
            "the live file stays near the bound"
        );
        assert!(rotated(&path, 1).exists() && !rotated(&path, 2).exists());
        let last = tail(&path, 3);
        let messages: Vec<&str> = last.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(messages, ["line 17", "line 18", "line 19"]);
        assert!(tail(&path, 0).is_empty());
    }

    #[test]
    fn limits_recorded_for_a_machine_bound_its_files_and_their_size() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(LogLimits::load(dir.path()), LogLimits::default());
        LogLimits::new(300, 3).save(dir.path()).unwrap();
        let mut writer = LogWriter::open(dir.path());
        for i in 0..100 {
            writer.line("stdout", &format!("line {i:03}"));
        }
        let path = dir.path().join(LOG_FILE);
        let files = rotated_files(&path);
        assert_eq!(files, [rotated(&path, 2), rotated(&path, 1)]);
        for file in files.iter().chain([&path]) {
            let size = std::fs::metadata(file).unwrap().len();
            assert!(size < 300 + 100, "{} holds {size} bytes", file.display());
        }
        let kept = tail(&path, 1000);
        let first: u32 = kept[0].message[5..].parse().unwrap();
        assert_eq!(kept.last().unwrap().message, "line 099");
        assert_eq!(
            kept.len() as u32,
            100 - first,
            "no gap from the oldest kept line on"
        );
        assert!(first > 50, "older lines were dropped: {first}");

        // Fewer files later: the surplus goes at the next rotation.
        let mut writer = LogWriter::with_limits(&path, LogLimits::new(300, 1));
        for i in 0..10 {
            writer.line("stdout", &format!("again {i}"));
        }
        assert!(rotated_files(&path).is_empty());
        assert_eq!(tail(&path, 1).last().unwrap().message, "again 9");
    }

    #[test]
    fn follower_sees_new_lines_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut writer = LogWriter::with_limits(&path, LogLimits::new(150, 2));
        writer.line("stdout", "before");
        let mut follower = Follower::at_end(&path);
        assert!(follower.poll().is_empty(), "starts at the end");
        let mut seen = Vec::new();
        for i in 0..6 {
            writer.line("stderr", &format!("new {i}"));
            seen.extend(follower.poll().into_iter().map(|r| r.message));
        }
        assert!(rotated(&path, 1).exists(), "the log rotated meanwhile");
        assert_eq!(seen, (0..6).map(|i| format!("new {i}")).collect::<Vec<_>>());
    }

    #[test]
    fn follower_waits_for_a_log_that_does_not_exist_yet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut follower = Follower::at_end(&path);
        assert!(follower.poll().is_empty());
        LogWriter::with_limits(&path, LogLimits::default()).line("stdout", "first");
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
