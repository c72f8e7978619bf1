#!/usr/bin/env python3
"""A deliberately misbehaving NBD client, to check that a server answers
hostile input with an error reply or a closed connection, never a hang.

    nbdprobe.py HOST PORT EXPORT TEST

Tests: bad-option-magic, unknown-option, read-out-of-range, read-oversize,
write-readonly, bad-request-magic, unknown-command, write-oversize,
huge-option. Prints what happened and exits 0 if the server behaved.
A server that neither answers nor closes within 10 seconds hangs: that
fails the test, as does a reply with a wrong magic.
"""
import os
import socket
import struct
import sys

# Seconds the server has to answer or close (NBDPROBE_TIMEOUT overrides).
TIMEOUT = float(os.environ.get("NBDPROBE_TIMEOUT", "10"))

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLYMAGIC = 0x3E889045565A9
REQ = 0x25609513
REP = 0x67446698
OPT_GO, OPT_INFO = 7, 6
EINVAL, EPERM = 22, 1


def recvall(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed")
        b += c
    return b


def handshake(s, export, go=True):
    magic, opt, flags = struct.unpack(">QQH", recvall(s, 18))
    if magic != NBDMAGIC or opt != IHAVEOPT:
        raise BadReply(f"bad greeting {magic:#x} {opt:#x}")
    s.sendall(struct.pack(">I", 3))
    if not go:
        return None
    name = export.encode()
    payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(payload)) + payload)
    size = None
    while True:
        m, opt, rtype, ln = struct.unpack(">QIII", recvall(s, 20))
        if m != REPLYMAGIC:
            raise BadReply(f"bad option reply magic {m:#x}")
        data = recvall(s, ln)
        if rtype == 1:
            return size
        if rtype == 3 and struct.unpack(">H", data[:2])[0] == 0:
            size = struct.unpack(">Q", data[2:10])[0]
        elif rtype & 0x80000000:
            raise RuntimeError(f"GO refused: {rtype:#x} {data!r}")


def request(s, cmd, off, ln, cookie=7, flags=0, magic=REQ, payload=b""):
    s.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, off, ln) + payload)


class BadReply(Exception):
    """The server sent something that is not an NBD reply."""


def reply(s):
    magic, err, cookie = struct.unpack(">IIQ", recvall(s, 16))
    if magic != REP:
        raise BadReply(f"bad reply magic {magic:#x}")
    return err, cookie


def closed(s):
    """Whether the server closed the connection (rather than sending
    something). A timeout (socket.timeout) is a hang and propagates."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def main():
    test = sys.argv[4] if len(sys.argv) > 4 else "?"
    try:
        ok = probe(*sys.argv[1:5])
    except socket.timeout:
        print(test, f"WRONG: the server neither answered nor closed within {TIMEOUT:g} s (hang)")
        sys.exit(1)
    except BadReply as e:
        print(test, f"WRONG: {e}")
        sys.exit(1)
    print(test, "ok" if ok else "WRONG")
    sys.exit(0 if ok else 1)


def probe(host, port, export, test):
    s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    if test == "bad-option-magic":
        handshake(s, export, go=False)
        s.sendall(struct.pack(">QII", 0x1234, OPT_GO, 0))
        ok = closed(s)
    elif test == "unknown-option":
        handshake(s, export, go=False)
        s.sendall(struct.pack(">QII", IHAVEOPT, 999, 3) + b"abc")
        m, opt, rtype, ln = struct.unpack(">QIII", recvall(s, 20))
        recvall(s, ln)
        ok = m == REPLYMAGIC and opt == 999 and rtype == 0x80000001
        # The connection stays usable.
        ok = ok and handshake_go_after(s, export)
    elif test == "huge-option":
        handshake(s, export, go=False)
        s.sendall(struct.pack(">QII", IHAVEOPT, OPT_INFO, 0x7FFFFFFF))
        ok = closed(s)
    elif test == "read-out-of-range":
        size = handshake(s, export)
        request(s, 0, size - 512, 1024)
        err, cookie = reply(s)
        ok = err == EINVAL and cookie == 7
        request(s, 0, 0, 512, cookie=8)
        err, cookie = reply(s)
        recvall(s, 512)
        ok = ok and err == 0 and cookie == 8
    elif test == "read-oversize":
        handshake(s, export)
        request(s, 0, 0, 0x7FFFFFFF)
        err, _ = reply(s)
        ok = err == EINVAL
    elif test == "write-readonly":
        handshake(s, export)
        request(s, 1, 0, 512, payload=b"x" * 512)
        err, _ = reply(s)
        ok = err == EPERM
        request(s, 0, 0, 512, cookie=9)
        err, cookie = reply(s)
        recvall(s, 512)
        ok = ok and err == 0 and cookie == 9
    elif test == "write-oversize":
        handshake(s, export)
        request(s, 1, 0, 0x7FFFFFFF)
        s.shutdown(socket.SHUT_WR)
        try:
            err, _ = reply(s)
            ok = err != 0
        except (EOFError, ConnectionResetError):
            ok = True
    elif test == "bad-request-magic":
        handshake(s, export)
        request(s, 0, 0, 512, magic=0xDEADBEEF)
        ok = closed(s)
    elif test == "unknown-command":
        handshake(s, export)
        request(s, 77, 0, 512)
        err, _ = reply(s)
        ok = err == EINVAL
    else:
        sys.exit(f"unknown test {test}")
    return ok


def handshake_go_after(s, export):
    name = export.encode()
    payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(payload)) + payload)
    while True:
        m, opt, rtype, ln = struct.unpack(">QIII", recvall(s, 20))
        if m != REPLYMAGIC:
            raise BadReply(f"bad option reply magic {m:#x}")
        recvall(s, ln)
        if rtype == 1:
            return True
        if rtype & 0x80000000:
            return False


if __name__ == "__main__":
    main()
