#!/usr/bin/env python3
"""Hostile NBD clients that flood a server, for the memory and limit cases.

    nbdflood.py idle HOST PORT N HOLD
        Opens N TCP connections, each from its own loopback source address
        (127.1.x.y: all of 127/8 is loopback, so a per-address limit does
        not help the server), and sends nothing on them. Prints "opened N"
        once they are open, holds them HOLD seconds, then prints
        "closed-by-server K" (how many the server has closed) and exits.

    nbdflood.py write HOST PORT EXPORT READS WRITES SIZE
        Negotiates EXPORT, sends READS reads and then WRITES writes of SIZE
        bytes each, and never reads a reply: the replies to the reads fill
        the socket, so the server's workers are stuck sending them, and the
        writes pile up in the server unless it stops reading. Prints "sent
        MiB" lines as the requests go out, and runs until killed.
"""
import os
import resource
import select
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbdprobe  # noqa: E402

CMD_READ, CMD_WRITE = 0, 1


def out(*a):
    print(*a, flush=True)


def raise_nofile():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def idle(host, port, n, hold):
    raise_nofile()
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((f"127.1.{i // 250}.{i % 250 + 1}", 0))
        s.settimeout(10)
        s.connect((host, port))
        socks.append(s)
    out(f"opened {n}")
    time.sleep(hold)
    closed = 0
    for s in socks:
        # Closed by the server: readable, and the read gives EOF (after the
        # greeting it may have sent) or a reset.
        try:
            while select.select([s], [], [], 0)[0]:
                if not s.recv(65536, socket.MSG_DONTWAIT):
                    closed += 1
                    break
        except (ConnectionResetError, BlockingIOError):
            closed += 1
    out(f"closed-by-server {closed}")


def write(host, port, export, reads, writes, size):
    s = socket.create_connection((host, port))
    nbdprobe.handshake(s, export)
    out("negotiated")
    sent = 0
    data = os.urandom(1 << 20) * (size >> 20) + os.urandom(size % (1 << 20))
    for i in range(reads):
        nbdprobe.request(s, CMD_READ, 0, size, cookie=i)
    for i in range(writes):
        nbdprobe.request(s, CMD_WRITE, 0, size, cookie=1000 + i)
        s.sendall(data)
        sent += size
        out(f"sent {sent >> 20} MiB")
    out("all sent")
    # Never read a reply; stay until killed.
    threading.Event().wait()


def main():
    if len(sys.argv) >= 6 and sys.argv[1] == "idle":
        idle(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    elif len(sys.argv) >= 8 and sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]),
              int(sys.argv[6]), int(sys.argv[7]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
