#!/usr/bin/env python3
"""Sends one NBD command that the usual tools cannot send on their own and
prints the error of its reply (0 for success), with simple replies.

    nbdcmd.py HOST PORT EXPORT cache OFFSET LENGTH
    nbdcmd.py HOST PORT EXPORT fast-zero OFFSET LENGTH [no-hole]

cache is NBD_CMD_CACHE; fast-zero is NBD_CMD_WRITE_ZEROES with
NBD_CMD_FLAG_FAST_ZERO (and NBD_CMD_FLAG_NO_HOLE with "no-hole"). Exits 1
if the server does not answer in step (wrong magic or cookie, a close).
"""
import os
import socket
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbdprobe  # noqa: E402

CMD_DISC, CMD_CACHE, CMD_WRITE_ZEROES = 2, 5, 6
FLAG_NO_HOLE, FLAG_FAST_ZERO = 1 << 1, 1 << 4


def main():
    host, port, export, what, off, ln = sys.argv[1:7]
    extra = sys.argv[7:]
    s = socket.create_connection((host, int(port)), timeout=nbdprobe.TIMEOUT)
    nbdprobe.handshake(s, export)
    if what == "cache":
        cmd, flags = CMD_CACHE, 0
    elif what == "fast-zero":
        cmd, flags = CMD_WRITE_ZEROES, FLAG_FAST_ZERO
        if extra == ["no-hole"]:
            flags |= FLAG_NO_HOLE
    else:
        sys.exit(f"unknown command {what}")
    nbdprobe.request(s, cmd, int(off, 0), int(ln, 0), cookie=42, flags=flags)
    err, cookie = nbdprobe.reply(s)
    if cookie != 42:
        sys.exit(f"reply to cookie {cookie}, not 42")
    nbdprobe.request(s, CMD_DISC, 0, 0, cookie=43)
    s.close()
    print(err)


if __name__ == "__main__":
    main()
