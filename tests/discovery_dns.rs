//! The DNS client of `--backend-dns` (ringway::discovery::dns) against a real nameserver:
//! dnsmasq, started by each test on a free loopback port, answering from a hosts file the test
//! writes. Changing the records is done the way an operator would: rewrite the file and send
//! dnsmasq SIGHUP, which makes it re-read the file and drop its cache (tests/common/dnsmasq.rs).
//!
//! Needs the dnsmasq binary (Debian package dnsmasq-base, which installs no system service).
//! Without it these tests fail, on purpose: a skipped test would hide that DNS discovery is
//! untested.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::dnsmasq::{free_udp_port, Dnsmasq};
use ringway::discovery::dns::{backends_from_addresses, resolve, DnsError, DnsTarget};

fn ips(texts: &[&str]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = texts.iter().map(|t| t.parse().unwrap()).collect();
    ips.sort();
    ips
}

#[test]
fn answers_follow_the_hosts_file_across_sighup() {
    let dns = Dnsmasq::start(
        "10.1.0.2 web.test\n10.1.0.1 web.test\nfd00::1 web.test\n",
        &[],
    );
    let first = ips(&["10.1.0.1", "10.1.0.2", "fd00::1"]);
    assert_eq!(dns.resolve("web.test").unwrap(), first);
    assert_eq!(
        dns.resolve("WEB.Test.").unwrap(),
        first,
        "case and a trailing dot"
    );

    let target: DnsTarget = "web.test:8080".parse().unwrap();
    let names: Vec<String> = backends_from_addresses(&target, &first)
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["10.1.0.1:8080", "10.1.0.2:8080", "[fd00::1]:8080"]);

    // One address gone, one new, the IPv6 one replaced.
    dns.set_hosts("10.1.0.2 web.test\n10.1.0.3 web.test\nfd00::2 web.test\n");
    dns.wait_for_answer("web.test", &ips(&["10.1.0.2", "10.1.0.3", "fd00::2"]));

    // IPv4 only: the AAAA query gets an empty answer, not an error.
    dns.set_hosts("10.1.0.9 web.test\n");
    dns.wait_for_answer("web.test", &ips(&["10.1.0.9"]));
}

#[test]
fn errors_and_aliases() {
    let dns = Dnsmasq::start(
        "10.1.0.1 web.test\nfd00::1 web.test\n",
        &[
            "--cname=alias.test,web.test",
            "--cname=alias2.test,alias.test",
            "--txt-record=textonly.test,hello",
        ],
    );
    let web = ips(&["10.1.0.1", "fd00::1"]);
    assert_eq!(dns.resolve("alias.test").unwrap(), web, "through a CNAME");
    assert_eq!(dns.resolve("alias2.test").unwrap(), web, "through two");

    let error = dns.resolve("missing.test").unwrap_err();
    assert!(matches!(error, DnsError::NxDomain), "{error}");
    assert_eq!(error.to_string(), "the name does not exist (NXDOMAIN)");

    let error = dns.resolve("textonly.test").unwrap_err();
    assert!(matches!(error, DnsError::NoAddresses), "{error}");

    // Outside the local domain with no upstream servers: dnsmasq refuses.
    let error = dns.resolve("example.com").unwrap_err();
    assert!(
        matches!(error, DnsError::Refused | DnsError::ServFail),
        "{error}"
    );
}

#[test]
fn a_large_answer_is_fetched_over_tcp() {
    // 300 A records (about 4.8 KB) do not fit in the 1232-byte EDNS payload we offer, so the
    // UDP answer comes back truncated and the client must ask again over TCP.
    let hosts: String = (0..300)
        .map(|i| format!("10.2.{}.{} big.test\n", i / 200, i % 200 + 1))
        .collect();
    let dns = Dnsmasq::start(&hosts, &[]);
    let answer = dns.resolve("big.test").unwrap();
    assert_eq!(answer.len(), 300);
    assert!(
        answer.windows(2).all(|w| w[0] < w[1]),
        "sorted, no duplicates"
    );
}

#[test]
fn nothing_listening_is_an_io_error() {
    let port = free_udp_port();
    let nameserver = SocketAddr::from(([127, 0, 0, 1], port));
    let error = resolve("web.test", nameserver, Duration::from_secs(2)).unwrap_err();
    assert!(
        matches!(error, DnsError::Io { .. }),
        "ICMP port unreachable should show as an error at once: {error}"
    );
}
