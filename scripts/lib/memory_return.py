#!/usr/bin/env python3
"""Stalled readers, then none: how much memory does the proxy hold, and how fast does it return?

Starts a backend that streams bytes without end, the proxy in front of it (one worker, plus any
extra flags), opens READERS clients with a small receive buffer that never read, waits for the
streams to back up, samples RSS, closes the clients and samples RSS every 2 s for 30 s.
Usage: memory_return.py PROXY_BIN READERS [extra ringway flags...]
"""
import socket, subprocess, sys, threading, time

proxy_bin, readers, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

backend = socket.socket()
backend.bind(("127.0.0.1", 0))
backend.listen(1024)
backend_port = backend.getsockname()[1]


def stream(conn):
    chunk = b"y" * 65536
    try:
        while True:
            conn.sendall(chunk)
    except OSError:
        pass


def accept():
    while True:
        conn, _ = backend.accept()
        threading.Thread(target=stream, args=(conn,), daemon=True).start()


threading.Thread(target=accept, daemon=True).start()
probe = socket.socket()
probe.bind(("127.0.0.1", 0))
port = probe.getsockname()[1]
probe.close()
proxy = subprocess.Popen(
    [proxy_bin, "--listen", "127.0.0.1:%d" % port, "--workers", "1", *extra,
     "--backend", "127.0.0.1:%d" % backend_port], stderr=subprocess.DEVNULL)


def rss_mib():
    with open("/proc/%d/status" % proxy.pid) as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024


try:
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                sys.exit("the proxy did not come up")
            time.sleep(0.05)
    print("fresh: %d MiB" % rss_mib())
    clients = []
    for _ in range(readers):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(("127.0.0.1", port))
        clients.append(c)
    # Backed up: RSS stops growing between two samples a second apart.
    previous = -1
    for _ in range(30):
        time.sleep(1)
        now = rss_mib()
        if now == previous:
            break
        previous = now
    print("%d stalled readers: %d MiB" % (readers, rss_mib()))
    for c in clients:
        c.close()
    samples = []
    for i in range(15):
        time.sleep(2)
        samples.append("%ds:%d" % (2 * (i + 1), rss_mib()))
    print("after they closed (MiB): " + " ".join(samples))
finally:
    proxy.terminate()
    proxy.wait()
