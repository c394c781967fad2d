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
//! Why not getaddrinfo (`ToSocketAddrs`): it cannot be pointed at a given server (so it cannot
//! be tested against one), may answer from caches we do not control (nscd, systemd-resolved)
//! and mixes in /etc/hosts. The DNS messages are hickory-proto's; the exchange with the server
//! (UDP, TCP when the answer is truncated) is [`super::dns_exchange`].
//!
//! Search domains and `ndots` from resolv.conf are not applied: NAME is looked up as written, so
//! give the full name (in Kubernetes, `svc.namespace.svc.cluster.local`). An IP address given as
//! NAME is its own answer. Record TTLs are not used: every name is asked again each
//! `--dns-refresh`, whatever its TTL, so a short TTL is followed no faster than that and a long
//! one no slower (the nameserver's cache decides how fresh its answer is).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::dns_exchange::{exchange, Question};
use crate::config::{parse_backend, BackendSpec};

/// A CNAME chain longer than this is treated as a loop.
const MAX_CNAME_CHAIN: usize = 16;

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
    ServerError(u16),
    /// The name exists but has no A or AAAA records.
    NoAddresses,
    /// SRV: the name has no SRV records, or none whose target has an address.
    NoSrvTargets,
    /// The response breaks the DNS format.
    Malformed(String),
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
            DnsError::NoSrvTargets => {
                write!(f, "no SRV record of the name leads to an address")
            }
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
    let name = parse_name(name).map_err(DnsError::InvalidName)?;
    resolve_name(&name, nameserver, timeout)
}

/// [`resolve`] for a name already checked.
pub(super) fn resolve_name(
    name: &Name,
    nameserver: SocketAddr,
    timeout: Duration,
) -> Result<Vec<IpAddr>, DnsError> {
    let questions = [RecordType::A, RecordType::AAAA].map(|rtype| Question {
        name: name.clone(),
        rtype,
    });
    let answers = exchange(&questions, nameserver, timeout)?;
    let mut addresses = Vec::new();
    for (question, answer) in questions.iter().zip(&answers) {
        addresses.extend(records_of(&answer.answers, name, question.rtype)?.filter_map(address_of));
    }
    if addresses.is_empty() {
        return Err(DnsError::NoAddresses);
    }
    addresses.sort_unstable();
    addresses.dedup();
    Ok(addresses)
}

/// The address an A or AAAA record holds.
pub(super) fn address_of(record: &Record) -> Option<IpAddr> {
    match &record.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    }
}

/// The records of type `rtype` in `section` that are about `name`: owned by it, or by a name it
/// is an alias of (CNAME records are followed within the section, in any order). Records for
/// other names, other classes and other types are ignored.
pub(super) fn records_of<'m>(
    section: &'m [Record],
    name: &Name,
    rtype: RecordType,
) -> Result<impl Iterator<Item = &'m Record> + 'm, DnsError> {
    let names = alias_chain(section, name)?;
    Ok(section.iter().filter(move |record| {
        record.dns_class == DNSClass::IN
            && record.record_type() == rtype
            && names.contains(&record.name)
    }))
}

/// `name` and every name it is an alias of, following CNAME records in any order.
fn alias_chain(section: &[Record], name: &Name) -> Result<Vec<Name>, DnsError> {
    let mut chain = vec![name.clone()];
    while let Some(target) = chain.last().and_then(|last| {
        section.iter().find_map(|record| match &record.data {
            RData::CNAME(cname) if &record.name == last => Some(&cname.0),
            _ => None,
        })
    }) {
        if chain.contains(target) || chain.len() > MAX_CNAME_CHAIN {
            return Err(DnsError::Malformed("CNAME loop".into()));
        }
        chain.push(target.clone());
    }
    Ok(chain)
}

/// Checks `text` as a DNS name and returns it fully qualified: labels of 1 to 63 letters,
/// digits, `-` and `_`, at most 255 bytes in all; a trailing dot is allowed.
pub(super) fn parse_name(text: &str) -> Result<Name, String> {
    let trimmed = text.strip_suffix('.').unwrap_or(text);
    if trimmed.is_empty() {
        return Err(format!("'{text}' is not a DNS name"));
    }
    if trimmed
        .split('.')
        .any(|label| label.is_empty() || label.len() > 63)
    {
        return Err(format!(
            "'{text}' is not a DNS name (each dot-separated label must be 1 to 63 characters)"
        ));
    }
    if !trimmed
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "'{text}' is not a DNS name (letters, digits, '-', '_' and '.' only)"
        ));
    }
    let mut name = Name::from_ascii(trimmed)
        .map_err(|_| format!("'{text}' is longer than a DNS name may be"))?;
    name.set_fqdn(true);
    Ok(name)
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
        parse_name(name)?;
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
    use std::net::{Ipv6Addr, UdpSocket};
    use std::time::Instant;

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
    fn name_rules() {
        let name = |text: &str| parse_name(text).map(|n| n.to_ascii());
        assert_eq!(name("a.b.").unwrap(), "a.b.");
        assert_eq!(name("_srv.x-y.Z9").unwrap(), "_srv.x-y.Z9.");
        for bad in [
            "",
            ".",
            "a..b",
            ".a",
            "a b",
            "a/b",
            "é.com",
            "a.b..",
            "10.0.0.1:80",
        ] {
            assert!(parse_name(bad).is_err(), "{bad:?}");
        }
        assert!(parse_name(&"a".repeat(63)).is_ok());
        assert!(parse_name(&"a".repeat(64)).is_err());
        let long = vec!["a".repeat(63); 4].join("."); // 4 * 64 + 1 = 257 bytes
        assert!(parse_name(&long).is_err());
        let longest = [vec!["a".repeat(63); 3], vec!["a".repeat(61)]]
            .concat()
            .join("."); // 255 bytes on the wire
        assert!(parse_name(&longest).is_ok());
    }

    fn record(owner: &str, data: RData) -> Record {
        Record::from_rdata(parse_name(owner).unwrap(), 300, data)
    }

    fn a(ip: &str) -> RData {
        RData::A(hickory_proto::rr::rdata::A(ip.parse().unwrap()))
    }

    fn cname(target: &str) -> RData {
        RData::CNAME(hickory_proto::rr::rdata::CNAME(parse_name(target).unwrap()))
    }

    fn addresses(section: &[Record], name: &str) -> Result<Vec<IpAddr>, DnsError> {
        let name = parse_name(name).unwrap();
        Ok(records_of(section, &name, RecordType::A)?
            .filter_map(address_of)
            .collect())
    }

    #[test]
    fn cname_chain_is_followed_and_strangers_ignored() {
        let section = [
            record("web.example", cname("LB.example")),
            record("lb.example", a("10.0.0.7")),
            record("other.example", a("10.9.9.9")),
        ];
        let got = addresses(&section, "Web.Example").unwrap();
        assert_eq!(got, ["10.0.0.7".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn cname_after_its_target_and_loops() {
        let section = [
            record("b.example", a("10.0.0.8")),
            record("a.example", cname("b.example")),
        ];
        let got = addresses(&section, "a.example").unwrap();
        assert_eq!(got, ["10.0.0.8".parse::<IpAddr>().unwrap()]);

        let section = [
            record("a.example", cname("b.example")),
            record("b.example", cname("a.example")),
        ];
        let error = addresses(&section, "a.example").unwrap_err();
        assert_eq!(error.to_string(), "malformed DNS response: CNAME loop");
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
