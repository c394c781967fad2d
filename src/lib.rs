//! Ringway: a Layer-4 TCP proxy and load balancer on io_uring.
//!
//! The crate is split into pure decision code (`config`, `balance`, `flow`) that is tested
//! without sockets, and a thin I/O shell (`worker`, `net`, `control`) that feeds it
//! completions from io_uring. See docs/architecture.md for the map.

pub mod access_log;
pub mod acl;
pub mod balance;
pub mod config;
pub mod control;
pub mod discovery;
pub mod events;
pub mod flow;
pub mod handover;
pub mod json;
pub mod metrics;
pub mod net;
pub mod proxy_protocol;
pub mod snapshot;
pub mod source_limit;
pub mod tcp_fastopen;
pub mod worker;
