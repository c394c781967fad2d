//! The chaos soak (`scripts/soak.sh`, described in docs/reliability.md), two minutes long, against
//! the binaries of this build: mixed self-checking load through Ringway while backends are
//! SIGKILLed and restarted, the backends file is rewritten and SIGHUP is sent. Passes only if no
//! flow failed for a reason the chaos does not explain, the proxy's RSS and descriptors did not
//! grow from the first half of the run to the second, nothing was left open after the load, and
//! the proxy logged no error or panic.
//!
//! `cargo test` of this package does not build the load generator (it is the `ringway-load`
//! package of the workspace), so the test builds it first, in the same profile. The script's
//! output (the report table) is printed; `RINGWAY_SOAK_MINUTES` and `RINGWAY_SOAK_SEED` change
//! the length and replay a run.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn chaos_soak_passes() {
    let ringway = Path::new(env!("CARGO_BIN_EXE_ringway"));
    let bin_dir = ringway.parent().expect("the binary's directory");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "-q", "-p", "ringway-load"])
        .current_dir(root);
    if bin_dir.file_name().is_some_and(|d| d == "release") {
        build.arg("--release");
    }
    let built = build.status().expect("run cargo build -p ringway-load");
    assert!(built.success(), "cargo build -p ringway-load failed");
    let load = bin_dir.join("ringway-load");
    assert!(load.exists(), "no {} after the build", load.display());

    let minutes = std::env::var("RINGWAY_SOAK_MINUTES").unwrap_or_else(|_| "2".into());
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("scripts/soak.sh"))
        .args(["--minutes", &minutes, "--ringway"])
        .arg(ringway)
        .arg("--load")
        .arg(&load)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Ok(seed) = std::env::var("RINGWAY_SOAK_SEED") {
        cmd.args(["--seed", &seed]);
    }
    let mut child = cmd.spawn().expect("run scripts/soak.sh");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // The load runs for `minutes`; the script adds start-up and at most ~30 s of settling
    // checks. Past this bound it is stuck: SIGTERM makes it stop everything it started.
    let minutes_f: f64 = minutes.parse().expect("RINGWAY_SOAK_MINUTES is a number");
    let bound = Duration::from_secs_f64(minutes_f * 60.0 + 90.0);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the soak") {
            break Some(status);
        }
        if started.elapsed() > bound {
            // SAFETY: kill(2) on our own child, not yet reaped (we hold its `Child`).
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    eprintln!("{err}\n{out}");
    assert!(
        status.is_some_and(|s| s.success()),
        "the chaos soak failed ({}):\n{err}\n{out}",
        status.map_or_else(
            || format!("still running after {bound:?}"),
            |s| s.to_string()
        )
    );
}
