//! systemd's readiness protocol (sd_notify), spoken directly: one datagram per state change,
//! `KEY=VALUE` lines, sent to the Unix datagram socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name written with a leading `@`). Without `$NOTIFY_SOCKET` (not under systemd, or a
//! unit that is not `Type=notify`) every call does nothing.
//!
//! What Ringway sends, and when (see docs/operations.md, "Running under systemd"):
//!
//! | message | when |
//! | --- | --- |
//! | `READY=1` | every listener is bound and every worker runs (end of start-up) |
//! | `STATUS=...` | once a second at most, when flows or backends up changed |
//! | `RELOADING=1` + `MONOTONIC_USEC=` | SIGHUP received, before the reload; `READY=1` after |
//! | `STOPPING=1` | first SIGTERM/SIGINT: the drain starts |
//! | `WATCHDOG=1` | with `WatchdogSec=`, from the control loop while every worker answers |
//! | `MAINPID=` | [`main_pid`], for a process that hands the service over to another |
//!
//! Sending never blocks (the socket is non-blocking) and a failure is logged once, not
//! returned: systemd missing a status line must never stop the proxy.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::warn;

/// A connection to the service manager, or nothing when there is none.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// `WatchdogSec=` of the unit, when the watchdog is enabled for this process.
    watchdog: Option<Duration>,
    /// A send failed and was logged: later failures are not.
    warned: AtomicBool,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`. A socket that cannot be
    /// set up is logged and treated as absent.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let target = socket.and_then(|name| match connect(&name.to_string_lossy()) {
            Ok(target) => Some(target),
            Err(e) => {
                warn!(
                    "NOTIFY_SOCKET={}: {e}; not notifying systemd",
                    name.display()
                );
                None
            }
        });
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Notifier {
            target,
            watchdog,
            warned: AtomicBool::new(false),
        }
    }

    /// The watchdog interval systemd expects pings within, if it watches this process.
    pub fn watchdog(&self) -> Option<Duration> {
        self.target.as_ref().and(self.watchdog)
    }

    /// Sends `state` (newline-separated `KEY=VALUE` lines) as one datagram.
    pub fn send(&self, state: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                warn!("cannot notify systemd ({e}); further failures are not logged");
            }
        }
    }

    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// `RELOADING=1` with the monotonic time systemd >= 253 requires to match it to a reload
    /// it started (`Type=notify-reload`); older versions ignore the extra field.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// One line for `systemctl status`. Newlines would start new fields: they are replaced.
    pub fn status(&self, text: &str) {
        self.send(&format!("STATUS={}", text.replace('\n', " ")));
    }

    pub fn watchdog_ping(&self) {
        self.send("WATCHDOG=1");
    }
}

/// Tells the service manager that `pid` is now the service's main process (`MAINPID=`), for a
/// process that hands the service over to another one (an upgrade). Returns `Ok(false)` when
/// there is no `$NOTIFY_SOCKET` to tell. systemd only accepts it from the current main process
/// (or any process with `NotifyAccess=all`).
pub fn main_pid(pid: u32) -> io::Result<bool> {
    let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    main_pid_to(&name.to_string_lossy(), pid)?;
    Ok(true)
}

/// `MAINPID=pid` to the socket `name` (as written in `$NOTIFY_SOCKET`).
fn main_pid_to(name: &str, pid: u32) -> io::Result<()> {
    let (socket, addr) = connect(name)?;
    socket.send_to_addr(format!("MAINPID={pid}").as_bytes(), &addr)?;
    Ok(())
}

/// An unbound, non-blocking datagram socket and the address of `name`: a path, or an abstract
/// name when it starts with `@` (the `@` stands for the leading NUL byte).
fn connect(name: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = notify_addr(name)?;
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

fn notify_addr(name: &str) -> io::Result<SocketAddr> {
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())
        }
        None if name.starts_with('/') => SocketAddr::from_pathname(name),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither an absolute path nor an abstract name (@...)",
        )),
    }
}

/// The watchdog interval, as `sd_watchdog_enabled` decides it: `WATCHDOG_USEC` must be a
/// positive number of microseconds, and `WATCHDOG_PID`, when set, must name this process (a
/// child that inherited the variables is not the one being watched).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the struct we own and pass by pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if rc != 0 {
        return 0;
    }
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_follows_sd_watchdog_enabled() {
        let me = 4242;
        assert_eq!(
            watchdog_interval(Some("30000000"), None, me),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval(Some("500000"), Some("4242"), me),
            Some(Duration::from_millis(500))
        );
        // For another process (inherited variables), disabled, or garbage: no watchdog.
        assert_eq!(watchdog_interval(Some("30000000"), Some("1"), me), None);
        assert_eq!(watchdog_interval(Some("0"), None, me), None);
        assert_eq!(watchdog_interval(Some("soon"), None, me), None);
        assert_eq!(watchdog_interval(Some("1000"), Some("x"), me), None);
        assert_eq!(watchdog_interval(None, Some("4242"), me), None);
    }

    #[test]
    fn abstract_and_path_names() {
        use std::os::linux::net::SocketAddrExt;
        let addr = notify_addr("@ringway/notify").unwrap();
        assert_eq!(addr.as_abstract_name(), Some(&b"ringway/notify"[..]));
        let addr = notify_addr("/run/systemd/notify").unwrap();
        assert_eq!(
            addr.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        assert!(notify_addr("relative/path").is_err());
    }

    #[test]
    fn main_pid_names_the_new_main_process() {
        let dir = std::env::temp_dir().join(format!("ringway-mainpid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        main_pid_to(path.to_str().unwrap(), 4321).unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=4321");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn datagrams_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("ringway-notify-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (socket, addr) = connect(&format!("@{name}")).unwrap();
        let notifier = Notifier {
            target: Some((socket, addr)),
            watchdog: None,
            warned: AtomicBool::new(false),
        };
        notifier.reloading();
        notifier.status("3 flows\nsecond line");
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {text:?}"));
        assert!(usec > 0);
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=3 flows second line");
    }
}
