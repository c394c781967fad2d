//! What an operator watching the admin port sees while traffic runs: byte counters that move
//! while a flow is open (not only when it ends), the flow-duration and bytes-per-flow
//! histograms, and the `GET /` status page, served over plain HTTP and rendered by a real
//! headless browser (Debian's chromium).
//!
//! Every wait is for an observable condition with a deadline.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::admin::{admin_addr, http_get, metric, parse_metrics, Sample};
use common::*;

/// How long a counter may take to show what happened (the flush runs every 0.5 s).
const SHOW_TIMEOUT: Duration = Duration::from_secs(10);

/// Scrapes `/metrics` until `done` holds for the samples or `SHOW_TIMEOUT` passes; returns the
/// last scrape either way.
fn scrape_until(proxy: &Proxy, done: impl Fn(&[Sample]) -> bool) -> (bool, Vec<Sample>) {
    let admin = admin_addr(proxy);
    let mut samples = Vec::new();
    let ok = wait_until(SHOW_TIMEOUT, || {
        samples = parse_metrics(&http_get(admin, "/metrics").1);
        done(&samples)
    });
    (ok, samples)
}

/// Writes `len` bytes of stream `key` in chunks and reads each chunk's echo back.
fn echo_bytes(s: &mut TcpStream, key: u64, from: u64, len: u64) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pos = from;
    while pos < from + len {
        let chunk = pattern_slice(key, pos, (from + len - pos).min(16 * 1024) as usize);
        s.write_all(chunk).expect("write to the proxy");
        let n = chunk.len();
        s.read_exact(&mut buf[..n]).expect("read the echo");
        check_pattern(key, pos, &buf[..n]).expect("echoed bytes intact");
        pos += n as u64;
    }
}

#[test]
fn byte_counters_move_while_a_flow_is_open_and_end_exact() {
    let backend = Backend::echo();
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend.arg(),
        "--admin",
        "127.0.0.1:0",
        "--workers",
        "1",
    ]);
    let name = backend.arg();
    let up = [("direction", "client_to_backend")];
    let down = [("direction", "backend_to_client")];
    let backend_up = [
        ("backend", name.as_str()),
        ("direction", "client_to_backend"),
    ];
    let backend_down = [
        ("backend", name.as_str()),
        ("direction", "backend_to_client"),
    ];

    let mut s = connect(proxy.addr).unwrap();
    const FIRST: u64 = 300_000;
    echo_bytes(&mut s, 7, 0, FIRST);
    // The flow is open (the client holds it and has not half-closed): the bytes it moved must
    // show anyway, in the totals and in its backend's counters.
    let (shown, samples) = scrape_until(&proxy, |m| {
        metric(m, "ringway_bytes_total", &up) == FIRST as f64
            && metric(m, "ringway_bytes_total", &down) == FIRST as f64
            && metric(m, "ringway_backend_bytes_total", &backend_up) == FIRST as f64
            && metric(m, "ringway_backend_bytes_total", &backend_down) == FIRST as f64
    });
    assert!(
        shown,
        "the open flow's {FIRST} bytes each way never showed in /metrics: {:?}\n{}",
        samples
            .iter()
            .filter(|s| s.name.contains("bytes_total"))
            .collect::<Vec<_>>(),
        proxy.stderr_tail()
    );
    assert_eq!(metric(&samples, "ringway_flows_active", &[]), 1.0);
    assert_eq!(
        metric(&samples, "ringway_flow_duration_seconds_count", &[]),
        0.0,
        "the histograms count flows that ended"
    );

    // More bytes on the same flow, then its end: the counters end at exactly the flow's bytes,
    // neither the flushed part nor the rest counted twice.
    const MORE: u64 = 123_457;
    echo_bytes(&mut s, 7, FIRST, MORE);
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(s);
    let total = (FIRST + MORE) as f64;
    // The release updates several counters one after the other: wait until all of them show
    // the end (a double count never equals the total, so it fails at the deadline).
    let (ended, samples) = scrape_until(&proxy, |m| {
        metric(m, "ringway_flows_closed_total", &[("reason", "done")]) == 1.0
            && metric(m, "ringway_bytes_total", &up) == total
            && metric(m, "ringway_bytes_total", &down) == total
            && metric(m, "ringway_backend_bytes_total", &backend_up) == total
            && metric(m, "ringway_backend_bytes_total", &backend_down) == total
            && metric(m, "ringway_flow_bytes_count", &up) == 1.0
    });
    assert!(
        ended,
        "after the flow's end, the byte counters are not exactly its {total} bytes each way: \
         {:?}\n{}",
        samples
            .iter()
            .filter(|s| s.name.contains("bytes") && !s.name.ends_with("_bucket")
                || s.name == "ringway_flows_closed_total")
            .collect::<Vec<_>>(),
        proxy.stderr_tail()
    );
    let m = |name: &str, labels: &[(&str, &str)]| metric(&samples, name, labels);

    // The ended flow is in both histograms, once, with its bytes.
    assert_eq!(m("ringway_flow_duration_seconds_count", &[]), 1.0);
    assert_eq!(
        m("ringway_flow_duration_seconds_bucket", &[("le", "+Inf")]),
        1.0
    );
    assert_eq!(m("ringway_flow_bytes_count", &up), 1.0);
    assert_eq!(m("ringway_flow_bytes_sum", &up), total);
    assert_eq!(m("ringway_flow_bytes_sum", &down), total);
    // 423,457 bytes: above the 262144 bucket, within the 1048576 one.
    assert_eq!(
        m("ringway_flow_bytes_bucket", &[up[0], ("le", "262144")]),
        0.0
    );
    assert_eq!(
        m("ringway_flow_bytes_bucket", &[up[0], ("le", "1048576")]),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// The status page
// ---------------------------------------------------------------------------------------------

/// How long one headless-browser run may take before it is killed.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// Loads `url` in Debian's chromium, headless, and returns the DOM after parsing (`--dump-dom`).
/// Chromium runs in a process group of its own, which is killed (by its id) when the run
/// ends or takes longer than `BROWSER_TIMEOUT`: no helper process of it outlives the test.
fn render_in_chromium(url: &str) -> String {
    let profile = TempDir::new("chromium-profile");
    let out = TempDir::new("chromium-dom");
    let dom_path = out.path().join("dom.html");
    let dom_file = std::fs::File::create(&dom_path).unwrap();
    let err_file = std::fs::File::create(out.path().join("stderr")).unwrap();
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .stdout(dom_file)
        .stderr(err_file)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run chromium ({e}): install it (scripts/test.sh does: apt-get install chromium)")
        });
    let group = child.id() as libc::pid_t;
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let mut finished = exited_unreaped(group);
    while !finished && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20)); // polling the exit, not a wait for it
        finished = exited_unreaped(group);
    }
    // Its main process is not reaped yet, so the group id is still ours: end whatever helper
    // processes are left (all of them if it hung), then reap it.
    // SAFETY: kill(2) on the process group this test created for chromium; no memory involved.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
    let status = child.wait().unwrap();
    let status = finished.then_some(status);
    let stderr = std::fs::read_to_string(out.path().join("stderr")).unwrap_or_default();
    match status {
        Some(status) if status.success() => {}
        Some(status) => panic!("chromium exited with {status}\n{stderr}"),
        None => panic!("chromium did not finish within {BROWSER_TIMEOUT:?}\n{stderr}"),
    }
    std::fs::read_to_string(&dom_path).unwrap()
}

/// Whether process `pid` (our child) has exited, leaving it unreaped (a zombie keeps its id).
fn exited_unreaped(pid: libc::pid_t) -> bool {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid, which fills it in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with WNOWAIT only reads its state into `info`.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: `info` was filled by waitid (all zero when nothing changed).
    rc == 0 && unsafe { info.si_pid() } != 0
}

/// The serialized `<tr>` of the backend row for `name` in a rendered DOM.
fn backend_row<'a>(dom: &'a str, name: &str) -> &'a str {
    let marker = format!("data-backend=\"{name}\"");
    let start = dom
        .match_indices(&marker)
        .filter_map(|(i, _)| dom[..i].rfind('<'))
        .find(|&tag| dom[tag..].starts_with("<tr class=\"backend "))
        .unwrap_or_else(|| panic!("no row for backend {name} in the page:\n{dom}"));
    let end = start + dom[start..].find("</tr>").unwrap();
    &dom[start..end]
}

/// The value of `attr="..."` in the first element of `html` that has class `class`.
fn value_of<'a>(html: &'a str, class: &str, attr: &str) -> &'a str {
    let at = html
        .find(&format!("class=\"{class}\""))
        .unwrap_or_else(|| panic!("no element of class {class:?} in {html}"));
    let rest = &html[at..];
    let key = format!("{attr}=\"");
    let from = rest
        .find(&key)
        .unwrap_or_else(|| panic!("no {attr} in {rest}"))
        + key.len();
    &rest[from..from + rest[from..].find('"').unwrap()]
}

/// The text of the element with `id` (no nested elements expected).
fn text_of_id<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the page:\n{dom}"));
    let from = at + dom[at..].find('>').unwrap() + 1;
    &dom[from..from + dom[from..].find('<').unwrap()]
}

/// A proxy with one live backend and one whose checks fail, and a flow open on the live one.
struct Scene {
    proxy: Proxy,
    admin: SocketAddr,
    live: Backend,
    dead: SocketAddr,
    /// The open flow: kept so the page shows it active.
    _flow: TcpStream,
}

fn scene() -> Scene {
    let live = Backend::echo();
    let dead = dead_addr();
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &format!("{},weight=3", live.arg()),
        "--backend",
        &dead.to_string(),
        "--admin",
        "127.0.0.1:0",
        "--health-interval",
        "100ms",
        "--max-conns",
        "77",
        "--workers",
        "2",
    ]);
    let admin = admin_addr(&proxy);
    let dead_name = dead.to_string();
    let (down, samples) = scrape_until(&proxy, |m| {
        metric(m, "ringway_backend_up", &[("backend", &dead_name)]) == 0.0
            && m.iter().any(|s| s.name == "ringway_backend_up")
    });
    assert!(
        down,
        "{dead} never went down: {samples:?}\n{}",
        proxy.stderr_tail()
    );
    let mut flow = connect(proxy.addr).unwrap();
    echo_roundtrip(&mut flow, b"hello through the proxy").unwrap();
    Scene {
        proxy,
        admin,
        live,
        dead,
        _flow: flow,
    }
}

#[test]
fn status_page_renders_in_a_headless_browser() {
    let scene = scene();
    let dom = render_in_chromium(&format!("http://{}/", scene.admin));
    let tail = scene.proxy.stderr_tail();

    assert!(dom.contains("<title>Ringway on "), "{dom}\n{tail}");
    assert_eq!(
        dom.matches("<tr class=\"backend ").count(),
        2,
        "one row per backend:\n{dom}"
    );
    let live = backend_row(&dom, &scene.live.arg());
    assert_eq!(value_of(live, "backend up", "data-state"), "up", "{live}");
    assert!(live.contains(">UP</span>"), "{live}");
    assert_eq!(value_of(live, "num active", "data-value"), "1", "{live}");
    assert!(live.contains("<td class=\"num weight\">3</td>"), "{live}");
    // The only usable backend takes every new flow.
    assert_eq!(value_of(live, "share", "data-value"), "1.0000", "{live}");

    let dead = backend_row(&dom, &scene.dead.to_string());
    assert_eq!(
        value_of(dead, "backend down", "data-state"),
        "down",
        "{dead}"
    );
    assert!(dead.contains(">DOWN</span>"), "{dead}");
    assert_eq!(value_of(dead, "num active", "data-value"), "0", "{dead}");
    assert_eq!(value_of(dead, "share", "data-value"), "0.0000", "{dead}");
    assert!(
        dead.contains("check: 3 checks failed"),
        "the row says why it is down: {dead}"
    );

    // The process: the open flow against --max-conns, and the transition that took the dead
    // backend down.
    assert_eq!(text_of_id(&dom, "flows-active"), "1", "{dom}");
    assert_eq!(text_of_id(&dom, "max-flows"), "77", "{dom}");
    assert_eq!(text_of_id(&dom, "backends-up"), "1 of 2 up", "{dom}");
    assert_eq!(text_of_id(&dom, "version"), env!("CARGO_PKG_VERSION"));
    let transition = format!(
        "<tr class=\"transition down\" data-backend=\"{}\">",
        scene.dead
    );
    assert!(
        dom.contains(&transition),
        "no transition row {transition}:\n{dom}"
    );
    assert!(dom.contains("<dt>--max-conns</dt><dd>77</dd>"), "{dom}");
}

#[test]
fn status_page_answers_get_and_refuses_other_paths_and_methods() {
    let scene = scene();
    let (status, body) = http_get(scene.admin, "/");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("<!DOCTYPE html>"), "{body}");
    assert!(body.contains("<meta http-equiv=\"refresh\""), "{body}");
    assert!(!body.contains("<script"), "no script: {body}");
    assert_eq!(http_get(scene.admin, "/status.html").0, 404);
    let mut s = TcpStream::connect(scene.admin).unwrap();
    s.set_read_timeout(Some(SHOW_TIMEOUT)).unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 405 "), "{reply}");
}
