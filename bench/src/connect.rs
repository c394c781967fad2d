//! `connect`: one exchange per connection (connect, send, receive the echo, close).
//! Latency is measured from the start of connect() to the end of the reply.

use crate::rr::{self, RrConfig, RrResult};
use crate::Common;

pub fn run(common: Common, size: usize) -> RrResult {
    rr::run(&RrConfig {
        common,
        size,
        rate: None,
        reconnect: true,
        greeting: false,
    })
}
