//! The Debian package as an operator meets it: `scripts/package.sh` builds it (cargo-deb, a
//! release build), `dpkg -i` installs it on this machine, the installed binary and unit work
//! (`ringway --version`, `systemd-analyze verify`), and `dpkg -r` / `dpkg -P` take it away
//! again. Needs root and dpkg (Debian); slow (a release build). Whatever happens, the package
//! is purged at the end, and the ringway account removed if this test created it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// A release build from scratch on a loaded 2-CPU machine, plus installing cargo-deb once.
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// How long dpkg may wait for another dpkg or apt on this machine to release its lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `program args`, bounded by `timeout` (killed after it); panics if it cannot start.
fn run(program: &str, args: &[&str], timeout: Duration) -> Output {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    let waiter = thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = done.send(());
        out
    });
    if finished.recv_timeout(timeout).is_err() {
        // SAFETY: kill(2) with plain integers; `pid` is our child, not yet reaped (the waiter
        // thread reaps it only once it has exited).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let _ = waiter.join();
        panic!("{program} {args:?} did not finish within {timeout:?} (killed)");
    }
    waiter
        .join()
        .expect("waiter thread")
        .unwrap_or_else(|e| panic!("waiting for {program}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// dpkg with `args`, retried while another package manager holds the dpkg lock.
fn dpkg(args: &[&str]) -> Output {
    let deadline = Instant::now() + LOCK_TIMEOUT;
    loop {
        let out = run("dpkg", args, LOCK_TIMEOUT);
        let locked = text(&out.stderr).contains("lock");
        if out.status.success() || !locked || Instant::now() >= deadline {
            return out;
        }
        thread::sleep(Duration::from_millis(500));
    }
}

fn account_exists() -> bool {
    run("getent", &["passwd", "ringway"], Duration::from_secs(30))
        .status
        .success()
}

fn installed() -> bool {
    let out = run(
        "dpkg-query",
        &["-W", "-f=${Status}", "ringway"],
        Duration::from_secs(30),
    );
    out.status.success() && !text(&out.stdout).contains("not-installed")
}

/// Purges the package when the test ends, passed or failed, and removes the ringway account
/// if it did not exist before (Debian never removes a package's system account by itself).
struct Cleanup {
    remove_account: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if installed() {
            let out = dpkg(&["--purge", "ringway"]);
            if !out.status.success() {
                eprintln!("cleanup: dpkg --purge ringway failed: {}", describe(&out));
            }
        }
        if self.remove_account && account_exists() {
            let _ = run("userdel", &["ringway"], Duration::from_secs(30));
            let _ = run("groupdel", &["ringway"], Duration::from_secs(30));
        }
    }
}

/// Files the installed package owns, from `dpkg -L`.
fn package_files() -> Vec<PathBuf> {
    let out = run("dpkg", &["-L", "ringway"], Duration::from_secs(30));
    assert!(out.status.success(), "dpkg -L ringway: {}", describe(&out));
    text(&out.stdout).lines().map(PathBuf::from).collect()
}

#[test]
fn the_debian_package_installs_works_and_removes_cleanly() {
    // SAFETY: geteuid has no arguments and cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "installing a package needs root (run scripts/test.sh as root)"
    );
    assert!(
        !installed(),
        "a ringway package is already installed on this machine; this test would remove it"
    );

    let out = run(
        "bash",
        &[&format!("{ROOT}/scripts/package.sh")],
        BUILD_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "scripts/package.sh: {}",
        describe(&out)
    );
    let deb = text(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let deb = if Path::new(&deb).is_absolute() {
        PathBuf::from(deb)
    } else {
        Path::new(ROOT).join(deb)
    };
    assert!(
        deb.extension().is_some_and(|e| e == "deb") && deb.is_file(),
        "scripts/package.sh did not end with the path of a .deb: {}",
        describe(&out)
    );
    let deb = deb.to_str().expect("utf-8 path").to_string();

    // Installing or upgrading must neither start nor restart the service: a fresh install
    // needs its configuration first, and a restart would refuse clients while it drains.
    let postinst = run(
        "dpkg-deb",
        &["-I", &deb, "postinst"],
        Duration::from_secs(60),
    );
    let postinst = text(&postinst.stdout);
    assert!(
        postinst.contains("systemd-sysusers")
            && !postinst.contains("deb-systemd-invoke")
            && !postinst.contains("systemctl start")
            && !postinst.contains("systemctl restart"),
        "the package's postinst starts or restarts the service, or creates no account:\n{postinst}"
    );

    let _cleanup = Cleanup {
        remove_account: !account_exists(),
    };
    let out = dpkg(&["--install", &deb]);
    assert!(out.status.success(), "dpkg -i {deb}: {}", describe(&out));

    // The binary, with the commit it was built from.
    let out = run("/usr/bin/ringway", &["--version"], Duration::from_secs(30));
    let version = text(&out.stdout);
    assert!(
        out.status.success()
            && version.starts_with(&format!("ringway {} (commit ", env!("CARGO_PKG_VERSION"))),
        "/usr/bin/ringway --version: {}",
        describe(&out)
    );
    let head = run(
        "git",
        &["-C", ROOT, "rev-parse", "--short=12", "HEAD"],
        Duration::from_secs(30),
    );
    if head.status.success() {
        let head = text(&head.stdout).trim().to_string();
        assert!(
            version.contains(&head),
            "built in a git checkout at {head}, but the packaged binary says {version}"
        );
    }

    // The unit: installed, pointing at the packaged binary, and valid for systemd.
    let files = package_files();
    let unit = files
        .iter()
        .find(|p| p.ends_with("systemd/system/ringway.service"))
        .unwrap_or_else(|| panic!("no ringway.service among the package's files: {files:#?}"))
        .clone();
    let unit_text = std::fs::read_to_string(&unit).expect("read the installed unit");
    assert!(
        unit_text.contains("\nExecStart=/usr/bin/ringway ")
            && unit_text.contains("\nType=notify\n"),
        "installed unit {}:\n{unit_text}",
        unit.display()
    );
    let out = run(
        "systemd-analyze",
        &["verify", unit.to_str().unwrap()],
        Duration::from_secs(120),
    );
    let complaints: Vec<String> = text(&out.stderr)
        .lines()
        .chain(text(&out.stdout).lines())
        .filter(|l| l.contains("ringway"))
        .map(str::to_string)
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify {}: {}",
        unit.display(),
        describe(&out)
    );

    // The account it runs as, the configuration as conffiles, logrotate's file, the docs.
    assert!(
        account_exists(),
        "the package did not create the ringway account"
    );
    let conffiles = run(
        "dpkg-query",
        &["-W", "-f=${Conffiles}", "ringway"],
        Duration::from_secs(30),
    );
    let conffiles = text(&conffiles.stdout);
    for file in [
        "/etc/ringway/ringway.env",
        "/etc/ringway/backends",
        "/etc/logrotate.d/ringway",
    ] {
        assert!(
            conffiles.contains(file),
            "{file} is not a conffile: {conffiles}"
        );
        assert!(Path::new(file).is_file(), "{file} not installed");
    }
    for file in [
        "/usr/share/doc/ringway/README.md",
        "/usr/share/doc/ringway/docs/operations.md",
    ] {
        assert!(Path::new(file).is_file(), "{file} not installed");
    }

    // Remove: the program goes, the operator's configuration stays...
    let out = dpkg(&["--remove", "ringway"]);
    assert!(out.status.success(), "dpkg -r ringway: {}", describe(&out));
    assert!(
        !Path::new("/usr/bin/ringway").exists(),
        "dpkg -r left /usr/bin/ringway"
    );
    assert!(!unit.exists(), "dpkg -r left {}", unit.display());
    assert!(
        Path::new("/etc/ringway/ringway.env").exists(),
        "dpkg -r removed a conffile"
    );
    // ...until purge, which leaves nothing.
    let out = dpkg(&["--purge", "ringway"]);
    assert!(out.status.success(), "dpkg -P ringway: {}", describe(&out));
    assert!(!installed(), "ringway still known to dpkg after purge");
    for path in files.iter().chain([
        &PathBuf::from("/etc/ringway/ringway.env"),
        &PathBuf::from("/etc/logrotate.d/ringway"),
    ]) {
        assert!(
            !path.is_file(),
            "{} is still there after dpkg -P",
            path.display()
        );
    }
}
