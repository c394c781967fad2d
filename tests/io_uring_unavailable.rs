//! When io_uring cannot be used (a container runtime's seccomp profile, the
//! `kernel.io_uring_disabled` sysctl), Ringway must say so in one line, with how to fix it, and
//! exit 1 — not panic, and not leave a half-started process behind.
//!
//! The sysctl is host-wide, so flipping it would disturb everything else on the machine; instead
//! the test starts the binary under a seccomp filter that makes `io_uring_setup` fail with EPERM,
//! exactly what Docker's default profile does.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Installs, in the child between fork and exec, a seccomp filter that fails io_uring_setup.
fn deny_io_uring(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls async-signal-safe
    // system calls (prctl) on memory it owns (the filter program on its stack).
    unsafe {
        command.pre_exec(|| {
            let nr_offset = 0u32; // offsetof(struct seccomp_data, nr)
            let filter = [
                libc::sock_filter {
                    code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                    jt: 0,
                    jf: 0,
                    k: nr_offset,
                },
                libc::sock_filter {
                    code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 1,
                    k: libc::SYS_io_uring_setup as u32,
                },
                libc::sock_filter {
                    code: (libc::BPF_RET | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
                },
                libc::sock_filter {
                    code: (libc::BPF_RET | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ALLOW,
                },
            ];
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn blocked_io_uring_is_explained_in_one_line_and_exits_1() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringway"));
    command
        .args(["--listen", "127.0.0.1:0", "--backend"])
        .arg(backend.local_addr().unwrap().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    deny_io_uring(&mut command);
    let mut child = command
        .spawn()
        .expect("start ringway under the seccomp filter");

    // It must end by itself, promptly; kill it if it does not, so the test cannot hang.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ringway kept running without io_uring");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();

    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("io_uring"))
        .unwrap_or_else(|| panic!("no line about io_uring in: {stderr}"));
    eprintln!("ringway said: {line}");
    assert!(
        line.contains("seccomp") || line.contains("io_uring_disabled"),
        "the message should name the cause: {line}"
    );
    assert!(
        line.contains("allow") || line.contains("sysctl"),
        "the message should say how to fix it: {line}"
    );
}
