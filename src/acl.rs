//! Which clients may connect (`--allow` / `--deny` CIDR lists) and which peers may send a PROXY
//! header (`--trusted-proxy`). Pure: built once from the configuration, then looked up for every
//! accepted connection without allocating.
//!
//! IPv4 clients often arrive on an IPv6 socket as IPv4-mapped addresses (`::ffff:a.b.c.d`).
//! They are treated exactly like the IPv4 address they carry, in rules and in lookups: an IPv6
//! rule inside `::ffff:0:0/96` becomes the equivalent IPv4 rule, and a mapped client is matched
//! against IPv4 rules only. Shorter IPv6 rules such as `::/0` mean "IPv6 clients" and do not
//! cover IPv4 clients; to match everyone, list both `0.0.0.0/0` and `::/0`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network such as `10.0.0.0/8` or `2001:db8::/32`.
///
/// Parsing accepts a bare address as a single host (/32 or /128). Host bits below the prefix are
/// cleared rather than refused (`10.1.2.3/8` is `10.0.0.0/8`), as `ip route` does; the
/// normalised form is what [`Display`](fmt::Display) shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    key: Key,
}

/// An address family and a network, left-aligned in 128 bits so that both families share one
/// mask computation: an IPv4 /8 keeps the top 8 bits, like an IPv6 /8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    family: Family,
    bits: u128,
    prefix_len: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

/// Length of the IPv4-mapped range `::ffff:0:0/96`.
const MAPPED_PREFIX_LEN: u8 = 96;

/// An address as (family, left-aligned bits), IPv4-mapped IPv6 addresses counted as IPv4.
fn family_and_bits(ip: IpAddr) -> (Family, u128) {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => (Family::V4, u128::from(u32::from(v4)) << 96),
        IpAddr::V6(v6) => (Family::V6, u128::from(v6)),
    }
}

/// The top `prefix_len` bits set. `prefix_len` is at most 128.
fn mask(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0)
}

impl Cidr {
    /// The network of `prefix_len` leading bits of `ip`. Fails when `prefix_len` is longer than
    /// the address (32 for IPv4, 128 for IPv6).
    pub fn new(ip: IpAddr, prefix_len: u8) -> Result<Cidr, CidrError> {
        let max = match ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix_len > max {
            return Err(CidrError(format!(
                "{ip}/{prefix_len}: prefix length must be 0 to {max}"
            )));
        }
        let (family, bits, prefix_len) = match ip {
            IpAddr::V4(v4) => (Family::V4, u128::from(u32::from(v4)) << 96, prefix_len),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                // A network inside ::ffff:0:0/96 is an IPv4 network.
                Some(v4) if prefix_len >= MAPPED_PREFIX_LEN => (
                    Family::V4,
                    u128::from(u32::from(v4)) << 96,
                    prefix_len - MAPPED_PREFIX_LEN,
                ),
                // Shorter, it is an IPv6 network that merely starts in the mapped range.
                _ => (Family::V6, u128::from(v6), prefix_len),
            },
        };
        Ok(Cidr {
            key: Key {
                family,
                bits: bits & mask(prefix_len),
                prefix_len,
            },
        })
    }

    /// The first address of the network (IPv4 for networks inside `::ffff:0:0/96`).
    pub fn network(&self) -> IpAddr {
        match self.key.family {
            Family::V4 => IpAddr::V4(Ipv4Addr::from((self.key.bits >> 96) as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(self.key.bits)),
        }
    }

    /// The prefix length, counted in IPv4 bits for IPv4 networks (also those written mapped).
    pub fn prefix_len(&self) -> u8 {
        self.key.prefix_len
    }

    /// Whether `ip` is in this network; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (family, bits) = family_and_bits(ip);
        family == self.key.family && bits & mask(self.key.prefix_len) == self.key.bits
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.key.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let ip: IpAddr = address.parse().map_err(|_| {
            CidrError(format!(
                "{text:?} is not an IP network: expected ADDRESS or ADDRESS/PREFIX, e.g. 10.0.0.0/8 or 2001:db8::/32"
            ))
        })?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            None => max,
            // Digits only: `u8::from_str` would also take "+8".
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().unwrap_or(u8::MAX)
            }
            Some(p) => {
                return Err(CidrError(format!(
                    "{text:?}: prefix length {p:?} must be a number from 0 to {max}"
                )))
            }
        };
        if prefix_len > max {
            return Err(CidrError(format!(
                "{text:?}: prefix length {prefix_len} must be a number from 0 to {max}"
            )));
        }
        Cidr::new(ip, prefix_len)
    }
}

/// Why a text is not a CIDR network; one line, for an operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CidrError(String);

impl fmt::Display for CidrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CidrError {}

/// Networks with a value each, for longest-prefix lookups. Per family, one level per prefix
/// length in use, longest first; each level is a sorted vector of networks, searched by bisection.
/// A lookup costs at most (prefix lengths in use) binary searches and never allocates; with
/// hundreds of rules that is a few hundred nanoseconds at worst, far below an accept.
#[derive(Clone, Debug, Default)]
struct PrefixTable<V> {
    v4: Vec<Level<V>>,
    v6: Vec<Level<V>>,
}

#[derive(Clone, Debug)]
struct Level<V> {
    prefix_len: u8,
    /// (network bits, value), sorted by network, each network once.
    networks: Vec<(u128, V)>,
}

impl<V: Copy> PrefixTable<V> {
    /// `merge` picks the value when the same network is listed twice.
    fn new(rules: impl IntoIterator<Item = (Cidr, V)>, merge: impl Fn(V, V) -> V) -> Self {
        let mut by_key: BTreeMap<Key, V> = BTreeMap::new();
        for (cidr, value) in rules {
            let merged = match by_key.get(&cidr.key) {
                Some(&old) => merge(old, value),
                None => value,
            };
            by_key.insert(cidr.key, merged);
        }
        let mut table = PrefixTable {
            v4: Vec::new(),
            v6: Vec::new(),
        };
        // BTreeMap order: family, then network, then prefix length.
        let mut levels: BTreeMap<(Family, u8), Vec<(u128, V)>> = BTreeMap::new();
        for (key, value) in by_key {
            let level = levels.entry((key.family, key.prefix_len)).or_default();
            level.push((key.bits, value));
        }
        // Longest prefix first, so the first hit is the longest match.
        for ((family, prefix_len), mut networks) in levels.into_iter().rev() {
            networks.sort_unstable_by_key(|&(bits, _)| bits);
            let level = Level {
                prefix_len,
                networks,
            };
            match family {
                Family::V4 => table.v4.push(level),
                Family::V6 => table.v6.push(level),
            }
        }
        table
    }

    /// The value of the longest network containing `ip`.
    fn longest_match(&self, ip: IpAddr) -> Option<V> {
        let (family, bits) = family_and_bits(ip);
        let levels = match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        };
        levels.iter().find_map(|level| {
            let network = bits & mask(level.prefix_len);
            let found = level.networks.binary_search_by_key(&network, |&(n, _)| n);
            found
                .ok()
                .and_then(|i| level.networks.get(i))
                .map(|&(_, v)| v)
        })
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Verdict {
    #[default]
    Allow,
    Deny,
}

/// Client access control from `--allow` and `--deny` networks.
///
/// The most specific rule decides: of the networks containing the client, the one with the
/// longest prefix wins, so `--allow 10.0.0.0/8 --deny 10.1.0.0/16` admits 10.2.3.4 but not
/// 10.1.2.3, and `--deny 10.0.0.0/8 --allow 10.1.0.0/16` the reverse. The same network in both
/// lists is denied. A client no rule matches is admitted when the allow list is empty and
/// refused otherwise: `--allow X` alone means "only X", `--deny Y` alone means "all but Y".
#[derive(Clone, Debug, Default)]
pub struct AccessList {
    rules: PrefixTable<Verdict>,
    /// For clients no rule matches.
    default: Verdict,
}

impl AccessList {
    pub fn new(allow: &[Cidr], deny: &[Cidr]) -> AccessList {
        let rules = allow
            .iter()
            .map(|&cidr| (cidr, Verdict::Allow))
            .chain(deny.iter().map(|&cidr| (cidr, Verdict::Deny)));
        let deny_wins = |a, b| {
            if a == Verdict::Deny || b == Verdict::Deny {
                Verdict::Deny
            } else {
                Verdict::Allow
            }
        };
        AccessList {
            rules: PrefixTable::new(rules, deny_wins),
            default: if allow.is_empty() {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
        }
    }

    /// Whether a client at `ip` may connect.
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.rules.longest_match(ip).unwrap_or(self.default) == Verdict::Allow
    }

    /// No rules: every client is admitted, and the lookup can be skipped.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// The peers allowed to send a PROXY header (`--trusted-proxy`): a header from anyone else must
/// not be believed, or any client could claim any address.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    networks: PrefixTable<()>,
}

impl TrustedProxies {
    pub fn new(networks: &[Cidr]) -> TrustedProxies {
        let networks = networks.iter().map(|&cidr| (cidr, ()));
        TrustedProxies {
            networks: PrefixTable::new(networks, |_, _| ()),
        }
    }

    /// Whether `ip` is in any of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.networks.longest_match(ip).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn cidrs(texts: &[&str]) -> Vec<Cidr> {
        texts.iter().map(|t| cidr(t)).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    // ---- Cidr ----

    #[test]
    fn parses_networks_and_bare_addresses() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(cidr("2001:db8::7").to_string(), "2001:db8::7/128");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("::/0").to_string(), "::/0");
        assert_eq!(cidr("10.0.0.0/008").prefix_len(), 8);
    }

    #[test]
    fn host_bits_are_cleared() {
        assert_eq!(cidr("10.1.2.3/8"), cidr("10.0.0.0/8"));
        assert_eq!(cidr("10.1.2.3/8").network(), ip("10.0.0.0"));
        assert_eq!(cidr("2001:db8:ffff::1/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("255.255.255.255/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("10.0.0.1/31").to_string(), "10.0.0.0/31");
    }

    #[test]
    fn mapped_networks_become_ipv4() {
        assert_eq!(cidr("::ffff:10.0.0.0/104"), cidr("10.0.0.0/8"));
        assert_eq!(cidr("::ffff:192.0.2.1"), cidr("192.0.2.1/32"));
        assert_eq!(cidr("::ffff:0:0/96"), cidr("0.0.0.0/0"));
        // Shorter than /96 it is an IPv6 network that happens to start in the mapped range.
        assert_eq!(cidr("::ffff:10.0.0.0/64").to_string(), "::/64");
        assert_eq!(cidr("::ffff:10.0.0.0/95").to_string(), "::fffe:0:0/95");
    }

    #[test]
    fn rejects_bad_networks_with_one_line_messages() {
        let bad = [
            (
                "10.0.0.0/33",
                "prefix length 33 must be a number from 0 to 32",
            ),
            (
                "2001:db8::/129",
                "prefix length 129 must be a number from 0 to 128",
            ),
            ("10.0.0.0/-1", "must be a number from 0 to 32"),
            ("10.0.0.0/+8", "must be a number from 0 to 32"),
            ("10.0.0.0/", "must be a number from 0 to 32"),
            ("10.0.0.0/8/8", "must be a number from 0 to 32"),
            ("10.0.0.0/1000", "must be a number from 0 to 32"),
            ("10.0.0.0/ 8", "must be a number from 0 to 32"),
            ("/8", "is not an IP network"),
            ("", "is not an IP network"),
            ("10.0.0/8", "is not an IP network"),
            ("example.com/8", "is not an IP network"),
            ("fe80::1%eth0/64", "is not an IP network"),
            (" 10.0.0.0/8", "is not an IP network"),
        ];
        for (text, expected) in bad {
            let message = text.parse::<Cidr>().unwrap_err().to_string();
            assert!(message.contains(expected), "{text}: {message}");
            assert!(!message.contains('\n'), "{text}: {message}");
        }
        assert!(Cidr::new(ip("10.0.0.0"), 33).is_err());
        assert!(Cidr::new(ip("::"), 129).is_err());
    }

    #[test]
    fn contains_at_the_edges() {
        assert!(cidr("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("::/0").contains(ip("ffff::1")));
        assert!(!cidr("::/0").contains(ip("10.0.0.1")));
        assert!(cidr("192.0.2.7/32").contains(ip("192.0.2.7")));
        assert!(!cidr("192.0.2.7/32").contains(ip("192.0.2.6")));
        assert!(cidr("2001:db8::7/128").contains(ip("2001:db8::7")));
        assert!(!cidr("2001:db8::7/128").contains(ip("2001:db8::6")));
        assert!(cidr("10.0.0.0/8").contains(ip("10.255.255.255")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.0")));
    }

    #[test]
    fn mapped_clients_match_ipv4_networks_and_compatible_ones_do_not() {
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
        assert!(cidr("0.0.0.0/0").contains(ip("::ffff:1.2.3.4")));
        assert!(!cidr("::/0").contains(ip("::ffff:1.2.3.4")));
        // ::1 is IPv6 loopback, not the IPv4 address 0.0.0.1 ("IPv4-compatible" is obsolete).
        assert!(!cidr("0.0.0.0/8").contains(ip("::1")));
        assert!(cidr("::1").contains(ip("::1")));
    }

    // ---- AccessList ----

    #[test]
    fn no_rules_admits_everyone() {
        let acl = AccessList::new(&[], &[]);
        assert!(acl.is_empty());
        assert!(acl.permits(ip("1.2.3.4")));
        assert!(acl.permits(ip("::1")));
        assert!(AccessList::default().permits(ip("1.2.3.4")));
    }

    #[test]
    fn an_allow_list_admits_only_its_networks() {
        let acl = AccessList::new(&cidrs(&["10.0.0.0/8", "2001:db8::/32"]), &[]);
        assert!(!acl.is_empty());
        assert!(acl.permits(ip("10.9.9.9")));
        assert!(acl.permits(ip("::ffff:10.9.9.9")));
        assert!(acl.permits(ip("2001:db8::1")));
        assert!(!acl.permits(ip("11.0.0.1")));
        assert!(!acl.permits(ip("2001:db9::1")));
    }

    #[test]
    fn a_deny_list_alone_admits_everyone_else() {
        let acl = AccessList::new(&[], &cidrs(&["192.0.2.0/24", "::1"]));
        assert!(!acl.permits(ip("192.0.2.200")));
        assert!(!acl.permits(ip("::ffff:192.0.2.200")));
        assert!(!acl.permits(ip("::1")));
        assert!(acl.permits(ip("192.0.3.1")));
        assert!(acl.permits(ip("::2")));
    }

    #[test]
    fn the_longest_prefix_wins() {
        let allow = cidrs(&["10.0.0.0/8", "10.1.2.0/24"]);
        let deny = cidrs(&["10.1.0.0/16", "10.1.2.3"]);
        let acl = AccessList::new(&allow, &deny);
        assert!(acl.permits(ip("10.2.0.1"))); // /8 allow
        assert!(!acl.permits(ip("10.1.0.1"))); // /16 deny
        assert!(acl.permits(ip("10.1.2.4"))); // /24 allow
        assert!(!acl.permits(ip("10.1.2.3"))); // /32 deny
        assert!(!acl.permits(ip("11.0.0.1"))); // no match, allow list not empty

        let acl = AccessList::new(&cidrs(&["10.1.0.0/16"]), &cidrs(&["10.0.0.0/8"]));
        assert!(acl.permits(ip("10.1.5.5")));
        assert!(!acl.permits(ip("10.2.5.5")));
    }

    #[test]
    fn the_same_network_in_both_lists_is_denied() {
        let acl = AccessList::new(&cidrs(&["10.0.0.0/8"]), &cidrs(&["10.9.9.9/8"]));
        assert!(!acl.permits(ip("10.0.0.1")));
        // Written once as IPv4 and once mapped, it is still the same network.
        let acl = AccessList::new(&cidrs(&["::ffff:10.0.0.0/104"]), &cidrs(&["10.0.0.0/8"]));
        assert!(!acl.permits(ip("10.0.0.1")));
        let acl = AccessList::new(&cidrs(&["10.0.0.0/8", "10.0.0.0/8"]), &[]);
        assert!(acl.permits(ip("10.0.0.1")));
    }

    #[test]
    fn slash_zero_rules_per_family() {
        let acl = AccessList::new(&cidrs(&["0.0.0.0/0"]), &cidrs(&["::/0"]));
        assert!(acl.permits(ip("203.0.113.1")));
        assert!(acl.permits(ip("::ffff:203.0.113.1")));
        assert!(!acl.permits(ip("2001:db8::1")));
        let acl = AccessList::new(&cidrs(&["2001:db8::1"]), &cidrs(&["::/0"]));
        assert!(acl.permits(ip("2001:db8::1")));
        assert!(!acl.permits(ip("2001:db8::2")));
        assert!(!acl.permits(ip("10.0.0.1"))); // the allow list is not empty
    }

    /// Deterministic pseudo-random numbers (xorshift64), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// The rules written the slow, obvious way, to check the table against.
    fn reference_permits(allow: &[Cidr], deny: &[Cidr], ip: IpAddr) -> bool {
        let longest = |rules: &[Cidr]| {
            rules
                .iter()
                .filter(|c| c.contains(ip))
                .map(|c| i32::from(c.prefix_len()))
                .max()
                .unwrap_or(-1)
        };
        let (allowed, denied) = (longest(allow), longest(deny));
        match (allowed, denied) {
            (-1, -1) => allow.is_empty(),
            _ => allowed > denied,
        }
    }

    #[test]
    fn hundreds_of_random_rules_agree_with_a_linear_scan() {
        // Addresses drawn from small pools (IPv4, IPv6, IPv4-mapped) so that rules overlap and
        // nest.
        fn address(rng: &mut Rng) -> IpAddr {
            let r = rng.next();
            let v4 = Ipv4Addr::from(0x0a00_0000 | ((r >> 8) as u32 & 0x0003_0f0f));
            match r % 3 {
                0 => v4.into(),
                1 => Ipv6Addr::from((0x2001_0db8_u128 << 96) | u128::from((r >> 8) & 0x3_0f0f))
                    .into(),
                _ => v4.to_ipv6_mapped().into(),
            }
        }
        fn random_cidr(rng: &mut Rng) -> Cidr {
            let ip = address(rng);
            let max = if ip.is_ipv4() { 33 } else { 129 };
            Cidr::new(ip, (rng.next() % max) as u8).unwrap()
        }
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for round in 0..20 {
            let allow: Vec<Cidr> = (0..round * 10).map(|_| random_cidr(&mut rng)).collect();
            let deny: Vec<Cidr> = (0..200).map(|_| random_cidr(&mut rng)).collect();
            let acl = AccessList::new(&allow, &deny);
            for _ in 0..500 {
                let client = address(&mut rng);
                let expected = reference_permits(&allow, &deny, client);
                assert_eq!(acl.permits(client), expected, "{client} round {round}");
            }
        }
    }

    // ---- TrustedProxies ----

    #[test]
    fn trusted_proxies_is_plain_membership() {
        let trusted = TrustedProxies::new(&cidrs(&["10.0.0.0/8", "10.1.0.0/16", "fd00::/8"]));
        assert!(!trusted.is_empty());
        assert!(trusted.contains(ip("10.1.2.3")));
        assert!(trusted.contains(ip("10.200.0.1")));
        assert!(trusted.contains(ip("::ffff:10.200.0.1")));
        assert!(trusted.contains(ip("fd12::1")));
        assert!(!trusted.contains(ip("192.0.2.1")));
        assert!(!trusted.contains(ip("fe80::1")));

        let nobody = TrustedProxies::new(&[]);
        assert!(nobody.is_empty());
        assert!(!nobody.contains(ip("10.0.0.1")));
        let everybody = TrustedProxies::new(&cidrs(&["0.0.0.0/0", "::/0"]));
        assert!(everybody.contains(ip("10.0.0.1")));
        assert!(everybody.contains(ip("::1")));
    }
}
