//! Counting: latency histogram (nanoseconds), successes, errors by kind, bytes; merging the
//! per-thread results; printing them as text or as one JSON object.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Highest latency the histogram can hold (60 s); longer ones are clamped and still counted.
pub const MAX_LATENCY_NS: u64 = 60_000_000_000;

#[derive(Clone, Debug)]
pub struct Stats {
    /// Latency of every successful operation, in nanoseconds.
    pub hist: Histogram<u64>,
    /// Successful operations (replies that passed the check, connections completed, ...).
    pub ok: u64,
    /// Errors by kind. Every error is counted here; none is dropped.
    pub errors: BTreeMap<String, u64>,
    /// Work that was still in flight when the run stopped waiting for it (a request without
    /// its reply, a connect not finished, a stream not drained). Each is also an error, of
    /// kind `unfinished_<what>`, so a run that leaves work behind never reports success.
    pub unfinished: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            hist: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("histogram bounds"),
            ok: 0,
            errors: BTreeMap::new(),
            unfinished: 0,
            bytes_up: 0,
            bytes_down: 0,
        }
    }

    /// One successful operation that took `latency`.
    pub fn record_ok(&mut self, latency: Duration) {
        let ns = (latency.as_nanos().min(MAX_LATENCY_NS as u128) as u64).max(1);
        self.hist.saturating_record(ns);
        self.ok += 1;
    }

    pub fn record_error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_insert(0) += 1;
    }

    /// Work in flight at the end that never finished: counted apart and as an error.
    pub fn record_unfinished(&mut self, what: &str) {
        self.record_error(&format!("unfinished_{what}"));
        self.unfinished += 1;
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn merge(&mut self, other: &Stats) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        self.ok += other.ok;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_insert(0) += v;
        }
        self.unfinished += other.unfinished;
        self.bytes_up += other.bytes_up;
        self.bytes_down += other.bytes_down;
    }

    /// Latency at quantile `q` (0..=1) in microseconds; 0 when nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.hist.is_empty() {
            0.0
        } else {
            self.hist.value_at_quantile(q) as f64 / 1000.0
        }
    }

    pub fn max_us(&self) -> f64 {
        if self.hist.is_empty() {
            0.0
        } else {
            self.hist.max() as f64 / 1000.0
        }
    }

    pub fn mean_us(&self) -> f64 {
        if self.hist.is_empty() {
            0.0
        } else {
            self.hist.mean() / 1000.0
        }
    }
}

/// Quantiles reported everywhere (label, quantile).
pub const QUANTILES: [(&str, f64); 4] =
    [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999)];

/// A minimal JSON object writer (numbers, strings, nested objects), no dependencies.
#[derive(Default)]
pub struct Json {
    buf: String,
    first: Vec<bool>,
}

impl Json {
    pub fn new() -> Self {
        let mut j = Json::default();
        j.buf.push('{');
        j.first.push(true);
        j
    }

    fn key(&mut self, k: &str) {
        if !*self.first.last().expect("open object") {
            self.buf.push(',');
        }
        *self.first.last_mut().expect("open object") = false;
        self.buf.push_str(&escape(k));
        self.buf.push(':');
    }

    pub fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k);
        self.buf.push_str(&escape(v));
        self
    }

    pub fn num(&mut self, k: &str, v: f64) -> &mut Self {
        self.key(k);
        if v.is_finite() {
            if v == v.trunc() && v.abs() < 1e15 {
                let _ = write!(self.buf, "{}", v as i64);
            } else {
                let _ = write!(self.buf, "{v:.3}");
            }
        } else {
            self.buf.push_str("null");
        }
        self
    }

    pub fn int(&mut self, k: &str, v: u64) -> &mut Self {
        self.key(k);
        let _ = write!(self.buf, "{v}");
        self
    }

    pub fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k);
        self.buf.push_str(if v { "true" } else { "false" });
        self
    }

    pub fn open(&mut self, k: &str) -> &mut Self {
        self.key(k);
        self.buf.push('{');
        self.first.push(true);
        self
    }

    pub fn close(&mut self) -> &mut Self {
        self.buf.push('}');
        self.first.pop();
        self
    }

    pub fn finish(mut self) -> String {
        while !self.first.is_empty() {
            self.close();
        }
        self.buf
    }
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Add the latency block and error counters of `s` to `j`.
pub fn json_latency_and_errors(j: &mut Json, s: &Stats) {
    j.open("latency_us");
    for (label, q) in QUANTILES {
        j.num(label, round3(s.quantile_us(q)));
    }
    j.num("max", round3(s.max_us()));
    j.num("mean", round3(s.mean_us()));
    j.int("count", s.hist.len());
    j.close();
    j.int("errors", s.error_total());
    j.int("unfinished", s.unfinished);
    j.open("error_kinds");
    for (k, v) in &s.errors {
        j.int(k, *v);
    }
    j.close();
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// One line of latency figures for humans.
pub fn latency_line(s: &Stats) -> String {
    let mut line = String::from("latency");
    for (label, q) in QUANTILES {
        let _ = write!(line, " {label}={}", fmt_us(s.quantile_us(q)));
    }
    let _ = write!(
        line,
        " max={} mean={}",
        fmt_us(s.max_us()),
        fmt_us(s.mean_us())
    );
    line
}

pub fn errors_line(s: &Stats) -> String {
    if s.errors.is_empty() {
        "errors: 0".to_string()
    } else {
        let kinds: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("errors: {} ({})", s.error_total(), kinds.join(", "))
    }
}

/// What was left in flight at the end, for humans (also among the errors).
pub fn unfinished_line(s: &Stats) -> String {
    if s.unfinished == 0 {
        "unfinished at the end: 0".to_string()
    } else {
        format!(
            "unfinished at the end: {} (no outcome within --timeout; counted as errors)",
            s.unfinished
        )
    }
}

pub fn fmt_us(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2}s", us / 1e6)
    } else if us >= 1000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{us:.1}us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_accounting() {
        let mut s = Stats::new();
        for us in 1..=1000u64 {
            s.record_ok(Duration::from_micros(us));
        }
        assert_eq!(s.ok, 1000);
        assert_eq!(s.hist.len(), 1000);
        let p50 = s.quantile_us(0.5);
        assert!((p50 - 500.0).abs() <= 1.0, "p50 {p50}");
        let p99 = s.quantile_us(0.99);
        assert!((p99 - 990.0).abs() <= 1.0, "p99 {p99}");
        assert!((s.max_us() - 1000.0).abs() <= 1.0);
        assert!((s.mean_us() - 500.5).abs() <= 1.0);
    }

    #[test]
    fn merge_adds_everything() {
        let mut a = Stats::new();
        let mut b = Stats::new();
        a.record_ok(Duration::from_micros(10));
        b.record_ok(Duration::from_millis(10));
        b.record_error("timeout");
        b.record_error("timeout");
        a.record_error("connect");
        b.record_unfinished("reply");
        a.bytes_up = 5;
        b.bytes_down = 7;
        a.merge(&b);
        assert_eq!(a.ok, 2);
        assert_eq!(a.hist.len(), 2);
        assert_eq!(a.error_total(), 4);
        assert_eq!(a.unfinished, 1);
        assert_eq!(a.errors["unfinished_reply"], 1);
        assert_eq!(a.errors["timeout"], 2);
        assert_eq!((a.bytes_up, a.bytes_down), (5, 7));
        assert!(a.max_us() >= 9_990.0);
    }

    #[test]
    fn extreme_latencies_are_clamped_not_lost() {
        let mut s = Stats::new();
        s.record_ok(Duration::from_secs(3600));
        s.record_ok(Duration::ZERO);
        assert_eq!(s.ok, 2);
        assert_eq!(s.hist.len(), 2);
    }

    #[test]
    fn empty_stats_report_zero() {
        let s = Stats::new();
        assert_eq!(s.quantile_us(0.99), 0.0);
        assert_eq!(s.max_us(), 0.0);
        assert_eq!(errors_line(&s), "errors: 0");
        assert_eq!(unfinished_line(&s), "unfinished at the end: 0");
    }

    #[test]
    fn unfinished_work_is_an_error_and_shown() {
        let mut s = Stats::new();
        s.record_unfinished("reply");
        s.record_unfinished("reply");
        s.record_unfinished("connect");
        assert_eq!(s.unfinished, 3);
        assert_eq!(s.error_total(), 3);
        assert_eq!(
            errors_line(&s),
            "errors: 3 (unfinished_connect=1, unfinished_reply=2)"
        );
        assert!(unfinished_line(&s).starts_with("unfinished at the end: 3 "));
        let mut j = Json::new();
        json_latency_and_errors(&mut j, &s);
        let out = j.finish();
        assert!(out.contains("\"errors\":3,\"unfinished\":3,"), "{out}");
    }

    #[test]
    fn json_is_well_formed() {
        let mut s = Stats::new();
        s.record_ok(Duration::from_micros(42));
        s.record_error("reply_content");
        let mut j = Json::new();
        j.str("workload", "rr")
            .num("rps", 1234.5)
            .int("n", 3)
            .bool("ok", false);
        json_latency_and_errors(&mut j, &s);
        let out = j.finish();
        assert!(out.starts_with("{\"workload\":\"rr\",\"rps\":1234.500,\"n\":3,\"ok\":false,"));
        assert!(out.contains("\"error_kinds\":{\"reply_content\":1}"));
        assert!(out.ends_with("}"));
        assert_eq!(out.matches('{').count(), out.matches('}').count());
        assert_eq!(escape("a\"b\\\n"), "\"a\\\"b\\\\\\n\"");
    }
}
