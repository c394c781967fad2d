use std::time::{Duration, Instant};

use log::warn;

/// A warning that is logged at most once a second, with a count of what it held back.
pub(super) struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub(super) fn new() -> RateLimited {
        RateLimited {
            last: None,
            suppressed: 0,
        }
    }

    pub(super) fn warn(&mut self, message: impl FnOnce(u64) -> String) {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                self.suppressed += 1;
            }
            _ => {
                warn!("{}", message(self.suppressed));
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}
