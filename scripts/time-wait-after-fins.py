#!/usr/bin/env python3
"""Where a proxy's backend connection stands once both FINs are exchanged (client closed first).

The proxy forwards the client's FIN (shutdown SHUT_WR), the backend answers and closes, the proxy
reads the backend's EOF: that is the moment a proxy could close its backend socket with a RST
(SO_LINGER 0) "to leave the TIME_WAIT to the backend". This script shows that by then the kernel
has already moved the connection to TIME_WAIT (the socket itself is in TCP_CLOSE), so a RST close
changes nothing. Loopback only; prints what it sees and exits non-zero if that ever changes.
"""
import socket
import struct
import subprocess
import sys
import time

TCP_CLOSE = 7


def time_wait_entries(local_port, remote_port):
    out = subprocess.run(
        ["ss", "-tanH", "state", "time-wait",
         f"( sport = :{local_port} and dport = :{remote_port} )"],
        capture_output=True, text=True, check=True,
    ).stdout
    return [line.split()[-2:] for line in out.strip().splitlines()]


def main():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    proxy = socket.create_connection(listener.getsockname())
    backend, _ = listener.accept()
    proxy.sendall(b"request")
    assert backend.recv(16) == b"request"
    proxy.shutdown(socket.SHUT_WR)           # the client's FIN, forwarded
    assert backend.recv(1) == b""
    backend.sendall(b"reply after the client's FIN")
    backend.close()                          # the backend's FIN
    got = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        chunk = proxy.recv(64)
        if not chunk:
            break                            # the backend's EOF
        got += chunk
    assert got == b"reply after the client's FIN", got
    state = proxy.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    port = proxy.getsockname()[1]
    backend_port = listener.getsockname()[1]
    before = time_wait_entries(port, backend_port)
    proxy.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    proxy.close()
    after = time_wait_entries(port, backend_port)
    print(f"proxy's backend socket after both FINs: tcpi_state {state} (7 = TCP_CLOSE)")
    print(f"TIME_WAIT for 127.0.0.1:{port} before the close: {before}")
    print(f"after SO_LINGER 0 + close:                     {after}")
    if state != TCP_CLOSE or not before or before != after:
        print("the kernel behaves differently here: re-check docs/benchmarks.md", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
