#!/usr/bin/env python3
"""Raw enbd ioctls, for tests that need arguments enbd-client never sends.

    enbd_ioctl.py DEV configure SIZE BLOCK_SIZE [NBD_FLAGS] [RESERVED]
    enbd_ioctl.py DEV add-sock FD_SOURCE TOKEN_HEX [SERVER]   (FD_SOURCE: tcp:HOST:PORT | file:PATH)
    enbd_ioctl.py DEV servers TOKEN_HEX COUNT ACTIVE [STATE]
    enbd_ioctl.py DEV status
    enbd_ioctl.py DEV raw NUMBER

Prints "ok ..." or "errno NAME" and exits 0 either way unless usage is wrong;
the layouts mirror userspace/enbd-core/src/uapi.rs (checked by its tests).
"""
import errno
import fcntl
import os
import socket
import struct
import sys

MAGIC = 0xEB


def ioc(d, nr, size):
    return (d << 30) | (size << 16) | (MAGIC << 8) | nr


CONFIG = struct.Struct("=QIIII64s64s16s")
SOCK = struct.Struct("=iII16s")
STATUS = struct.Struct("=IIIIQQ8s")
SERVER = struct.Struct("=64sIII")
MAX_SERVERS = 8
SERVERS = struct.Struct("=16sII" + "64sIII" * MAX_SERVERS)
IOC_CONFIGURE = ioc(3, 1, CONFIG.size)
IOC_ADD_SOCK = ioc(1, 2, SOCK.size)
IOC_STATUS = ioc(2, 5, STATUS.size)
IOC_SERVERS = ioc(1, 7, SERVERS.size)


def call(fd, req, buf):
    try:
        out = fcntl.ioctl(fd, req, buf) if buf is not None else fcntl.ioctl(fd, req)
        return 0, out
    except OSError as e:
        return e.errno, None


def main():
    dev, op, *args = sys.argv[1:]
    fd = os.open(dev, os.O_RDONLY)
    if op == "configure":
        size, bs = int(args[0]), int(args[1])
        flags = int(args[2], 0) if len(args) > 2 else 1
        reserved = int(args[3]) if len(args) > 3 else 0
        buf = bytearray(CONFIG.pack(size, flags, bs, 0, reserved, b"test", b"test", b"\0" * 16))
        e, out = call(fd, IOC_CONFIGURE, buf)
        if e == 0:
            print("ok token", CONFIG.unpack(bytes(buf))[7].hex())
    elif op == "add-sock":
        kind, _, where = args[0].partition(":")
        if kind == "tcp":
            host, port = where.rsplit(":", 1)
            s = socket.create_connection((host, int(port)))
            sfd = s.fileno()
        else:
            sfd = os.open(where, os.O_RDONLY)
        server = int(args[2]) if len(args) > 2 else 0
        buf = bytearray(SOCK.pack(sfd, 0, server, bytes.fromhex(args[1])))
        e, _ = call(fd, IOC_ADD_SOCK, buf)
        if e == 0:
            print("ok")
    elif op == "servers":
        token, count, active = bytes.fromhex(args[0]), int(args[1]), int(args[2], 0)
        state = int(args[3]) if len(args) > 3 else 1
        recs = []
        for i in range(MAX_SERVERS):
            recs += [f"10.0.0.{i}:10809".encode(), 1000 * i, i, state]
        e, _ = call(fd, IOC_SERVERS, bytearray(SERVERS.pack(token, count, active, *recs)))
        if e == 0:
            print("ok")
    elif op == "status":
        buf = bytearray(STATUS.size)
        e, out = call(fd, IOC_STATUS, buf)
        if e == 0:
            print("ok", *STATUS.unpack(bytes(buf)))
    elif op == "raw":
        e, _ = call(fd, int(args[0], 0), None)
        if e == 0:
            print("ok")
    else:
        sys.exit(f"unknown op {op}")
    if e:
        print("errno", errno.errorcode.get(e, str(e)))


if __name__ == "__main__":
    main()
