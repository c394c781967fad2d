//! `--backend-dns NAME:PORT`: every A and AAAA address of NAME is a backend, re-resolved every
//! `--dns-refresh`.
//!
//! API, for the control thread:
//!
//! - [`DnsTarget`]: the flag value, parsed with `"web.internal:8080".parse::<DnsTarget>()`.
//! - [`system_nameserver`]: the first usable `nameserver` of /etc/resolv.conf, port 53.
//! - [`resolve`]`(name, nameserver, timeout)`: all A and AAAA addresses, sorted and
//!   deduplicated, so two answers compare with `==`. Blocks for at most about `timeout`.
//! - [`backends_from_addresses`]`(target, addrs)`: one backend per address, named `IP:PORT`.
//!
//! Every `Err` means "keep the backends in use": that includes a name with no addresses
//! ([`DnsError::NoAddresses`]) and NXDOMAIN, so that a DNS mistake cannot empty the pool.
//!
//! Why our own client rather than getaddrinfo (`ToSocketAddrs`): getaddrinfo cannot be pointed
//! at a given server (so it cannot be tested against one), may answer from caches we do not
//! control (nscd, systemd-resolved) and mixes in /etc/hosts. What we need is small: one UDP
//! exchange per record type, with TCP when the answer is truncated.
//!
//! How a lookup goes: the A and the AAAA query leave together from one UDP socket connected
//! to the nameserver (so the kernel drops datagrams from anyone else), each with a random ID;
//! a reply counts only if its ID and question match. Unanswered queries are sent once more
//! halfway through the timeout. A truncated (TC) answer is asked again over TCP. Search
//! domains and `ndots` from resolv.conf are not applied: NAME is looked up as written, so give
//! the full name (in Kubernetes, `svc.namespace.svc.cluster.local`). An IP address given as NAME
//! is its own answer.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::dns_message::{
    build_query, encode_name, parse_response, RecordType, ResponseError, EDNS_UDP_PAYLOAD,
    RCODE_NXDOMAIN, RCODE_REFUSED, RCODE_SERVFAIL,
};
use crate::config::{parse_backend, BackendSpec};

/// Sends per query over UDP: the first, and one retry for a lost datagram.
const UDP_ATTEMPTS: u32 = 2;

/// Why a lookup gave no usable answer.
#[derive(Debug)]
pub enum DnsError {
    /// NAME is not a valid DNS name.
    InvalidName(String),
    /// No answer from the nameserver in time.
    Timeout {
        nameserver: SocketAddr,
        after: Duration,
    },
    /// The name does not exist (NXDOMAIN).
    NxDomain,
    /// The nameserver could not answer (SERVFAIL), e.g. its upstream failed.
    ServFail,
    /// The nameserver refused the query (REFUSED), e.g. not allowed to recurse for us.
    Refused,
    /// Another error code from the nameserver (e.g. 1, FORMERR).
    ServerError(u8),
    /// The name exists but has no A or AAAA records.
    NoAddresses,
    /// The response breaks the DNS format.
    Malformed(&'static str),
    /// A socket error talking to the nameserver (e.g. connection refused: nothing listens).
    Io {
        nameserver: SocketAddr,
        error: io::Error,
    },
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::InvalidName(message) => write!(f, "{message}"),
            DnsError::Timeout { nameserver, after } => {
                write!(f, "no answer from nameserver {nameserver} within {after:?}")
            }
            DnsError::NxDomain => write!(f, "the name does not exist (NXDOMAIN)"),
            DnsError::ServFail => write!(f, "the nameserver failed to answer (SERVFAIL)"),
            DnsError::Refused => write!(f, "the nameserver refused the query (REFUSED)"),
            DnsError::ServerError(rcode) => {
                write!(f, "the nameserver answered with error code {rcode}")
            }
            DnsError::NoAddresses => write!(f, "the name has no A or AAAA records"),
            DnsError::Malformed(why) => write!(f, "malformed DNS response: {why}"),
            DnsError::Io { nameserver, error } => write!(f, "nameserver {nameserver}: {error}"),
        }
    }
}

impl std::error::Error for DnsError {}

/// Returns every A and AAAA address of `name`, sorted and without duplicates, asking
/// `nameserver`. Returns within about `timeout` (a TCP retry after a truncated answer may take
/// up to what remains of it again).
pub fn resolve(
    name: &str,
    nameserver: SocketAddr,
    timeout: Duration,
) -> Result<Vec<IpAddr>, DnsError> {
    if let Ok(address) = name.parse::<IpAddr>() {
        return Ok(vec![address]);
    }
    let qname = encode_name(name).map_err(DnsError::InvalidName)?;
    let deadline = Instant::now() + timeout;
    let random = random_u64();
    let id_a = random as u16;
    let id_aaaa = match (random >> 16) as u16 {
        same if same == id_a => same ^ 1,
        other => other,
    };
    let mut queries = [
        Query::new(id_a, &qname, RecordType::A),
        Query::new(id_aaaa, &qname, RecordType::Aaaa),
    ];

    let io_error = |error: io::Error| match error.kind() {
        // A socket timeout on the TCP retry.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => DnsError::Timeout {
            nameserver,
            after: timeout,
        },
        _ => DnsError::Io { nameserver, error },
    };
    exchange_udp(&mut queries, nameserver, deadline).map_err(io_error)?;
    for query in &mut queries {
        if matches!(query.outcome, Outcome::Truncated) {
            query.outcome = exchange_tcp(query, nameserver, deadline).map_err(io_error)?;
        }
    }

    let mut addresses = Vec::new();
    for query in queries {
        match query.outcome {
            Outcome::Addresses(found) => addresses.extend(found),
            Outcome::Failed(error) => return Err(error),
            Outcome::Pending | Outcome::Truncated => {
                return Err(DnsError::Timeout {
                    nameserver,
                    after: timeout,
                })
            }
        }
    }
    if addresses.is_empty() {
        return Err(DnsError::NoAddresses);
    }
    addresses.sort_unstable();
    addresses.dedup();
    Ok(addresses)
}

/// One question on the wire and what became of it.
struct Query<'a> {
    id: u16,
    qname: &'a [u8],
    qtype: RecordType,
    packet: Vec<u8>,
    outcome: Outcome,
}

enum Outcome {
    Pending,
    Truncated,
    Addresses(Vec<IpAddr>),
    Failed(DnsError),
}

impl<'a> Query<'a> {
    fn new(id: u16, qname: &'a [u8], qtype: RecordType) -> Query<'a> {
        Query {
            id,
            qname,
            qtype,
            packet: build_query(id, qname, qtype),
            outcome: Outcome::Pending,
        }
    }

    fn is_pending(&self) -> bool {
        matches!(self.outcome, Outcome::Pending)
    }

    /// What `response` says about this query, or `None` when it is someone else's.
    fn outcome_of(&self, response: &[u8]) -> Option<Outcome> {
        Some(
            match parse_response(response, self.id, self.qname, self.qtype) {
                Ok(addresses) => Outcome::Addresses(addresses),
                Err(ResponseError::NotOurs) => return None,
                Err(ResponseError::Truncated) => Outcome::Truncated,
                Err(ResponseError::Rcode(rcode)) => Outcome::Failed(match rcode {
                    RCODE_NXDOMAIN => DnsError::NxDomain,
                    RCODE_SERVFAIL => DnsError::ServFail,
                    RCODE_REFUSED => DnsError::Refused,
                    other => DnsError::ServerError(other),
                }),
                Err(ResponseError::Malformed(why)) => Outcome::Failed(DnsError::Malformed(why)),
            },
        )
    }
}

/// Still worth waiting: some query has no answer yet and none has failed (one failure fails
/// the lookup, so the other answer would not be used).
fn waiting(queries: &[Query]) -> bool {
    queries.iter().any(Query::is_pending)
        && !queries
            .iter()
            .any(|q| matches!(q.outcome, Outcome::Failed(_)))
}

/// Sends every query and collects answers until all are in or `deadline`; queries still
/// unanswered at the halfway point are sent again. The reply ID is the same for a retry, so a
/// late answer to the first send is as good as one to the second.
fn exchange_udp(
    queries: &mut [Query],
    nameserver: SocketAddr,
    deadline: Instant,
) -> io::Result<()> {
    let local: SocketAddr = match nameserver {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(nameserver)?;
    let mut buffer = vec![0u8; usize::from(EDNS_UDP_PAYLOAD) + 512];
    for attempt in 0..UDP_ATTEMPTS {
        let now = Instant::now();
        let attempt_deadline =
            now + deadline.saturating_duration_since(now) / (UDP_ATTEMPTS - attempt);
        if !waiting(queries) {
            break;
        }
        for query in queries.iter().filter(|q| q.is_pending()) {
            socket.send(&query.packet)?;
        }
        while waiting(queries) {
            let Some(wait) = time_left(attempt_deadline) else {
                break;
            };
            socket.set_read_timeout(Some(wait))?;
            let length = match socket.recv(&mut buffer) {
                Ok(length) => length,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let response = &buffer[..length];
            for query in queries.iter_mut().filter(|q| q.is_pending()) {
                if let Some(outcome) = query.outcome_of(response) {
                    query.outcome = outcome;
                }
            }
        }
    }
    Ok(())
}

/// Asks `query` again over TCP (RFC 1035 4.2.2: each message prefixed by its 2-byte length).
fn exchange_tcp(query: &Query, nameserver: SocketAddr, deadline: Instant) -> io::Result<Outcome> {
    let timed_out = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "TCP retry of a truncated answer timed out",
        )
    };
    let mut stream =
        TcpStream::connect_timeout(&nameserver, time_left(deadline).ok_or_else(timed_out)?)?;
    let mut message = Vec::with_capacity(query.packet.len() + 2);
    message.extend_from_slice(&(query.packet.len() as u16).to_be_bytes());
    message.extend_from_slice(&query.packet);
    stream.set_write_timeout(Some(time_left(deadline).ok_or_else(timed_out)?))?;
    stream.write_all(&message)?;
    stream.set_read_timeout(Some(time_left(deadline).ok_or_else(timed_out)?))?;
    let mut length = [0u8; 2];
    stream.read_exact(&mut length)?;
    let mut response = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut response)?;
    Ok(match query.outcome_of(&response) {
        None => Outcome::Failed(DnsError::Malformed("the TCP answer is not for our query")),
        Some(Outcome::Truncated) => Outcome::Failed(DnsError::Malformed("truncated even over TCP")),
        Some(outcome) => outcome,
    })
}

/// What is left until `deadline`, or `None` when it has passed. Never zero, which socket
/// timeouts reject.
fn time_left(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    (!left.is_zero()).then_some(left)
}

/// Unpredictable bits for query IDs, from the standard library's per-process random hash keys
/// (the random source port adds 16 more bits against off-path spoofing).
fn random_u64() -> u64 {
    RandomState::new().hash_one(Instant::now())
}

/// The nameserver of /etc/resolv.conf (the first `nameserver` line with a usable address), on
/// port 53.
pub fn system_nameserver() -> Option<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    nameserver_from_resolv_conf(&text)
}

fn nameserver_from_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then(|| words.next())?
        })
        // A link-local IPv6 server with a zone (fe80::1%eth0) would need the interface
        // index; such lines are skipped.
        .find_map(|address| address.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}

/// The value of `--backend-dns`: a DNS name and the port its backends listen on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsTarget {
    pub name: String,
    pub port: u16,
}

impl FromStr for DnsTarget {
    type Err = String;

    /// `NAME:PORT`, e.g. `web.internal:8080` (a trailing dot on NAME is allowed).
    fn from_str(text: &str) -> Result<DnsTarget, String> {
        let usage = || format!("'{text}' is not NAME:PORT (e.g. web.internal:8080)");
        let (name, port) = text.trim().rsplit_once(':').ok_or_else(usage)?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(usage)?;
        encode_name(name)?;
        Ok(DnsTarget {
            name: name.to_string(),
            port,
        })
    }
}

impl fmt::Display for DnsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.port)
    }
}

/// One backend per address: named by its address (`IP:PORT`, IPv6 bracketed), weight 1, not a
/// backup. Naming backends by address means a change in the DNS answer moves only the keys of
/// the addresses added or removed.
///
/// Each backend is made by `config::parse_backend` from its `IP:PORT` text, so it is exactly what
/// `--backend IP:PORT` would give (same identity, same defaults for every other field).
pub fn backends_from_addresses(target: &DnsTarget, addrs: &[IpAddr]) -> Vec<BackendSpec> {
    addrs
        .iter()
        // Fails only for port 0, which `DnsTarget::from_str` never produces.
        .filter_map(|ip| parse_backend(&SocketAddr::new(*ip, target.port).to_string()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_parsing() {
        let t: DnsTarget = "web.internal:8080".parse().unwrap();
        assert_eq!(
            t,
            DnsTarget {
                name: "web.internal".into(),
                port: 8080
            }
        );
        assert_eq!(t.to_string(), "web.internal:8080");
        let t: DnsTarget = "web.ns.svc.cluster.local.:80".parse().unwrap();
        assert_eq!(t.name, "web.ns.svc.cluster.local.");
        for bad in [
            "web.internal",
            "web.internal:",
            "web.internal:0",
            "web.internal:70000",
            ":80",
            "a b:80",
            "web..x:80",
        ] {
            assert!(bad.parse::<DnsTarget>().is_err(), "{bad}");
        }
        assert_eq!(
            "web.internal".parse::<DnsTarget>().unwrap_err(),
            "'web.internal' is not NAME:PORT (e.g. web.internal:8080)"
        );
    }

    #[test]
    fn backends_are_named_by_address() {
        let target: DnsTarget = "web.internal:8080".parse().unwrap();
        let addrs: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        let backends = backends_from_addresses(&target, &addrs);
        let names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["10.0.0.1:8080", "[fd00::1]:8080"]);
        let b = &backends[1];
        assert_eq!(
            (b.host.as_str(), b.port, b.weight, b.backup),
            ("fd00::1", 8080, 1, false)
        );
        let b = &backends[0];
        assert_eq!(
            (b.host.as_str(), b.port, b.weight, b.backup),
            ("10.0.0.1", 8080, 1, false)
        );
    }

    #[test]
    fn resolv_conf() {
        let text = "# generated\nsearch example.com\noptions ndots:5\nnameserver fe80::1%eth0\nnameserver   10.0.0.2 \nnameserver 10.0.0.3\n";
        assert_eq!(
            nameserver_from_resolv_conf(text),
            Some("10.0.0.2:53".parse().unwrap())
        );
        assert_eq!(
            nameserver_from_resolv_conf("nameserver ::1\n"),
            Some("[::1]:53".parse().unwrap())
        );
        assert_eq!(nameserver_from_resolv_conf("search x\nnameserver\n"), None);
        assert_eq!(nameserver_from_resolv_conf(""), None);
    }

    #[test]
    fn an_address_is_its_own_answer() {
        // Nameserver unused: nothing is sent.
        let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let got = resolve("fd00::7", unused, Duration::from_millis(1)).unwrap();
        assert_eq!(got, ["fd00::7".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn invalid_names_are_refused_before_sending() {
        let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let error = resolve("a..b", unused, Duration::from_millis(1)).unwrap_err();
        assert!(matches!(error, DnsError::InvalidName(_)), "{error}");
    }

    #[test]
    fn silence_is_a_timeout() {
        // A bound UDP socket that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let nameserver = silent.local_addr().unwrap();
        let started = Instant::now();
        let error = resolve("web.test", nameserver, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(error, DnsError::Timeout { .. }), "{error}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(5));
        // Both queries were sent twice (a first send and one retry).
        silent.set_nonblocking(true).unwrap();
        let mut buffer = [0u8; 512];
        let mut received = 0;
        while silent.recv(&mut buffer).is_ok() {
            received += 1;
        }
        assert_eq!(received, 4);
    }

    /// Answers each query twice: first with a wrong ID, then with the right one, and an
    /// address derived from the query type (A: 10.0.0.1, AAAA: fd00::1).
    fn answer_after_a_stray(server: UdpSocket) {
        let mut buffer = [0u8; 512];
        for _ in 0..2 {
            let Ok((length, client)) = server.recv_from(&mut buffer) else {
                return;
            };
            // The query without its OPT record, as a response with one answer.
            let mut response = buffer[..length - 11].to_vec();
            response[2] = 0x81; // QR, RD
            response[3] = 0x80; // RA, rcode 0
            response[6..8].copy_from_slice(&1u16.to_be_bytes());
            response[10..12].copy_from_slice(&0u16.to_be_bytes());
            let is_aaaa = response[length - 11 - 3] == 28;
            response.extend_from_slice(&[0xc0, 12, 0, if is_aaaa { 28 } else { 1 }, 0, 1]);
            response.extend_from_slice(&60u32.to_be_bytes());
            if is_aaaa {
                response.extend_from_slice(&[0, 16]);
                response.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
            } else {
                response.extend_from_slice(&[0, 4, 10, 0, 0, 1]);
            }
            let mut stray = response.clone();
            stray[0] ^= 0xff;
            let _ = server.send_to(&stray, client);
            let _ = server.send_to(&response, client);
        }
    }

    #[test]
    fn replies_with_another_id_are_ignored() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let nameserver = server.local_addr().unwrap();
        let thread = std::thread::spawn(move || answer_after_a_stray(server));
        let got = resolve("web.test", nameserver, Duration::from_secs(5)).unwrap();
        thread.join().unwrap();
        let expected: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        assert_eq!(got, expected);
    }

    #[test]
    fn errors_read_well() {
        let ns: SocketAddr = "10.0.0.2:53".parse().unwrap();
        let timeout = DnsError::Timeout {
            nameserver: ns,
            after: Duration::from_secs(2),
        };
        assert_eq!(
            timeout.to_string(),
            "no answer from nameserver 10.0.0.2:53 within 2s"
        );
        assert_eq!(
            DnsError::NxDomain.to_string(),
            "the name does not exist (NXDOMAIN)"
        );
        assert_eq!(
            DnsError::ServFail.to_string(),
            "the nameserver failed to answer (SERVFAIL)"
        );
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let io = DnsError::Io {
            nameserver: ns,
            error: refused,
        };
        assert!(io.to_string().starts_with("nameserver 10.0.0.2:53: "));
    }
}
