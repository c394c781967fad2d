//! `--backend-dns-srv NAME`: the SRV records of NAME (RFC 2782) are the backends, with the port
//! and weight each record gives, re-resolved every `--dns-refresh` like `--backend-dns`.
//!
//! This is how Kubernetes headless services (`_http._tcp.web.ns.svc.cluster.local`: one record
//! per ready pod) and Consul (`_web._tcp.service.consul`, or `web.service.consul`) publish
//! instances whose ports are not all the same.
//!
//! API, for the control thread:
//!
//! - [`SrvName`]: the flag value, parsed with `"_http._tcp.web.internal".parse::<SrvName>()`.
//! - [`resolve_srv`]`(name, nameserver, timeout)`: every (address, port) the records lead to,
//!   with the record's priority and weight; sorted, so two answers compare with `==`.
//! - [`backends_from_srv`]`(records)`: the backends, named `IP:PORT`.
//!
//! Targets: each record's target name is resolved to its A and AAAA addresses, from the
//! answer's additional section when the server put them there (CoreDNS, Consul and dnsmasq
//! do), else by asking for them. A target that does not exist or has no address (a pod being
//! deleted) contributes nothing; any other failure fails the whole lookup, which keeps the
//! backends in use rather than dropping the ones that did not answer this time. A target of `.`
//! means "no service here" (RFC 2782) and is skipped.
//!
//! Priority and weight, see [`backends_from_srv`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::rr::{Name, RData, RecordType};

use super::dns::{address_of, parse_name, records_of, resolve_name, DnsError};
use super::dns_exchange::{exchange, Question};
use crate::config::{parse_backend, BackendSpec};

/// The largest backend weight `--backend` accepts; SRV weights go up to 65535.
const MAX_BACKEND_WEIGHT: u32 = 10_000;

/// The value of `--backend-dns-srv`: the DNS name whose SRV records are asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvName {
    /// As given, for messages.
    pub text: String,
    name: Name,
}

impl FromStr for SrvName {
    type Err = String;

    /// A DNS name such as `_http._tcp.web.internal` (a trailing dot is allowed); no port.
    fn from_str(text: &str) -> Result<SrvName, String> {
        let text = text.trim();
        if text.contains(':') {
            return Err(format!(
                "'{text}' is a DNS name without a port (the ports come from the SRV records), \
                 e.g. _http._tcp.web.internal"
            ));
        }
        Ok(SrvName {
            text: text.to_string(),
            name: parse_name(text)?,
        })
    }
}

impl fmt::Display for SrvName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One address:port that an SRV record leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SrvBackend {
    pub addr: SocketAddr,
    pub priority: u16,
    pub weight: u16,
}

/// Asks `nameserver` for the SRV records of `srv` and resolves their targets. An address:port
/// that several records lead to counts once, with the lowest priority (then the highest weight)
/// among them. Returns within about `timeout` in all.
pub fn resolve_srv(
    srv: &SrvName,
    nameserver: SocketAddr,
    timeout: Duration,
) -> Result<Vec<SrvBackend>, DnsError> {
    let deadline = Instant::now() + timeout;
    let question = Question {
        name: srv.name.clone(),
        rtype: RecordType::SRV,
    };
    let answer = exchange(std::slice::from_ref(&question), nameserver, timeout)?
        .pop()
        .ok_or(DnsError::NoSrvTargets)?;
    let mut found: Vec<SrvBackend> = Vec::new();
    for record in records_of(&answer.answers, &srv.name, RecordType::SRV)? {
        let RData::SRV(record) = &record.data else {
            continue;
        };
        if record.target.is_root() {
            continue;
        }
        for ip in target_addresses(&answer.additionals, &record.target, nameserver, deadline)? {
            found.push(SrvBackend {
                addr: SocketAddr::new(ip, record.port),
                priority: record.priority,
                weight: record.weight,
            });
        }
    }
    // Lowest priority first, then highest weight: the first of each address is the one kept.
    found.sort_by_key(|b| (b.addr, b.priority, u16::MAX - b.weight));
    found.dedup_by_key(|b| b.addr);
    if found.is_empty() {
        return Err(DnsError::NoSrvTargets);
    }
    Ok(found)
}

/// The addresses of an SRV target: from the additional section, or asked for.
fn target_addresses(
    additionals: &[hickory_proto::rr::Record],
    target: &Name,
    nameserver: SocketAddr,
    deadline: Instant,
) -> Result<Vec<IpAddr>, DnsError> {
    let mut addresses: Vec<IpAddr> = Vec::new();
    for rtype in [RecordType::A, RecordType::AAAA] {
        addresses.extend(records_of(additionals, target, rtype)?.filter_map(address_of));
    }
    if !addresses.is_empty() {
        return Ok(addresses);
    }
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(DnsError::Timeout {
            nameserver,
            after: Duration::ZERO,
        });
    }
    match resolve_name(target, nameserver, left) {
        Ok(addresses) => Ok(addresses),
        // The target is gone (or never had an address): it serves nothing.
        Err(DnsError::NxDomain | DnsError::NoAddresses) => Ok(Vec::new()),
        Err(other) => Err(other),
    }
}

/// One backend per address:port, named `IP:PORT` (as `--backend IP:PORT` would be, so a change
/// in the answer moves only the keys of the backends added or removed).
///
/// Priority: the records with the lowest priority value are the regular backends; every record
/// with a higher value becomes a backup (`,backup`), used only while no regular backend is up.
/// Ringway has one backup tier, so priorities 10 and 20 behind 0 are one group: in practice
/// SRV publishers use one priority (Kubernetes: always 0; Consul: always 1), and a second level
/// is a fallback site, which is what a backup is.
///
/// Weight: the record's weight, scaled down in proportion when the largest is above 10000 (the
/// most `--backend` allows). Weight 0 counts as 1: RFC 2782 gives such a target "a very small
/// chance", never none, and a weight-0 backend in Ringway would get no flows at all.
pub fn backends_from_srv(records: &[SrvBackend]) -> Vec<BackendSpec> {
    let Some(lowest) = records.iter().map(|r| r.priority).min() else {
        return Vec::new();
    };
    let largest = records
        .iter()
        .map(|r| u32::from(r.weight))
        .max()
        .unwrap_or(1);
    let weight = |w: u16| {
        let w = u32::from(w);
        let scaled = if largest > MAX_BACKEND_WEIGHT {
            w * MAX_BACKEND_WEIGHT / largest
        } else {
            w
        };
        scaled.max(1)
    };
    records
        .iter()
        // Fails only for port 0, which no usable record has; such a record is dropped.
        .filter_map(|record| {
            let mut spec = parse_backend(&record.addr.to_string()).ok()?;
            spec.weight = weight(record.weight);
            spec.backup = record.priority > lowest;
            Some(spec)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv(addr: &str, priority: u16, weight: u16) -> SrvBackend {
        SrvBackend {
            addr: addr.parse().unwrap(),
            priority,
            weight,
        }
    }

    #[test]
    fn name_parsing() {
        let name: SrvName = "_http._tcp.web.test.".parse().unwrap();
        assert_eq!(name.to_string(), "_http._tcp.web.test.");
        assert_eq!(name.name.to_ascii(), "_http._tcp.web.test.");
        let error = "_http._tcp.web.test:80".parse::<SrvName>().unwrap_err();
        assert!(error.contains("without a port"), "{error}");
        for bad in ["", "a..b", "a b.test", "é.test"] {
            assert!(bad.parse::<SrvName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lowest_priority_is_regular_the_rest_backup() {
        let backends = backends_from_srv(&[
            srv("10.0.0.1:8080", 10, 5),
            srv("10.0.0.2:8081", 10, 1),
            srv("10.0.0.3:9000", 20, 1),
            srv("[fd00::1]:9000", 30, 1),
        ]);
        let got: Vec<(&str, u32, bool)> = backends
            .iter()
            .map(|b| (b.name.as_str(), b.weight, b.backup))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1:8080", 5, false),
                ("10.0.0.2:8081", 1, false),
                ("10.0.0.3:9000", 1, true),
                ("[fd00::1]:9000", 1, true),
            ]
        );
        assert_eq!(
            (backends[3].host.as_str(), backends[3].port),
            ("fd00::1", 9000)
        );
    }

    #[test]
    fn weights_are_kept_in_proportion_within_the_backend_range() {
        let weights = |records: &[SrvBackend]| -> Vec<u32> {
            backends_from_srv(records)
                .iter()
                .map(|b| b.weight)
                .collect()
        };
        assert_eq!(
            weights(&[srv("10.0.0.1:1", 0, 0), srv("10.0.0.2:1", 0, 0)]),
            [1, 1],
            "all zero: equal"
        );
        assert_eq!(
            weights(&[srv("10.0.0.1:1", 0, 0), srv("10.0.0.2:1", 0, 100)]),
            [1, 100],
            "zero: a small chance, not none"
        );
        assert_eq!(
            weights(&[srv("10.0.0.1:1", 0, 65535), srv("10.0.0.2:1", 0, 6553)]),
            [10_000, 999]
        );
        assert!(backends_from_srv(&[]).is_empty());
    }
}
