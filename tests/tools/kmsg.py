#!/usr/bin/env python3
"""The kernel log by sequence number, from /dev/kmsg (needs root).

    kmsg.py seq          print the sequence number of the newest record
    kmsg.py since SEQ [FILE]
                         print the records after SEQ, as dmesg does:
                         "[  secs.usecs] message"; and write the newest
                         record's sequence number to FILE (what the next
                         `since` starts from, without another `seq` run:
                         each python start costs a second in the TCG guest)

Every record of /dev/kmsg is "prio,seq,usec,flags;message" and its seq only
grows, so "the records after SEQ" stays exact however much the kernel logs
meanwhile, unlike counting lines of dmesg. If the ring buffer wrapped and
dropped records after SEQ, `since` says so on stderr (the host's console
log still has them) and prints what is left. A SEQ of -1 prints everything.
"""

import errno
import os
import sys


def records():
    """Yields (seq, usec, message) of every record in the buffer, oldest
    first, and (None, None, None) where records were overwritten while we
    read."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                raw = os.read(fd, 16384)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EPIPE:  # overwritten under us; go on
                    yield None, None, None
                    continue
                raise
            if not raw:
                return
            text = raw.decode("utf-8", "replace")
            head, _, rest = text.partition(";")
            fields = head.split(",")
            try:
                seq, usec = int(fields[1]), int(fields[2])
            except (IndexError, ValueError):
                continue
            # Continuation lines (" KEY=value") are metadata, not message.
            yield seq, usec, rest.split("\n", 1)[0]
    finally:
        os.close(fd)


def since(after, out=sys.stdout, err=sys.stderr):
    """Prints the records after `after` to `out` (None: prints nothing)
    and returns the newest record's sequence number (`after` if none)."""
    expect = after + 1 if after >= 0 else None
    lost = 0
    newest = after
    for seq, usec, msg in records():
        if seq is not None:
            newest = max(newest, seq)
        if seq is None or seq <= after:
            continue
        if expect is not None and seq > expect:
            lost += seq - expect
        expect = seq + 1
        if out is not None:
            out.write(f"[{usec // 1000000:5d}.{usec % 1000000:06d}] {msg}\n")
    if lost:
        err.write(f"kmsg: {lost} kernel log records after seq {after} were lost "
                  "(the ring buffer wrapped); the console log has them\n")
    return newest


def main(argv):
    if len(argv) == 2 and argv[1] == "seq":
        print(since(-1, out=None))
        return 0
    if len(argv) in (3, 4) and argv[1] == "since":
        newest = since(int(argv[2]))
        if len(argv) == 4:
            with open(argv[3], "w") as f:
                f.write(f"{newest}\n")
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
