//! `GET /` on the admin port: one self-contained HTML page an operator keeps open, in the spirit
//! of HAProxy's stats page: the process (flows against `--max-conns`, bytes, uptime, version,
//! limits), one row per backend (state, weight, flows, share of new flows, bytes, failed
//! connects) and the recent health transitions.
//!
//! This module only renders: [`render`] turns a [`StatusPage`] of plain values into HTML. The
//! values are gathered by the admin view (`view.rs`, from the same snapshots and counters as
//! `/metrics`), so the page never touches the workers. Every text that comes from outside the
//! code (backend names, details of check failures) goes through [`escape_html`].
//!
//! No script and no external asset: the styles are inline and a `<meta http-equiv=refresh>`
//! reloads the page every [`REFRESH_SECS`] seconds. Cells carry `data-*` attributes and
//! classes so scripts and tests can read the numbers without parsing the human formatting.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// How often the page reloads itself.
pub const REFRESH_SECS: u32 = 5;

/// Everything the page shows, as plain values.
pub struct StatusPage {
    pub version: &'static str,
    pub pid: u32,
    pub listen: SocketAddr,
    pub uptime: Duration,
    pub now: SystemTime,
    pub process: ProcessCounts,
    /// `(flag, value)` pairs, in display order: `("--max-conns", "4096")`.
    pub limits: Vec<(&'static str, String)>,
    pub backends: Vec<BackendLine>,
    /// Newest first.
    pub transitions: Vec<TransitionLine>,
    /// Transitions that happened but are no longer kept (the list is bounded).
    pub transitions_dropped: u64,
}

/// Process-wide numbers (all workers summed).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessCounts {
    pub workers: usize,
    pub flows_active: u64,
    pub max_flows: u64,
    pub flows_accepted: u64,
    /// Connections closed at accept (access lists, per-source limit, PROXY header).
    pub refused: u64,
    /// Flows closed because no backend could take them (`no_backend` + `connect_failed`).
    pub unserved: u64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    pub connect_failures: u64,
    pub buffers_in_use: u64,
}

/// A backend's health as the page shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Up,
    Down,
    /// Down by passive evidence alone, but tried anyway because nothing else is up.
    DownTried,
}

impl State {
    fn text(self) -> &'static str {
        match self {
            State::Up => "UP",
            State::Down => "DOWN",
            State::DownTried => "DOWN, tried",
        }
    }

    /// Class and `data-state` value.
    fn class(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::DownTried => "down-tried",
        }
    }
}

/// One backend row.
#[derive(Clone, Debug)]
pub struct BackendLine {
    pub name: String,
    pub address: SocketAddr,
    pub backup: bool,
    pub weight: u32,
    pub state: State,
    /// The last transition kept for this backend: when, and why.
    pub since: Option<(SystemTime, String)>,
    pub flows_active: u64,
    pub flows_total: u64,
    /// Fraction of new flows (of the hash space, with `--balance hash`) it takes now.
    pub share: f64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    pub connect_failures: u64,
    pub health_transitions: u64,
}

/// One health transition.
#[derive(Clone, Debug)]
pub struct TransitionLine {
    pub at: SystemTime,
    pub backend: String,
    pub up: bool,
    /// `check`, `passive` or `retry`, then the detail: "3 checks failed, last: ...".
    pub cause: String,
}

/// Appends `text` with `& < > " '` escaped, safe in element content and quoted attributes.
pub fn escape_html(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

fn escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape_html(text, &mut out);
    out
}

/// `1.5 GiB`-style text for a byte count (the exact count goes in a `title`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.2} {}", UNITS[unit])
    } else if value < 100.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// `3d 4h`, `2h 05m`, `4m 09s`, `12s`: the two largest units.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes, seconds) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {minutes:02}m")
    } else if minutes > 0 {
        format!("{minutes}m {seconds:02}s")
    } else {
        format!("{seconds}s")
    }
}

/// `2026-11-30 02:18:25Z`.
fn utc(t: SystemTime) -> String {
    let mut text = String::with_capacity(24);
    crate::access_log::push_rfc3339_millis(t, &mut text);
    // Seconds are enough on a page that refreshes every few seconds.
    let date_time = text.get(..19).unwrap_or(&text).replace('T', " ");
    format!("{date_time}Z")
}

/// How long before `now` `t` was: `12s ago`.
fn ago(t: SystemTime, now: SystemTime) -> String {
    format!(
        "{} ago",
        human_duration(now.duration_since(t).unwrap_or_default())
    )
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

const STYLE: &str = r#"
:root { color-scheme: light; --ink:#1d2430; --muted:#5b6678; --line:#dde2ea; --bg:#f4f6f9;
  --up:#1f8a4c; --up-bg:#e3f5ea; --down:#c62828; --down-bg:#fde7e7; --warn:#b26a00;
  --warn-bg:#fff2dc; --head:#17324d; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
  color:var(--ink); background:var(--bg); }
header { background:var(--head); color:#fff; padding:12px 24px; display:flex; flex-wrap:wrap;
  align-items:baseline; gap:8px 24px; }
header h1 { margin:0; font-size:20px; letter-spacing:.5px; }
header .meta { color:#c9d6e3; font-size:13px; }
header .meta b { color:#fff; font-weight:600; }
main { padding:16px 24px 32px; max-width:1400px; }
h2 { font-size:15px; margin:24px 0 8px; color:var(--head); text-transform:uppercase;
  letter-spacing:.6px; }
.cards { display:flex; flex-wrap:wrap; gap:12px; }
.card { background:#fff; border:1px solid var(--line); border-radius:6px; padding:10px 14px;
  flex:1 1 240px; }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.4px; }
.card .value { font-size:22px; font-weight:600; font-variant-numeric:tabular-nums; }
.card .sub { color:var(--muted); font-size:12px; }
.bar { height:6px; background:var(--line); border-radius:3px; margin-top:6px; overflow:hidden; }
.bar span { display:block; height:100%; background:var(--up); }
.bar.hot span { background:var(--warn); }
table { border-collapse:collapse; width:100%; background:#fff; border:1px solid var(--line); }
th, td { padding:6px 9px; border-bottom:1px solid var(--line); text-align:left;
  white-space:nowrap; }
th { background:#e9edf3; font-size:12px; color:var(--muted); text-transform:uppercase;
  letter-spacing:.4px; font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.backend.up td.state { color:var(--up); }
tr.backend.down { background:var(--down-bg); }
tr.backend.down-tried { background:var(--warn-bg); }
tr.total td { font-weight:600; background:#f0f3f7; }
.pill { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px;
  font-weight:700; letter-spacing:.4px; }
.pill.up { background:var(--up-bg); color:var(--up); }
.pill.down { background:var(--down); color:#fff; }
.pill.down-tried { background:var(--warn); color:#fff; }
.tag { display:inline-block; margin-left:6px; padding:0 6px; border-radius:3px; font-size:11px;
  background:#e4e8f7; color:#34407a; }
.since { margin-left:6px; color:var(--muted); font-size:12px; cursor:help; }
th.group { text-align:center; border-bottom:1px solid var(--line); }
thead tr:first-child th[rowspan] { vertical-align:bottom; }
.sharebar { display:inline-block; width:60px; height:6px; background:var(--line); border-radius:3px;
  margin-right:6px; vertical-align:middle; overflow:hidden; }
.sharebar span { display:block; height:100%; background:#3a6ea5; }
dl.limits { display:grid; grid-template-columns:max-content 1fr max-content 1fr; gap:4px 16px; margin:0;
  background:#fff; border:1px solid var(--line); border-radius:6px; padding:10px 14px; }
dl.limits dt { font-family:ui-monospace,"DejaVu Sans Mono",monospace; color:var(--muted); }
dl.limits dd { margin:0; font-variant-numeric:tabular-nums; }
.empty { color:var(--muted); font-style:italic; }
.banner { margin:0 0 10px; padding:8px 12px; border-radius:6px; font-weight:600; }
.banner.alert { background:var(--down); color:#fff; }
.banner.warn { background:var(--warn-bg); color:var(--warn); border:1px solid var(--warn); }
footer { color:var(--muted); font-size:12px; margin-top:24px; }
"#;

/// Renders the whole page into `out`.
pub fn render(page: &StatusPage, out: &mut String) {
    let p = &page.process;
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Ringway on {listen}</title><style>{STYLE}</style></head><body>\n",
        listen = escaped(&page.listen.to_string()),
    );
    let _ = write!(
        out,
        "<header><h1>Ringway</h1><span class=\"meta\">listening on <b id=\"listen\">{listen}</b>\
         </span><span class=\"meta\">version <b id=\"version\">{version}</b></span>\
         <span class=\"meta\">up <b id=\"uptime\" data-seconds=\"{up_secs}\">{uptime}</b></span>\
         <span class=\"meta\">pid <b>{pid}</b></span><span class=\"meta\">{workers} workers\
         </span><span class=\"meta\">{now}</span></header>\n<main>\n",
        listen = escaped(&page.listen.to_string()),
        version = escaped(page.version),
        up_secs = page.uptime.as_secs(),
        uptime = human_duration(page.uptime),
        pid = page.pid,
        workers = p.workers,
        now = utc(page.now),
    );
    render_process(p, out);
    render_backends(page, out);
    render_transitions(page, out);
    render_limits(page, out);
    let _ = write!(
        out,
        "<footer>Reloads every {REFRESH_SECS} s. The same numbers, for machines: \
         <a href=\"/metrics\">/metrics</a> (Prometheus), <a href=\"/backends\">/backends</a> \
         (JSON).</footer>\n</main></body></html>\n"
    );
}

fn render_process(p: &ProcessCounts, out: &mut String) {
    let used = percent(p.flows_active, p.max_flows);
    out.push_str("<h2>Process</h2><div class=\"cards\" id=\"process\">\n");
    let _ = writeln!(
        out,
        "<div class=\"card\"><div class=\"label\">Flows open</div>\
         <div class=\"value\" id=\"flows-active\" data-value=\"{active}\">{active}</div>\
         <div class=\"sub\">of <span id=\"max-flows\">{max}</span> (--max-conns), {used:.1}%</div>\
         <div class=\"bar{hot}\"><span style=\"width:{width:.1}%\"></span></div></div>",
        active = p.flows_active,
        max = p.max_flows,
        hot = if used >= 80.0 { " hot" } else { "" },
        width = used.min(100.0),
    );
    let card = |out: &mut String, id: &str, label: &str, value: u64, text: String, sub: &str| {
        let _ = writeln!(
            out,
            "<div class=\"card\"><div class=\"label\">{label}</div>\
             <div class=\"value\" id=\"{id}\" data-value=\"{value}\" title=\"{value}\">{text}</div>\
             <div class=\"sub\">{sub}</div></div>"
        );
    };
    card(
        out,
        "flows-accepted",
        "Flows accepted",
        p.flows_accepted,
        p.flows_accepted.to_string(),
        "since start",
    );
    card(
        out,
        "bytes-in",
        "Bytes in",
        p.bytes_client_to_backend,
        human_bytes(p.bytes_client_to_backend),
        "client to backend",
    );
    card(
        out,
        "bytes-out",
        "Bytes out",
        p.bytes_backend_to_client,
        human_bytes(p.bytes_backend_to_client),
        "backend to client",
    );
    card(
        out,
        "connect-failures",
        "Failed connects",
        p.connect_failures,
        p.connect_failures.to_string(),
        "backend connect attempts",
    );
    card(
        out,
        "unserved",
        "Unserved",
        p.unserved,
        p.unserved.to_string(),
        "no backend could take the flow",
    );
    card(
        out,
        "refused",
        "Refused",
        p.refused,
        p.refused.to_string(),
        "at accept: access lists, limits, PROXY",
    );
    card(
        out,
        "buffers-in-use",
        "Buffers in use",
        p.buffers_in_use,
        p.buffers_in_use.to_string(),
        "relay buffers holding bytes",
    );
    out.push_str("</div>\n");
}

fn render_backends(page: &StatusPage, out: &mut String) {
    // A backend's name is the address text it was configured with; the resolved address gets a
    // column of its own only when some name says something else (a hostname).
    let show_address = page
        .backends
        .iter()
        .any(|b| b.name != b.address.to_string());
    let (address_head, address_gap) = if show_address {
        ("<th rowspan=\"2\">Address</th>", "<td></td>")
    } else {
        ("", "")
    };
    let up = page
        .backends
        .iter()
        .filter(|b| b.state == State::Up)
        .count();
    let tried = page.backends.iter().any(|b| b.state == State::DownTried);
    let banner = if up > 0 || page.backends.is_empty() {
        ""
    } else if tried {
        "<p class=\"banner warn\" id=\"routing\">Every backend is down. Those down by failed \
         connects alone (passive checks) are still tried, so clients are not turned away \
         without a try.</p>\n"
    } else {
        "<p class=\"banner alert\" id=\"routing\">No backend is up: new clients are closed at \
         once until one comes back.</p>\n"
    };
    let _ = write!(
        out,
        "<h2>Backends <span class=\"tag\" id=\"backends-up\">{up} of {} up</span></h2>\n\
         {banner}<table id=\"backends\"><thead><tr><th rowspan=\"2\">Backend</th>\
         {address_head}<th rowspan=\"2\">State</th>\
         <th rowspan=\"2\" class=\"num\">Weight</th><th colspan=\"2\" class=\"group\">Flows</th>\
         <th rowspan=\"2\">Share of new flows</th><th colspan=\"2\" class=\"group\">Bytes</th>\
         <th rowspan=\"2\" class=\"num\">Failed<br>connects</th>\
         <th rowspan=\"2\" class=\"num\">Health<br>changes</th></tr>\
         <tr><th class=\"num\">Active</th><th class=\"num\">Total</th>\
         <th class=\"num\">In</th><th class=\"num\">Out</th></tr></thead><tbody>\n",
        page.backends.len()
    );
    if page.backends.is_empty() {
        let columns = if show_address { 11 } else { 10 };
        let _ = writeln!(
            out,
            "<tr><td colspan=\"{columns}\" class=\"empty\">no backends</td></tr>"
        );
    }
    let mut total = (0u64, 0u64, 0u64, 0u64, 0u64);
    for b in &page.backends {
        total.0 += b.flows_active;
        total.1 += b.flows_total;
        total.2 += b.bytes_client_to_backend;
        total.3 += b.bytes_backend_to_client;
        total.4 += b.connect_failures;
        let name = escaped(&b.name);
        let since = match &b.since {
            // Short in the row (the cause's kind), whole in the tooltip and the transitions.
            Some((at, cause)) => format!(
                "<span class=\"since\" title=\"since {}: {}\">for {}, {}</span>",
                utc(*at),
                escaped(cause),
                human_duration(page.now.duration_since(*at).unwrap_or_default()),
                escaped(cause.split(':').next().unwrap_or_default()),
            ),
            None => String::new(),
        };
        let share = b.share.clamp(0.0, 1.0) * 100.0;
        let _ = writeln!(
            out,
            "<tr class=\"backend {class}\" data-backend=\"{name}\" data-state=\"{class}\">\
             <td class=\"name\">{name}{backup}</td>{address}\
             <td class=\"state\"><span class=\"pill {class}\">{state}</span>{since}</td>\
             <td class=\"num weight\">{weight}</td>\
             <td class=\"num active\" data-value=\"{active}\">{active}</td>\
             <td class=\"num total\" data-value=\"{flows_total}\">{flows_total}</td>\
             <td class=\"share\" data-value=\"{share_fraction:.4}\"><span class=\"sharebar\">\
             <span style=\"width:{share:.1}%\"></span></span>{share:.1}%</td>\
             <td class=\"num bytes-in\" data-value=\"{bin}\" title=\"{bin} bytes\">{bin_h}</td>\
             <td class=\"num bytes-out\" data-value=\"{bout}\" title=\"{bout} bytes\">{bout_h}</td>\
             <td class=\"num failures\" data-value=\"{failures}\">{failures}</td>\
             <td class=\"num transitions\">{transitions}</td></tr>",
            class = b.state.class(),
            backup = if b.backup {
                "<span class=\"tag\">backup</span>"
            } else {
                ""
            },
            address = if show_address {
                format!(
                    "<td class=\"address\">{}</td>",
                    escaped(&b.address.to_string())
                )
            } else {
                String::new()
            },
            state = b.state.text(),
            weight = b.weight,
            active = b.flows_active,
            flows_total = b.flows_total,
            share_fraction = b.share,
            bin = b.bytes_client_to_backend,
            bin_h = human_bytes(b.bytes_client_to_backend),
            bout = b.bytes_backend_to_client,
            bout_h = human_bytes(b.bytes_backend_to_client),
            failures = b.connect_failures,
            transitions = b.health_transitions,
        );
    }
    let _ = write!(
        out,
        "<tr class=\"total\"><td>Total</td>{address_gap}<td></td><td></td>\
         <td class=\"num\">{}</td><td class=\"num\">{}</td><td></td>\
         <td class=\"num\" title=\"{} bytes\">{}</td><td class=\"num\" title=\"{} bytes\">{}</td>\
         <td class=\"num\">{}</td><td></td></tr>\n</tbody></table>\n",
        total.0,
        total.1,
        total.2,
        human_bytes(total.2),
        total.3,
        human_bytes(total.3),
        total.4,
    );
}

fn render_transitions(page: &StatusPage, out: &mut String) {
    out.push_str(
        "<h2>Recent health transitions</h2>\n<table id=\"transitions\"><thead><tr>\
         <th>When (UTC)</th><th></th><th>Backend</th><th>Now</th><th>Why</th></tr></thead><tbody>\n",
    );
    if page.transitions.is_empty() {
        out.push_str(
            "<tr><td colspan=\"5\" class=\"empty\">none since start: every backend started up \
             and stayed so</td></tr>\n",
        );
    }
    for t in &page.transitions {
        let class = if t.up { "up" } else { "down" };
        let _ = writeln!(
            out,
            "<tr class=\"transition {class}\" data-backend=\"{name}\"><td>{at}</td><td>{ago}</td>\
             <td>{name}</td><td><span class=\"pill {class}\">{state}</span></td>\
             <td>{cause}</td></tr>",
            name = escaped(&t.backend),
            at = utc(t.at),
            ago = ago(t.at, page.now),
            state = if t.up { "UP" } else { "DOWN" },
            cause = escaped(&t.cause),
        );
    }
    out.push_str("</tbody></table>\n");
    if page.transitions_dropped > 0 {
        let _ = writeln!(
            out,
            "<p class=\"empty\">{} older transitions not shown (the process log has them all).</p>",
            page.transitions_dropped
        );
    }
}

fn render_limits(page: &StatusPage, out: &mut String) {
    out.push_str("<h2>Settings and limits</h2>\n<dl class=\"limits\" id=\"limits\">\n");
    for (flag, value) in &page.limits {
        let _ = writeln!(out, "<dt>{}</dt><dd>{}</dd>", escaped(flag), escaped(value));
    }
    out.push_str("</dl>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> StatusPage {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        StatusPage {
            version: "0.1.0",
            pid: 42,
            listen: "127.0.0.1:8080".parse().unwrap(),
            uptime: Duration::from_secs(3725),
            now,
            process: ProcessCounts {
                workers: 2,
                flows_active: 3,
                max_flows: 4,
                flows_accepted: 10,
                bytes_client_to_backend: 5 << 20,
                ..ProcessCounts::default()
            },
            limits: vec![
                ("--max-conns", "4".into()),
                ("--idle-timeout", "10m".into()),
            ],
            backends: vec![
                BackendLine {
                    name: "web<1>&\"x\"".into(),
                    address: "10.0.0.1:80".parse().unwrap(),
                    backup: false,
                    weight: 2,
                    state: State::Up,
                    since: None,
                    flows_active: 3,
                    flows_total: 9,
                    share: 1.0,
                    bytes_client_to_backend: 5 << 20,
                    bytes_backend_to_client: 12,
                    connect_failures: 0,
                    health_transitions: 0,
                },
                BackendLine {
                    name: "10.0.0.2:80".into(),
                    address: "10.0.0.2:80".parse().unwrap(),
                    backup: true,
                    weight: 1,
                    state: State::Down,
                    since: Some((now - Duration::from_secs(75), "check: <refused>".into())),
                    flows_active: 0,
                    flows_total: 1,
                    share: 0.0,
                    bytes_client_to_backend: 0,
                    bytes_backend_to_client: 0,
                    connect_failures: 4,
                    health_transitions: 1,
                },
            ],
            transitions: vec![TransitionLine {
                at: now - Duration::from_secs(75),
                backend: "10.0.0.2:80".into(),
                up: false,
                cause: "check: 3 checks failed, last: <script>".into(),
            }],
            transitions_dropped: 0,
        }
    }

    #[test]
    fn escapes_every_outside_text() {
        let mut out = String::new();
        render(&page(), &mut out);
        assert!(out.contains("web&lt;1&gt;&amp;&quot;x&quot;"), "{out}");
        assert!(!out.contains("web<1>"));
        assert!(!out.contains("<script>"));
        assert!(out.contains("last: &lt;script&gt;"));
        assert!(out.contains("check: &lt;refused&gt;"));
        let mut e = String::new();
        escape_html("a'b", &mut e);
        assert_eq!(e, "a&#39;b");
    }

    #[test]
    fn shows_states_numbers_and_the_refresh() {
        let mut out = String::new();
        render(&page(), &mut out);
        assert!(out.starts_with("<!DOCTYPE html>"));
        assert!(out.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        assert!(out.contains("data-backend=\"10.0.0.2:80\" data-state=\"down\""));
        assert!(out.contains("<span class=\"pill down\">DOWN</span>"));
        assert!(out.contains("<span class=\"pill up\">UP</span>"));
        assert!(
            out.contains(
                "title=\"since 2026-11-30 00:52:05Z: check: &lt;refused&gt;\">for 1m 15s, check<"
            ),
            "{out}"
        );
        // The transitions table says when, and how long ago.
        assert!(out.contains("<td>2026-11-30 00:52:05Z</td><td>1m 15s ago</td>"));
        assert!(out.contains("<span class=\"tag\">backup</span>"));
        assert!(out.contains("id=\"backends-up\">1 of 2 up<"));
        assert!(out.contains("title=\"5242880 bytes\">5.00 MiB<"));
        assert!(out.contains("<dt>--max-conns</dt><dd>4</dd>"));
        // 3 of 4 flows: the bar turns to the warning colour past 80%.
        assert!(out.contains("75.0%"));
        assert!(out.contains("<div class=\"bar\">"));
        assert!(out.contains("data-seconds=\"3725\">1h 02m<"));
        // No script, no external asset.
        assert!(!out.contains("<script"));
        assert!(!out.contains("src="));
        assert!(!out.contains("http://") && !out.contains("https://"));
    }

    #[test]
    fn address_column_only_when_a_name_is_not_its_address() {
        let mut out = String::new();
        render(&page(), &mut out);
        assert!(out.contains("<th rowspan=\"2\">Address</th>"));
        assert!(out.contains("<td class=\"address\">10.0.0.1:80</td>"));
        let mut plain = page();
        plain.backends[0].name = "10.0.0.1:80".into();
        let mut out = String::new();
        render(&plain, &mut out);
        assert!(!out.contains(">Address</th>"), "{out}");
        assert!(!out.contains("class=\"address\""));
    }

    #[test]
    fn says_when_no_backend_takes_new_flows() {
        let mut out = String::new();
        render(&page(), &mut out);
        assert!(
            !out.contains("id=\"routing\""),
            "one backend is up: no banner"
        );
        let mut all_down = page();
        all_down.backends[0].state = State::Down;
        let mut out = String::new();
        render(&all_down, &mut out);
        assert!(out.contains("class=\"banner alert\" id=\"routing\">No backend is up"));
        all_down.backends[0].state = State::DownTried;
        let mut out = String::new();
        render(&all_down, &mut out);
        assert!(out.contains("class=\"banner warn\" id=\"routing\">Every backend is down."));
        assert!(out.contains("<span class=\"pill down-tried\">DOWN, tried</span>"));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(50 << 20), "50.0 MiB");
        assert_eq!(human_bytes(500 << 30), "500 GiB");
        assert_eq!(human_bytes(u64::MAX), "16384 PiB");
        assert_eq!(human_duration(Duration::from_secs(9)), "9s");
        assert_eq!(human_duration(Duration::from_secs(249)), "4m 09s");
        assert_eq!(
            human_duration(Duration::from_secs(2 * 86_400 + 5 * 3600)),
            "2d 5h"
        );
    }
}
