//! Stable hashes. Everything that decides placement goes through XXH3 over explicit bytes,
//! never through Rust's `Hash` trait (whose output may change between compiler releases and
//! would make two hosts, or two versions, disagree about where a client goes).

use std::io::Write;
use std::net::SocketAddr;

use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64_with_seed};

/// Which parts of the client address make up the flow key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// Client IP only: every connection from one client lands on the same backend.
    SrcIp,
    /// Client IP and port: one client's connections spread over the backends.
    SrcIpPort,
}

/// Stable hash of the flow key: the client IP as 16 bytes (IPv4 as IPv4-mapped IPv6, so a
/// client seen over IPv4 and over a dual-stack socket hashes the same), then for
/// [`HashKey::SrcIpPort`] the port as 2 big-endian bytes; XXH3-64 with `seed`.
/// IPv6 flow info and scope id are not part of the key.
pub fn flow_key_hash(client: &SocketAddr, key: HashKey, seed: u64) -> u64 {
    let ip = match client {
        SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped(),
        SocketAddr::V6(v6) => *v6.ip(),
    };
    let mut bytes = [0u8; 18];
    bytes[..16].copy_from_slice(&ip.octets());
    let len = match key {
        HashKey::SrcIp => 16,
        HashKey::SrcIpPort => {
            bytes[16..].copy_from_slice(&client.port().to_be_bytes());
            18
        }
    };
    xxh3_64_with_seed(&bytes[..len], seed)
}

/// Writes ring point labels "<name>#<k>" (k in decimal ASCII) without allocating per point.
pub(super) struct PointLabeler {
    label: Vec<u8>,
    prefix_len: usize,
}

impl PointLabeler {
    pub(super) fn new(name: &str) -> Self {
        let mut label = Vec::with_capacity(name.len() + 12);
        label.extend_from_slice(name.as_bytes());
        label.push(b'#');
        let prefix_len = label.len();
        PointLabeler { label, prefix_len }
    }

    /// Position of the backend's `k`-th virtual node: XXH3-64 of "<name>#<k>" with `seed`.
    pub(super) fn point(&mut self, k: u64, seed: u64) -> u64 {
        self.label.truncate(self.prefix_len);
        // Writing into a Vec cannot fail.
        let _ = write!(self.label, "{k}");
        xxh3_64_with_seed(&self.label, seed)
    }
}

/// The two numbers that define a backend's Maglev permutation: the low and high halves of
/// XXH3-128 of the name with `seed` (offset source, skip source).
pub(super) fn maglev_permutation_seeds(name: &str, seed: u64) -> (u64, u64) {
    let h = xxh3_128_with_seed(name.as_bytes(), seed);
    (h as u64, (h >> 64) as u64)
}

/// Maglev re-probe: a fresh, deterministic hash of the key for `attempt` (1, 2, ...), so the
/// keys of an unusable backend scatter over the others instead of piling onto one neighbour.
pub(super) fn reprobe_hash(key_hash: u64, attempt: u64, seed: u64) -> u64 {
    xxh3_64_with_seed(&key_hash.to_le_bytes(), seed.wrapping_add(attempt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    /// Golden vectors: computed once and pasted. If this fails, the flow key hash changed and
    /// every deployed client would move to a different backend; that needs a deliberate decision.
    #[test]
    fn flow_key_hash_golden_vectors() {
        let cases: [(&str, HashKey, u64, u64); 8] = [
            ("192.0.2.1:40000", HashKey::SrcIp, 0, GOLDEN[0]),
            ("192.0.2.1:40000", HashKey::SrcIpPort, 0, GOLDEN[1]),
            ("192.0.2.1:40001", HashKey::SrcIpPort, 0, GOLDEN[2]),
            ("192.0.2.1:40000", HashKey::SrcIp, 42, GOLDEN[3]),
            ("10.1.2.3:443", HashKey::SrcIpPort, 0x5eed, GOLDEN[4]),
            ("[2001:db8::1]:40000", HashKey::SrcIp, 0, GOLDEN[5]),
            ("[2001:db8::1]:40000", HashKey::SrcIpPort, 0, GOLDEN[6]),
            ("0.0.0.0:0", HashKey::SrcIpPort, u64::MAX, GOLDEN[7]),
        ];
        for (text, key, seed, expected) in cases {
            let got = flow_key_hash(&addr(text), key, seed);
            assert_eq!(
                got, expected,
                "flow_key_hash({text}, {key:?}, {seed:#x}) = {got:#018x}"
            );
        }
    }

    const GOLDEN: [u64; 8] = [
        0x9fe2_8067_5064_061a,
        0x4f1c_e503_7c64_a9d0,
        0xc607_1376_44df_2a58,
        0x9d55_7270_4d08_1191,
        0x8ed3_9a07_f88e_6ec7,
        0x275c_8fa5_8c2d_19a0,
        0x4ac4_d637_1a00_4e5a,
        0x895a_8d0b_02a1_0ce8,
    ];

    #[test]
    fn ipv4_hashes_like_its_mapped_ipv6_form() {
        let v4 = SocketAddr::new(Ipv4Addr::new(198, 51, 100, 7).into(), 5000);
        let mapped = SocketAddr::V6(SocketAddrV6::new(
            Ipv4Addr::new(198, 51, 100, 7).to_ipv6_mapped(),
            5000,
            7,
            3,
        ));
        for key in [HashKey::SrcIp, HashKey::SrcIpPort] {
            assert_eq!(flow_key_hash(&v4, key, 9), flow_key_hash(&mapped, key, 9));
        }
    }

    #[test]
    fn port_matters_only_for_src_ip_port() {
        let a = addr("203.0.113.5:1000");
        let b = addr("203.0.113.5:1001");
        assert_eq!(
            flow_key_hash(&a, HashKey::SrcIp, 1),
            flow_key_hash(&b, HashKey::SrcIp, 1)
        );
        assert_ne!(
            flow_key_hash(&a, HashKey::SrcIpPort, 1),
            flow_key_hash(&b, HashKey::SrcIpPort, 1)
        );
    }

    #[test]
    fn seed_changes_the_hash() {
        let a = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 80);
        assert_ne!(
            flow_key_hash(&a, HashKey::SrcIp, 1),
            flow_key_hash(&a, HashKey::SrcIp, 2)
        );
    }

    #[test]
    fn point_labels_are_name_hash_k() {
        let mut labeler = PointLabeler::new("10.0.0.1:80");
        assert_eq!(
            labeler.point(17, 5),
            xxh3_64_with_seed(b"10.0.0.1:80#17", 5)
        );
        assert_eq!(labeler.point(3, 5), xxh3_64_with_seed(b"10.0.0.1:80#3", 5));
    }
}
