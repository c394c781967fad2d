//! `GET /live` and `GET /ready`: what the routing layer asks before it sends this host traffic
//! (a BGP speaker's health loop, keepalived's `track_script`, a Kubernetes probe).
//!
//! - live: the process runs and its admin threads answer. Nothing else: a host that is live but
//!   not ready must not be restarted, only taken out of rotation.
//! - ready: the listeners accept and at least one backend is up (by the health verdict that
//!   `/backends` shows). Not ready once a stop signal arrived (from the first SIGTERM/SIGINT on,
//!   for the whole `--drain-delay` and drain), or while every backend is down: another host
//!   may still reach them, and a route to a host that can serve nobody is a black hole.
//!
//! The control thread calls [`Readiness::leave`] on the first stop signal; the admin threads
//! read it with the backends' verdicts through [`verdict`].

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this process has started to leave the fleet; shared by the control thread (writer)
/// and the admin threads (readers).
#[derive(Debug, Default)]
pub struct Readiness {
    leaving: AtomicBool,
}

impl Readiness {
    /// From now on `/ready` answers 503: the route to this host should be withdrawn.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::SeqCst);
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::SeqCst)
    }
}

/// The answer to `/ready`: ready or not, and one short line saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ready: bool,
    pub why: String,
}

impl Verdict {
    /// 200 when ready, 503 when not.
    pub fn status(&self) -> (u16, &'static str) {
        if self.ready {
            (200, "OK")
        } else {
            (503, "Service Unavailable")
        }
    }
}

/// Readiness from whether the process is leaving and how many of its `total` backends are up.
pub fn verdict(leaving: bool, up: usize, total: usize) -> Verdict {
    let (ready, why) = if leaving {
        (
            false,
            format!("not ready: stopping (a stop signal arrived); {up} of {total} backends up"),
        )
    } else if up == 0 {
        (false, format!("not ready: no backend is up (0 of {total})"))
    } else {
        (
            true,
            format!("ready: accepting; {up} of {total} backends up"),
        )
    };
    Verdict { ready, why }
}

/// The answer to `/live`.
pub const LIVE: &str = "live: the process runs";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_while_serving_with_a_backend_up() {
        let v = verdict(false, 1, 4);
        assert!(v.ready);
        assert_eq!(v.status().0, 200);
        assert_eq!(v.why, "ready: accepting; 1 of 4 backends up");
    }

    #[test]
    fn not_ready_with_every_backend_down() {
        let v = verdict(false, 0, 4);
        assert!(!v.ready);
        assert_eq!(v.status(), (503, "Service Unavailable"));
        assert!(v.why.contains("no backend is up"), "{}", v.why);
    }

    #[test]
    fn not_ready_once_leaving_even_with_backends_up() {
        let readiness = Readiness::default();
        assert!(verdict(readiness.is_leaving(), 4, 4).ready);
        readiness.leave();
        let v = verdict(readiness.is_leaving(), 4, 4);
        assert!(!v.ready);
        assert!(v.why.starts_with("not ready: stopping"), "{}", v.why);
        assert!(!v.why.contains('\n'), "one line: {}", v.why);
    }
}
