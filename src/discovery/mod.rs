//! Backend discovery: where the backend list comes from when it is not fixed by `--backend` flags.
//!
//! Two sources, each producing the same thing the flags produce, a `Vec<BackendSpec>`:
//!
//! - [`backends_file`]: `--backends-file PATH`, one backend a line in `--backend` syntax, re-read
//!   when [`backends_file::FileWatch::changed`] says the file changed (polled by the control
//!   thread, e.g. once a second).
//! - [`dns`]: `--backend-dns NAME:PORT`, every A and AAAA address of NAME becomes a backend,
//!   re-resolved every `--dns-refresh` with a small DNS client of our own ([`dns::resolve`]).
//!
//! Both are plain functions without threads or timers: the control thread decides when to call
//! them and what to do with the result. The rule for every error, in both sources, is the same:
//! log it and keep serving with the backends already in use. An empty list is reported as an
//! error, never returned as a value, so a mistake upstream (an emptied file, a DNS name whose
//! records were all removed) cannot take the service down.
//!
//! Identity: a backend's `name` is what consistent hashing keys on. A file backend's name is its
//! address text as written (as for `--backend`); a DNS backend's name is its `IP:PORT`. So when
//! the list changes, only the keys of the added or removed backends move.

pub mod backends_file;
pub mod dns;
mod dns_message;
