//! `--access-log PATH|-`: one JSON line per flow, written off the data path.
//!
//! Use: `let (log, writer) = access_log::open(target, 16_384)?;` at start-up ("-" is stdout;
//! a path is opened for appending, created if missing). `writer` is a [`WriterThread`]:
//! [`WriterThread::reopen`] (on SIGUSR1) makes the writer finish what it has for the current
//! file, then open the path again, so a log rotated by renaming loses no line and needs no
//! copytruncate. Give each worker a clone of `log`; when a
//! flow is released the worker fills a [`FlowRecord`] and calls [`AccessLog::log`], which never
//! blocks: records go over a bounded channel and are counted in [`AccessLog::dropped`] when it is
//! full. The writer thread formats, buffers and writes them; it flushes at most 100 ms after a
//! record arrives and when the last `AccessLog` clone is dropped, then exits (join
//! `writer.into_thread()` after the workers have stopped to be sure everything is on disk).
//!
//! An `AccessLog` is a sender: while any clone lives, the writer runs. Whoever only reads the
//! counters (the admin endpoint, which lives until the process exits) takes
//! [`AccessLog::counters`] instead, which does not keep the writer alive.
//!
//! This module sits below both the workers (which log) and the control side (which starts the
//! writer and shows the counters), so neither imports the other for it.
//!
//! A line looks like (one line, wrapped here):
//!
//! ```text
//! {"start":"2025-01-31T12:00:00.123Z","client":"192.0.2.7:51000","listener":"0.0.0.0:8080",
//!  "backend":"10.0.0.11:80","bytes_client_to_backend":120,"bytes_backend_to_client":5400,
//!  "duration_ms":12.345,"connect_ms":0.210,"reason":"done"}
//! ```
//!
//! `backend` and `connect_ms` are `null` when no connect succeeded; `reason` uses the same names
//! as the `reason` label of `ringway_flows_closed_total` ([`CloseKind::as_str`]).
//!
//! Write errors (disk full, a closed stdout) never stop anything: the unwritten tail is kept and
//! retried every 100 ms, so lines are never split; while the backlog is over 1 MiB new records
//! are dropped (counted in `dropped`). Errors are counted in [`AccessLog::write_errors`] and
//! logged at most once per 10 s.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Select, Sender, TrySendError};
use log::{info, warn};

use crate::json;
use crate::metrics::CloseKind;

/// What the worker knows about a flow when it ends. Plain data; `backend` is an `Arc<str>` so a
/// name outlives the snapshot it came from (clone it from the snapshot's backend, or pass `None`
/// when no connect succeeded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    /// When the client connection was accepted. To avoid a wall-clock read per accept, the
    /// worker may compute it at the end as `SystemTime::now() - duration`.
    pub start: SystemTime,
    pub client: SocketAddr,
    /// The local address the client connected to.
    pub listener: SocketAddr,
    /// The backend that carried the flow.
    pub backend: Option<Arc<str>>,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    /// From accept to release.
    pub duration: Duration,
    /// From submitting the successful connect to its completion; `None` if none succeeded.
    pub connect: Option<Duration>,
    pub reason: CloseKind,
}

/// The sending side; cheap to clone, one per worker.
#[derive(Clone, Debug)]
pub struct AccessLog {
    records: Sender<FlowRecord>,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    dropped: AtomicU64,
    write_errors: AtomicU64,
}

/// Read-only view of an access log's counters. Unlike [`AccessLog`] it holds no sender, so it
/// never keeps the writer thread alive.
#[derive(Clone, Debug)]
pub struct AccessLogCounters(Arc<Counters>);

impl AccessLogCounters {
    /// Records lost: queue full, writer gone, or write backlog over its limit.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }

    /// Failed write attempts (each failing flush counts once).
    pub fn write_errors(&self) -> u64 {
        self.0.write_errors.load(Ordering::Relaxed)
    }
}

/// The writer flushes at most this long after a record arrives, and retries a failed write this
/// often.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes buffered before a write is issued without waiting for the interval.
const WRITE_BATCH: usize = 64 * 1024;
/// Largest unwritten backlog while writes fail; beyond it records are dropped.
const MAX_BACKLOG: usize = 1024 * 1024;
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Opens `target` ("-" for stdout, else a file opened for appending) and starts the writer
/// thread. `capacity` is how many records may wait in the channel (each takes about 150 bytes,
/// allocated up front); at least 1.
pub fn open(target: &str, capacity: usize) -> io::Result<(AccessLog, WriterThread)> {
    let (out, path): (Box<dyn Write + Send>, _) = if target == "-" {
        (Box::new(io::stdout()), None)
    } else {
        (Box::new(open_append(target)?), Some(PathBuf::from(target)))
    };
    let (log, records) = AccessLog::channel(capacity);
    let counters = Arc::clone(&log.counters);
    // One request waiting is enough: a second one before it is handled changes nothing.
    let (reopen, reopen_requests) = crossbeam_channel::bounded(1);
    let thread = std::thread::Builder::new()
        .name("ringway-log".to_string())
        .spawn(move || {
            let mut writer = Writer::new(out, counters);
            writer.path = path;
            writer.run(records, reopen_requests)
        })?;
    Ok((log, WriterThread { thread, reopen }))
}

fn open_append(path: impl AsRef<std::path::Path>) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The writer thread and the way to ask it to reopen its file. Dropping it does not stop the
/// writer (the last `AccessLog` sender going away does).
pub struct WriterThread {
    thread: JoinHandle<()>,
    reopen: Sender<()>,
}

impl WriterThread {
    /// Asks the writer to write out what it holds to the current file, then open the path
    /// again (creating it if it was renamed away). Never blocks; does nothing for stdout.
    pub fn reopen(&self) {
        let _ = self.reopen.try_send(());
    }

    /// The thread, to join once every `AccessLog` sender is gone.
    pub fn into_thread(self) -> JoinHandle<()> {
        self.thread
    }
}

impl AccessLog {
    /// The sending side and the receiving end the writer drains.
    fn channel(capacity: usize) -> (AccessLog, Receiver<FlowRecord>) {
        let (records, receiver) = crossbeam_channel::bounded(capacity.max(1));
        let log = AccessLog {
            records,
            counters: Arc::new(Counters::default()),
        };
        (log, receiver)
    }

    /// Queues one record; never blocks. Counts it as dropped if the queue is full or the writer
    /// is gone.
    pub fn log(&self, record: FlowRecord) {
        match self.records.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The counters alone, for readers that must not keep the writer running.
    pub fn counters(&self) -> AccessLogCounters {
        AccessLogCounters(Arc::clone(&self.counters))
    }

    /// Records lost: queue full, writer gone, or write backlog over its limit.
    pub fn dropped(&self) -> u64 {
        self.counters().dropped()
    }

    /// Failed write attempts (each failing flush counts once).
    pub fn write_errors(&self) -> u64 {
        self.counters().write_errors()
    }
}

/// The writer thread's state.
struct Writer {
    out: Box<dyn Write + Send>,
    /// The file `out` was opened from, to reopen; `None` for stdout.
    path: Option<PathBuf>,
    /// A reopen waits for the old file to take its unwritten bytes (see `reopen`).
    reopen_wanted: bool,
    counters: Arc<Counters>,
    /// Formatted lines not yet written; always whole lines at the end, possibly the tail of a
    /// line at the start (after a partial write).
    pending: Vec<u8>,
    line: String,
    last_warning: Option<Instant>,
    suppressed: u64,
}

impl Writer {
    fn new(out: Box<dyn Write + Send>, counters: Arc<Counters>) -> Writer {
        Writer {
            out,
            path: None,
            reopen_wanted: false,
            counters,
            pending: Vec::with_capacity(WRITE_BATCH),
            line: String::with_capacity(512),
            last_warning: None,
            suppressed: 0,
        }
    }

    fn run(mut self, records: Receiver<FlowRecord>, reopen: Receiver<()>) {
        let mut select = Select::new();
        let record_op = select.recv(&records);
        let reopen_op = select.recv(&reopen);
        // Set while `pending` holds data: when to write it at the latest.
        let mut flush_at: Option<Instant> = None;
        loop {
            let ready = match flush_at {
                None => Some(select.select()),
                Some(at) => select.select_deadline(at).ok(),
            };
            match ready {
                Some(op) if op.index() == record_op => match op.recv(&records) {
                    Ok(record) => {
                        self.push(&record);
                        // The deadline is checked here too: under steady load records keep
                        // arriving and the select might never time out.
                        let due = flush_at.is_some_and(|at| Instant::now() >= at);
                        if due || self.pending.len() >= WRITE_BATCH {
                            self.flush();
                        }
                    }
                    Err(_) => {
                        self.flush();
                        return;
                    }
                },
                Some(op) => match op.recv(&reopen) {
                    Ok(()) => self.reopen(),
                    // Nobody can ask any more: a disconnected channel is always ready.
                    Err(_) => select.remove(reopen_op),
                },
                None => self.flush(),
            }
            flush_at = match (self.pending.is_empty(), flush_at) {
                (true, _) => None,
                (false, Some(at)) if at > Instant::now() => Some(at),
                (false, _) => Some(Instant::now() + FLUSH_INTERVAL),
            };
        }
    }

    /// Writes what is pending to the current file (a rotated one keeps every line it was due),
    /// then opens the path again. If it cannot be opened, writing goes on to the old file.
    fn reopen(&mut self) {
        let Some(path) = self.path.clone() else {
            info!("SIGUSR1: the access log goes to stdout; nothing to reopen");
            return;
        };
        self.reopen_wanted = false;
        self.flush();
        if !self.pending.is_empty() {
            // The write failed, maybe halfway through a line: the rest of that line belongs in
            // the old file. Reopen after the next write that empties the backlog.
            self.reopen_wanted = true;
            return;
        }
        match open_append(&path) {
            Ok(file) => {
                self.out = Box::new(file);
                info!("access log: reopened {}", path.display());
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "access log: cannot reopen {}: {e}; still writing to the file opened before",
                    path.display()
                );
            }
        }
    }

    /// Formats a record into the backlog, or drops it if the backlog is full.
    fn push(&mut self, record: &FlowRecord) {
        self.line.clear();
        format_record(record, &mut self.line);
        if self.pending.len() + self.line.len() > MAX_BACKLOG {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.pending.extend_from_slice(self.line.as_bytes());
    }

    /// Writes as much of the backlog as the output takes; keeps the rest for the next attempt.
    fn flush(&mut self) {
        let mut written = 0;
        let mut error = None;
        while written < self.pending.len() {
            match self.out.write(&self.pending[written..]) {
                Ok(0) => {
                    error = Some(io::Error::from(io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        self.pending.drain(..written);
        if error.is_none() {
            if let Err(e) = self.out.flush() {
                error = Some(e);
            }
        }
        if let Some(e) = error {
            self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            if self
                .last_warning
                .is_none_or(|at| at.elapsed() >= WARN_INTERVAL)
            {
                warn!(
                    "access log: write failed: {e}; {} bytes waiting ({} similar errors since last report)",
                    self.pending.len(),
                    self.suppressed
                );
                self.last_warning = Some(Instant::now());
                self.suppressed = 0;
            } else {
                self.suppressed += 1;
            }
        }
        if self.reopen_wanted && self.pending.is_empty() {
            self.reopen();
        }
    }
}

/// Appends one JSON line (with its newline) for `record`.
fn format_record(record: &FlowRecord, out: &mut String) {
    out.push_str("{\"start\":\"");
    push_rfc3339_millis(record.start, out);
    let _ = write!(
        out,
        "\",\"client\":\"{}\",\"listener\":\"{}\",\"backend\":",
        record.client, record.listener
    );
    match &record.backend {
        Some(name) => json::push_string(name, out),
        None => out.push_str("null"),
    }
    let _ = write!(
        out,
        ",\"bytes_client_to_backend\":{},\"bytes_backend_to_client\":{},\"duration_ms\":",
        record.bytes_client_to_backend, record.bytes_backend_to_client
    );
    push_millis(record.duration, out);
    out.push_str(",\"connect_ms\":");
    match record.connect {
        Some(connect) => push_millis(connect, out),
        None => out.push_str("null"),
    }
    let _ = writeln!(out, ",\"reason\":\"{}\"}}", record.reason.as_str());
}

/// Milliseconds with microsecond precision, as a JSON number: `12.345`.
fn push_millis(d: Duration, out: &mut String) {
    let micros = d.as_micros();
    let _ = write!(out, "{}.{:03}", micros / 1000, micros % 1000);
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC). Times before 1970 are written as the epoch.
pub(crate) fn push_rfc3339_millis(t: SystemTime, out: &mut String) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    );
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day); Howard Hinnant's
/// `civil_from_days`, restricted to non-negative days so it is all unsigned arithmetic.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z % 146_097; // day of the 400-year era
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year
    let mp = (5 * doy + 2) / 153; // month, March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> FlowRecord {
        FlowRecord {
            start: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            client: "192.0.2.7:51000".parse().unwrap(),
            listener: "[::1]:8080".parse().unwrap(),
            backend: Some(Arc::from("10.0.0.11:80")),
            bytes_client_to_backend: 120,
            bytes_backend_to_client: 5400,
            duration: Duration::from_micros(12_345),
            connect: Some(Duration::from_micros(210)),
            reason: CloseKind::Done,
        }
    }

    /// A minimal JSON checker for one flat object of strings, numbers and nulls: returns the
    /// (key, raw value) pairs, string values unescaped, or an error.
    fn parse_flat_object(line: &str) -> Result<Vec<(String, String)>, String> {
        fn string(chars: &mut std::iter::Peekable<std::str::Chars>) -> Result<String, String> {
            if chars.next() != Some('"') {
                return Err("expected string".into());
            }
            let mut s = String::new();
            loop {
                match chars.next().ok_or("unterminated string")? {
                    '"' => return Ok(s),
                    '\\' => match chars.next().ok_or("bad escape")? {
                        '"' => s.push('"'),
                        '\\' => s.push('\\'),
                        '/' => s.push('/'),
                        'n' => s.push('\n'),
                        'r' => s.push('\r'),
                        't' => s.push('\t'),
                        'u' => {
                            let hex: String = chars.by_ref().take(4).collect();
                            let code = u32::from_str_radix(&hex, 16).map_err(|e| e.to_string())?;
                            s.push(char::from_u32(code).ok_or("bad \\u")?);
                        }
                        c => return Err(format!("bad escape {c}")),
                    },
                    c if (c as u32) < 0x20 => return Err("raw control character".into()),
                    c => s.push(c),
                }
            }
        }
        let mut chars = line.chars().peekable();
        let mut fields = Vec::new();
        if chars.next() != Some('{') {
            return Err("expected {".into());
        }
        loop {
            let key = string(&mut chars)?;
            if chars.next() != Some(':') {
                return Err("expected :".into());
            }
            let value = if chars.peek() == Some(&'"') {
                string(&mut chars)?
            } else {
                let mut raw = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    raw.push(c);
                    chars.next();
                }
                if raw != "null" && raw.parse::<f64>().is_err() {
                    return Err(format!("bad literal {raw:?}"));
                }
                raw
            };
            fields.push((key, value));
            match chars.next() {
                Some(',') => {}
                Some('}') if chars.next().is_none() => return Ok(fields),
                _ => return Err("expected , or } at the end".into()),
            }
        }
    }

    fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no field {key}"))
    }

    #[test]
    fn record_is_one_json_line_with_every_field() {
        let mut line = String::new();
        format_record(&record(), &mut line);
        let line = line.strip_suffix('\n').expect("ends with a newline");
        assert!(!line.contains('\n'));
        let fields = parse_flat_object(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "start",
                "client",
                "listener",
                "backend",
                "bytes_client_to_backend",
                "bytes_backend_to_client",
                "duration_ms",
                "connect_ms",
                "reason"
            ]
        );
        assert_eq!(field(&fields, "start"), "2023-11-14T22:13:20.123Z");
        assert_eq!(field(&fields, "client"), "192.0.2.7:51000");
        assert_eq!(field(&fields, "listener"), "[::1]:8080");
        assert_eq!(field(&fields, "backend"), "10.0.0.11:80");
        assert_eq!(field(&fields, "bytes_backend_to_client"), "5400");
        assert_eq!(field(&fields, "duration_ms"), "12.345");
        assert_eq!(field(&fields, "connect_ms"), "0.210");
        assert_eq!(field(&fields, "reason"), "done");
    }

    #[test]
    fn missing_backend_and_connect_are_null_and_names_escaped() {
        let mut r = record();
        r.backend = None;
        r.connect = None;
        r.reason = CloseKind::RefusedProxyHeader;
        let mut line = String::new();
        format_record(&r, &mut line);
        let fields = parse_flat_object(line.trim_end()).unwrap();
        assert_eq!(field(&fields, "backend"), "null");
        assert_eq!(field(&fields, "connect_ms"), "null");
        assert_eq!(field(&fields, "reason"), "refused_proxy_header");

        let weird = "db\"1\\\n\u{7}é";
        r.backend = Some(Arc::from(weird));
        line.clear();
        format_record(&r, &mut line);
        let fields = parse_flat_object(line.trim_end()).unwrap();
        assert_eq!(field(&fields, "backend"), weird);
    }

    #[test]
    fn rfc3339_dates() {
        let at = |secs: u64, millis: u64| {
            let mut s = String::new();
            push_rfc3339_millis(
                UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis),
                &mut s,
            );
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 999), "2000-02-29T00:00:00.999Z"); // leap day, 400-year rule
        assert_eq!(at(4_107_542_399, 1), "2100-02-28T23:59:59.001Z"); // 2100 is not leap
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
        assert_eq!(at(1_709_251_199, 0), "2024-02-29T23:59:59.000Z");
        let mut s = String::new();
        push_rfc3339_millis(UNIX_EPOCH - Duration::from_secs(5), &mut s);
        assert_eq!(s, "1970-01-01T00:00:00.000Z");
        // Every day for 1000 years maps to a valid date, increasing day by day.
        let mut last = (1969, 12, 31);
        for days in 0..366_000 {
            let date = civil_from_days(days);
            assert!(date > last && (1..=12).contains(&date.1) && (1..=31).contains(&date.2));
            last = date;
        }
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let (log, receiver) = AccessLog::channel(2);
        let other_worker = log.clone();
        for _ in 0..3 {
            log.log(record());
        }
        other_worker.log(record());
        assert_eq!(log.dropped(), 2);
        assert_eq!(receiver.len(), 2);
        drop(receiver);
        log.log(record()); // writer gone: counted, not an error
        assert_eq!(other_worker.dropped(), 3);
    }

    #[test]
    fn writer_writes_every_record_then_exits_when_senders_drop() {
        let path = std::env::temp_dir().join(format!(
            "ringway-access-log-test-{}.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let (log, writer) = open(path.to_str().unwrap(), 1024).unwrap();
        let worker = log.clone();
        for i in 0..100 {
            let mut r = record();
            r.bytes_client_to_backend = i;
            if i % 2 == 0 {
                worker.log(r);
            } else {
                log.log(r);
            }
        }
        // A counters handle, as the admin endpoint keeps, must not keep the writer running.
        let counters = log.counters();
        drop(log);
        drop(worker);
        writer.into_thread().join().unwrap();
        assert_eq!(counters.dropped(), 0);
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 100);
        let mut seen: Vec<u64> = lines
            .iter()
            .map(|line| {
                let fields = parse_flat_object(line).unwrap();
                field(&fields, "bytes_client_to_backend").parse().unwrap()
            })
            .collect();
        seen.sort();
        assert_eq!(seen, (0..100).collect::<Vec<u64>>());
    }

    #[test]
    fn reopen_finishes_the_old_file_then_writes_to_the_path_again() {
        let dir = std::env::temp_dir().join(format!("ringway-reopen-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let rotated = dir.join("access.log.1");
        let mut writer = Writer::new(
            Box::new(open_append(&path).unwrap()),
            Arc::new(Counters::default()),
        );
        writer.path = Some(path.clone());
        writer.push(&record());
        std::fs::rename(&path, &rotated).unwrap();
        // Queued before the reopen: belongs to the old (renamed) file.
        writer.push(&record());
        writer.reopen();
        writer.push(&record());
        writer.flush();
        let count = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().lines().count();
        assert_eq!(count(&rotated), 2);
        assert_eq!(count(&path), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reopen_waits_until_the_old_output_took_its_bytes() {
        let dir = std::env::temp_dir().join(format!("ringway-reopen-wait-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let old = Arc::new(std::sync::Mutex::new(Flaky {
            fail: true,
            taken: Vec::new(),
        }));
        let mut writer = Writer::new(
            Box::new(Shared(Arc::clone(&old))),
            Arc::new(Counters::default()),
        );
        writer.path = Some(path.clone());
        writer.push(&record());
        // The old output fails: the reopen is put off, nothing goes to the new file yet.
        writer.reopen();
        assert!(!path.exists());
        old.lock().unwrap().fail = false;
        writer.flush();
        // The old output took its whole line, then the path was opened.
        assert_eq!(
            String::from_utf8(old.lock().unwrap().taken.clone())
                .unwrap()
                .lines()
                .count(),
            1
        );
        writer.push(&record());
        writer.flush();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert!(old.lock().unwrap().taken.ends_with(b"\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A `Flaky` output the test keeps a handle on while the writer owns the other.
    struct Shared(Arc<std::sync::Mutex<Flaky>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// An output that fails every write until `fail` is cleared, then takes 5 bytes at a time.
    struct Flaky {
        fail: bool,
        taken: Vec<u8>,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.fail {
                return Err(io::Error::other("disk full"));
            }
            let n = buf.len().min(5);
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn write_errors_are_counted_and_lines_stay_whole() {
        let counters = Arc::new(Counters::default());
        let mut writer = Writer::new(Box::new(io::sink()), Arc::clone(&counters));
        // Swap in a failing output we can inspect afterwards through a shared cell.
        let shared = Arc::new(std::sync::Mutex::new(Flaky {
            fail: true,
            taken: Vec::new(),
        }));
        writer.out = Box::new(Shared(Arc::clone(&shared)));

        writer.push(&record());
        writer.flush();
        writer.push(&record());
        writer.flush();
        assert_eq!(counters.write_errors.load(Ordering::Relaxed), 2);
        assert!(shared.lock().unwrap().taken.is_empty());

        shared.lock().unwrap().fail = false;
        writer.flush();
        let taken = String::from_utf8(shared.lock().unwrap().taken.clone()).unwrap();
        let lines: Vec<&str> = taken.lines().collect();
        assert_eq!(lines.len(), 2);
        for line in lines {
            parse_flat_object(line).unwrap();
        }
        assert!(writer.pending.is_empty());

        // A backlog over its limit drops new records instead of growing.
        shared.lock().unwrap().fail = true;
        let per_line = taken.len() / 2;
        for _ in 0..MAX_BACKLOG / per_line + 10 {
            writer.push(&record());
        }
        assert!(writer.pending.len() <= MAX_BACKLOG);
        assert!(counters.dropped.load(Ordering::Relaxed) >= 10);
    }
}
