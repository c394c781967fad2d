//! `--backend-dns-srv`: SRV records as Kubernetes headless services and Consul publish them,
//! served by the real dnsmasq (`--srv-host=NAME,TARGET,PORT,PRIORITY,WEIGHT`; the targets'
//! addresses come from its hosts file). First Ringway's SRV lookup on its own, then the proxy
//! following a changed SRV answer and keeping its backends through a DNS failure.
//!
//! dnsmasq reads `--srv-host` only from its command line, so a change of SRV records is a
//! restart of dnsmasq on the same port (tests/common/dnsmasq.rs).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::dnsmasq::Dnsmasq;
use common::*;
use ringway::discovery::dns::DnsError;
use ringway::discovery::dns_srv::{backends_from_srv, resolve_srv, SrvBackend};

const SRV: &str = "_http._tcp.web.test";
/// How long the proxy may take to act on a DNS change (refresh is 300ms).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

fn lookup(dns: &Dnsmasq, name: &str) -> Result<Vec<SrvBackend>, DnsError> {
    resolve_srv(&name.parse().unwrap(), dns.addr, Duration::from_secs(2))
}

#[test]
fn srv_records_give_addresses_ports_weights_and_backups() {
    let dns = Dnsmasq::start(
        "10.1.0.1 a.test\n10.1.0.2 b.test\nfd00::2 b.test\n10.1.0.3 c.test\n",
        &[
            // name, target, port, priority, weight
            &format!("--srv-host={SRV},a.test,8080,0,5"),
            &format!("--srv-host={SRV},b.test,8081,0,1"),
            &format!("--srv-host={SRV},c.test,9000,10,1"),
            // dnsmasq sends no additional records for a target that is an alias: Ringway asks
            // for its addresses itself (and follows the CNAME).
            &format!("--srv-host={SRV},alias.test,8082,0,2"),
            "--cname=alias.test,a.test",
            // A target that does not exist (a pod already gone) serves nothing.
            &format!("--srv-host={SRV},gone.test,9001,0,1"),
            "--host-record=plain.test,10.1.0.9",
        ],
    );
    let records = lookup(&dns, SRV).unwrap_or_else(|e| panic!("{e}\n{}", dns.log()));
    let backends = backends_from_srv(&records);
    let got: Vec<(&str, u32, bool)> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.weight, b.backup))
        .collect();
    assert_eq!(
        got,
        [
            ("10.1.0.1:8080", 5, false),
            ("10.1.0.1:8082", 2, false),
            ("10.1.0.2:8081", 1, false),
            ("10.1.0.3:9000", 1, true),
            ("[fd00::2]:8081", 1, false),
        ],
        "{records:?}"
    );
    assert_eq!(lookup(&dns, "_HTTP._tcp.WEB.test.").unwrap(), records);

    // No SRV records: an error (the pool is kept), never an empty list.
    let error = lookup(&dns, "_other._tcp.web.test").unwrap_err();
    assert!(
        matches!(error, DnsError::NxDomain | DnsError::NoSrvTargets),
        "{error}"
    );
    let error = lookup(&dns, "plain.test").unwrap_err();
    assert!(matches!(error, DnsError::NoSrvTargets), "{error}");
    assert_eq!(
        error.to_string(),
        "no SRV record of the name leads to an address"
    );
}

#[test]
fn the_proxy_follows_a_changed_srv_answer_and_keeps_it_through_a_dns_failure() {
    let two = Backend::start_on(backend_kind("two"), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    let three = Backend::start_on(
        backend_kind("three"),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
    );
    let srv_to = |target: &str, backend: &Backend| {
        format!("--srv-host={SRV},{target},{},0,1", backend.addr.port())
    };
    let hosts = "127.0.0.2 two.test\n127.0.0.3 three.test\n";
    let mut dns = Dnsmasq::start(hosts, &[&srv_to("two.test", &two)]);
    let proxy = Proxy::start(&[
        "--listen",
        "127.0.0.1:0",
        "--backend-dns-srv",
        SRV,
        "--dns-server",
        &dns.addr.to_string(),
        "--dns-refresh",
        "300ms",
    ]);
    assert_eq!(served_by(&proxy, client_ip(1)), "two");

    // Another target on another port: the port comes from the record.
    dns.restart(&[&srv_to("three.test", &three)]);
    let mut last = String::new();
    let moved = wait_until(CHANGE_TIMEOUT, || {
        last = served_by(&proxy, client_ip(1));
        last == "three"
    });
    assert!(
        moved,
        "new flows still reach {last:?} {CHANGE_TIMEOUT:?} after the SRV change\n{}\n{}",
        proxy.stderr_tail(),
        dns.log()
    );
    let changed = format!("added: [127.0.0.3:{}]", three.addr.port());
    assert!(proxy.stderr().contains(&changed), "{}", proxy.stderr_tail());

    // The records disappear: the proxy says so and keeps serving with the last answer.
    dns.restart(&[]);
    let kept = wait_until(CHANGE_TIMEOUT, || {
        proxy
            .stderr()
            .contains(&format!("--backend-dns-srv {SRV}: "))
            && proxy.stderr().contains("keeping the last answer")
    });
    assert!(
        kept,
        "no warning about the failed lookup\n{}",
        proxy.stderr_tail()
    );
    for n in 10..20 {
        assert_eq!(served_by(&proxy, client_ip(n)), "three");
    }
}

fn backend_kind(name: &str) -> common::Kind {
    common::Kind::Hello(name.to_string())
}
