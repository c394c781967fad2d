#!/bin/sh
# Kernel settings for a Linux router in front of Ringway hosts (run once at boot, as root, before
# BIRD with bird-router.conf):
#
# 1. Forwarding, and ECMP hashing on layer 4 (addresses and ports): with the default layer-3
#    hash every connection of one client lands on the same host, so a few big clients make an
#    uneven fleet.
# 2. Flow pinning: a connection stays on the host that took its first packet, even when the
#    multipath route changes. Without it, withdrawing one host's route (a planned removal) or
#    adding one moves live connections of that host (or of the others) to a host that has no
#    socket for them, which answers with a reset. With it, a withdrawn host keeps its live
#    connections until they end: that is what lets Ringway's --drain-delay and drain finish
#    them. conntrack marks the connection with its host (by the next hop the route chose) and
#    later packets are routed by that mark through a table with only that host in it.
#    Routers without this (stateless ECMP in hardware) move the live flows of a withdrawn host;
#    see docs/scale-out.md.
#
# Settings (environment): VIP (default 192.0.2.10) and HOSTS, the next hops of the Ringway
# hosts (default "198.51.100.2 198.51.100.6", as in bird-router.conf). A host's mark and table
# are its position in HOSTS (1, 2, ...), plus 100 for the table; keep the order when adding.
# tests/fleet_netns.rs runs this script inside its router namespace.
set -eu
VIP=${VIP:-192.0.2.10}
HOSTS=${HOSTS:-198.51.100.2 198.51.100.6}

sysctl -q -w net.ipv4.ip_forward=1
sysctl -q -w net.ipv4.fib_multipath_hash_policy=1
# Replies of pinned flows come back from a host the multipath route may no longer list.
sysctl -q -w net.ipv4.conf.all.rp_filter=0
sysctl -q -w net.ipv4.conf.default.rp_filter=0

elements=""
mark=1
for host in $HOSTS; do
    ip rule del fwmark "$mark" table $((100 + mark)) 2>/dev/null || true
    ip rule add fwmark "$mark" table $((100 + mark))
    ip route replace "$VIP" via "$host" table $((100 + mark))
    elements="$elements${elements:+, }$host : $mark"
    mark=$((mark + 1))
done

nft -f - <<NFT
table ip ringway_pin
delete table ip ringway_pin
table ip ringway_pin {
    # Packets of a pinned connection take their host's table.
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        ip daddr $VIP ct mark != 0 meta mark set ct mark
    }
    # The first packet went where the multipath route sent it: remember that host.
    chain postrouting {
        type filter hook postrouting priority mangle; policy accept;
        ip daddr $VIP ct mark 0 ct mark set rt ip nexthop map { $elements }
    }
}
NFT
