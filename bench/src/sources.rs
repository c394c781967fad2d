//! Client source addresses: parse `127.0.0.2-127.0.0.20` (or a comma list) and spread
//! connections over them round-robin, so that more than 64k flows (and many distinct client
//! IPs, which a source-IP hashing proxy spreads over its backends) are possible on loopback.

use std::net::{IpAddr, Ipv4Addr};

/// Largest number of addresses a range may expand to.
pub const MAX_SOURCES: usize = 65_536;

/// Parse `A-B` (IPv4, inclusive), `A,B,C`, or one address. Items of a comma list may be ranges.
pub fn parse_sources(text: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some((a, b)) = item.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .map_err(|_| format!("bad IPv4 address {a:?} in range {item:?}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .map_err(|_| format!("bad IPv4 address {b:?} in range {item:?}"))?;
            let (lo, hi) = (u32::from(a), u32::from(b));
            if hi < lo {
                return Err(format!("range {item:?} ends before it starts"));
            }
            if (hi - lo) as usize >= MAX_SOURCES || out.len() + (hi - lo) as usize >= MAX_SOURCES {
                return Err(format!(
                    "range {item:?} is too large (max {MAX_SOURCES} addresses)"
                ));
            }
            out.extend((lo..=hi).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            let ip: IpAddr = item.parse().map_err(|_| format!("bad address {item:?}"))?;
            out.push(ip);
        }
    }
    if out.is_empty() {
        return Err(format!("no addresses in {text:?}"));
    }
    Ok(out)
}

/// The source address for connection number `index` (round-robin), or None for "any".
pub fn pick(sources: &[IpAddr], index: usize) -> Option<IpAddr> {
    if sources.is_empty() {
        None
    } else {
        Some(sources[index % sources.len()])
    }
}

/// How many of `n` connections each source gets (same order as `sources`).
pub fn spread(sources: &[IpAddr], n: usize) -> Vec<usize> {
    let mut counts = vec![0; sources.len()];
    for i in 0..n {
        if !sources.is_empty() {
            counts[i % sources.len()] += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_expands_inclusive() {
        let v = parse_sources("127.0.0.2-127.0.0.20").unwrap();
        assert_eq!(v.len(), 19);
        assert_eq!(v[0], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(v[18], "127.0.0.20".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn range_crosses_octets() {
        let v = parse_sources("127.0.0.250-127.0.1.5").unwrap();
        assert_eq!(v.len(), 12);
        assert_eq!(v[6], "127.0.1.0".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn lists_and_single() {
        let v = parse_sources("127.0.0.1, 127.0.0.3-127.0.0.4,::1").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(parse_sources("127.0.0.9").unwrap().len(), 1);
    }

    #[test]
    fn rejects_bad() {
        assert!(parse_sources("").is_err());
        assert!(parse_sources("127.0.0.5-127.0.0.2").is_err());
        assert!(parse_sources("127.0.0.1-nope").is_err());
        assert!(parse_sources("10.0.0.0-10.255.255.255").is_err());
    }

    #[test]
    fn spreading_is_round_robin_and_even() {
        let v = parse_sources("127.0.0.2-127.0.0.20").unwrap();
        // 9000 flows over 19 addresses: each gets 473 or 474, well under the ~28k ports one
        // address has towards one destination.
        let counts = spread(&v, 9000);
        assert_eq!(counts.iter().sum::<usize>(), 9000);
        assert!(counts.iter().all(|&c| c == 473 || c == 474));
        assert_eq!(pick(&v, 0), Some(v[0]));
        assert_eq!(pick(&v, 19), Some(v[0]));
        assert_eq!(pick(&v, 20), Some(v[1]));
        assert_eq!(pick(&[], 5), None);
        // consecutive connections use different addresses
        assert_ne!(pick(&v, 7), pick(&v, 8));
    }
}
