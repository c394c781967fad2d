//! Arbitrary bytes into the PROXY protocol parser. The invariants (no panic; a complete header
//! fits in the input and parses the same on its own; shorter prefixes are incomplete, never
//! errors) live in the library so the unit tests check exactly the same thing.
//!
//! Run: cargo +nightly fuzz run proxy_protocol -- -dict=fuzz/proxy_protocol.dict

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringway::proxy_protocol::assert_parse_invariants(data);
});
