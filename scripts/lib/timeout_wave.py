#!/usr/bin/env python3
"""Many idle flows timing out at once, next to one busy flow: how long does the busy flow stall?

Opens FLOWS idle connections through the proxy (with a short --idle-timeout), keeps one more
connection doing echo round trips back to back, and reports the slowest round trip while the
idle flows time out together, and how long the wave took to close them all.
Usage: timeout_wave.py PROXY_BIN ECHO_PORT [FLOWS]
"""
import os, resource, socket, subprocess, sys, time

proxy_bin, echo_port = sys.argv[1], int(sys.argv[2])
flows = int(sys.argv[3]) if len(sys.argv) > 3 else 9000
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

listen = ("127.0.0.1", 24800)
proxy = subprocess.Popen(
    [proxy_bin, "--listen", "%s:%d" % listen, "--workers", "1", "--idle-timeout", "4s",
     "--backend", "127.0.0.1:%d" % echo_port],
    stderr=subprocess.DEVNULL)
try:
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(listen, timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                sys.exit("proxy did not come up")
            time.sleep(0.05)
    busy = socket.create_connection(listen, timeout=5)
    busy.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    idle = []
    opened = time.time()
    for _ in range(flows):
        s = socket.create_connection(listen, timeout=5)
        s.sendall(b"x")          # make sure the flow is relaying (the echo comes back)
        idle.append(s)
    for s in idle:
        if s.recv(1) != b"x":
            sys.exit("an idle flow did not echo")
    setup = time.time() - opened
    # Round trips on the busy flow until every idle flow has been closed by the timeout.
    worst, trips, closed_at = 0.0, 0, None
    pending = set(range(flows))
    for s in idle:
        s.setblocking(False)
    end = time.time() + 30
    while time.time() < end and pending:
        t = time.perf_counter()
        busy.sendall(b"p" * 64)
        got = 0
        while got < 64:
            got += len(busy.recv(64 - got))
        rtt = time.perf_counter() - t
        trips += 1
        worst = max(worst, rtt)
        if trips % 50 == 0:
            for i in list(pending):
                try:
                    if idle[i].recv(1) == b"":
                        pending.discard(i)
                except BlockingIOError:
                    pass
                except OSError:
                    pending.discard(i)
            if not pending:
                closed_at = time.time()
    print("flows=%d setup=%.1fs round_trips=%d worst_round_trip_ms=%.1f closed_all=%s"
          % (flows, setup, trips, worst * 1000, "yes" if not pending else "no (%d left)" % len(pending)))
finally:
    proxy.terminate()
    proxy.wait()
