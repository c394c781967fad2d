//! Backend discovery: where the backend list comes from when it is not fixed by `--backend` flags.
//!
//! Two sources, each producing the same thing the flags produce, a `Vec<BackendSpec>`:
//!
//! - [`backends_file`]: `--backends-file PATH`, one backend a line in `--backend` syntax, re-read
//!   when [`backends_file::FileWatch::changed`] says the file changed (polled by the control
//!   thread, e.g. once a second).
//! - [`dns`]: `--backend-dns NAME:PORT`, every A and AAAA address of NAME becomes a backend,
//!   re-resolved every `--dns-refresh` ([`dns::resolve`]).
//! - [`dns_srv`]: `--backend-dns-srv NAME`, the SRV records of NAME give address, port, weight
//!   and backup ([`dns_srv::resolve_srv`]).
//!
//! The DNS messages are hickory-proto's; [`dns_exchange`] sends them over UDP (TCP when the
//! answer is truncated) to the one nameserver given.
//!
//! Both are plain functions without threads or timers: the control thread decides when to call
//! them and what to do with the result. The rule for every error, in both sources, is the same:
//! log it and keep serving with the backends already in use. An empty list is reported as an
//! error, never returned as a value, so a mistake upstream (an emptied file, a DNS name whose
//! records were all removed) cannot take the service down.
//!
//! Identity: a backend's `name` is what consistent hashing keys on. A file backend's name is its
//! address text as written (as for `--backend`); a DNS or SRV backend's name is its `IP:PORT`. So when
//! the list changes, only the keys of the added or removed backends move.

pub mod backends_file;
pub mod dns;
mod dns_exchange;
pub mod dns_srv;
