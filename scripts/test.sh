#!/usr/bin/env bash
# Runs the whole test suite: installs what the integration tests need on a Debian machine, then
# `cargo test --workspace`. Extra arguments go to cargo test.
#
# The integration tests use real peers and network namespaces, so they need:
#   iproute2      ip netns, ss (upgrade, --source and socket-option tests)
#   procps        sysctl
#   dnsmasq-base  a real DNS server for --backend-dns
#   nginx         a real PROXY protocol peer for --send-proxy
#   iperf3        real bulk transfers through the proxy (tests/real_peers.rs, and across an
#                 upgrade handover in tests/upgrade_handover.rs)
#   redis-server  a real request/response server (tests/real_peers.rs)
#   redis-tools   redis-benchmark and redis-cli against it
#   curl          a real TCP Fast Open client (tests/tcp_fastopen.rs)
#   chromium      a real browser renders the admin status page (tests/status.rs)
#   bird2         the BGP daemon of the ECMP fleet test (tests/fleet_netns.rs, deploy/bgp)
#   keepalived    the VRRP pair test (tests/fleet_netns.rs, deploy/keepalived)
#   nftables      flow pinning on the fleet test's router (deploy/bgp/router-setup.sh)
#                 (curl also makes the /ready checks of deploy/bgp and deploy/keepalived)
#   logrotate     the shipped deploy/logrotate/ringway run for real (tests/access_log_rotation.rs)
#   systemd       systemd-analyze verify on the packaged unit, systemd-sysusers in its postinst
#                 (tests/package.rs; installing it in a container starts nothing)
#   dpkg-dev      dpkg-shlibdeps, which cargo-deb uses for the package's Depends (tests/package.rs)
#   binutils      objcopy/strip, which cargo-deb uses to split the debug symbols (tests/package.rs)
# and root (network namespaces, setns). Nothing here talks to anything but loopback or
# namespaces the tests create themselves.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

need=()
for pkg in iproute2 procps dnsmasq-base nginx iperf3 redis-server redis-tools curl chromium \
    logrotate systemd dpkg-dev binutils; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# The fleet tests (tests/fleet_netns.rs): routing daemons and what deploy/ scripts call.
for pkg in bird2 keepalived nftables; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "installing test dependencies: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    # Keep package scripts from starting services (nginx would take port 80, redis-server 6379,
    # iperf3 5201, bird and keepalived would start on the host's own network): the tests start
    # their own private instances.
    added_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
        added_policy=1
    fi
    as_root apt-get install -y -qq "${need[@]}"
    if [ "$added_policy" = 1 ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
fi

if [ "$(id -u)" != 0 ]; then
    echo "note: the network-namespace tests need root; run this as root (or with sudo -E)" >&2
fi

cargo test --workspace "$@"
# Bulk directions relay through kernel pipes by default (--splice auto); run the relay tests
# once more on the buffered path so both stay tested.
echo "tests/relay.rs again with RINGWAY_SPLICE=off (the buffered path)"
RINGWAY_SPLICE=off exec cargo test --test relay "$@"
