#!/usr/bin/env python3
"""rogue-server.py: a deliberately misbehaving, protocol-correct NBD server
for enbd's fault tests. Python 3 standard library only.

    rogue-server.py --file PATH [--listen HOST:PORT] [--export NAME]
                    [--hold-write OFFSET:SECONDS] [--poison OFFSET] [--trickle]
                    [--block-sizes MIN,PREF,MAX] [--no-multi-conn] [--log PATH]

It serves one export (default name "disk"; the empty name selects it too)
from a regular file whose size is the export size, on TCP HOST:PORT (default
127.0.0.1:10809). Fixed newstyle handshake (FIXED_NEWSTYLE|NO_ZEROES) with
NBD_OPT_EXPORT_NAME, GO, INFO, LIST and ABORT; every other option gets
NBD_REP_ERR_UNSUP (so no TLS and no structured replies). Transmission flags
HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES, plus CAN_MULTI_CONN
unless --no-multi-conn. Commands READ, WRITE, FLUSH, TRIM (accepted, does
nothing), WRITE_ZEROES and DISC, simple replies only.

Each connection has a reader thread that parses requests into a queue and
one worker thread that executes them in order and sends the replies. Like a
server that fences a dead client, once a connection is gone (EOF, reset or
any error, or closed by a fault below), the requests it read but had not
started are dropped, never executed: the worker checks the connection is
alive right before executing each request.

Fault knobs (all optional and combinable):

  --hold-write OFFSET:SECONDS  The first WRITE (over all connections) whose
        range covers byte OFFSET is held SECONDS seconds before it executes;
        only that connection's worker sleeps. Afterwards the write executes
        only if its connection is still alive ("held write executed"),
        otherwise it is dropped ("held write dropped: connection gone").
  --poison OFFSET  Any request whose range covers byte OFFSET makes the
        server close that connection abruptly (shutdown and close, as soon
        as the reader sees the request header; the request is not executed).
        Every time; each is logged ("poisoned ...").
  --trickle  READ replies (header and data) go out one byte every 50 ms.
  --block-sizes MIN,PREF,MAX  Sent as NBD_INFO_BLOCK_SIZE in every INFO/GO
        reply, requested or not. Any values, even invalid ones, to test the
        client's validation. When given, READ/WRITE longer than MAX, and
        READ/WRITE/TRIM/WRITE_ZEROES not aligned to MIN, get EINVAL and a log
        line "block size violation".
  --no-multi-conn  Leave out NBD_FLAG_CAN_MULTI_CONN.
  --log PATH  Where to log (default stderr): a line per connection opened
        and closed and per fault event, each starting with a monotonic
        timestamp in seconds, flushed at once.

enbd's keep-alive probes (a READ at offset 0 of one block, cookie's low 32
bits 0xffffffff) are served like any read and counted as probes in the
per-connection summary logged on close ("requests=N probes=N dropped=N").
SIGTERM or SIGINT: log "exiting", close every connection, exit 0.

Examples (loopback only):
    rogue-server.py --file /tmp/disk.img --listen 127.0.0.1:10900 \\
        --hold-write 1048576:10 --log /tmp/rogue.log &
    qemu-io -f raw nbd://127.0.0.1:10900/disk -c 'write -P 0xaa 0 4k'
    nbdinfo nbd://127.0.0.1:10900/disk
"""
import argparse
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

TX_HAS_FLAGS = 1 << 0
TX_SEND_FLUSH = 1 << 2
TX_SEND_FUA = 1 << 3
TX_SEND_TRIM = 1 << 5
TX_SEND_WRITE_ZEROES = 1 << 6
TX_CAN_MULTI_CONN = 1 << 8

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP = (1 << 31) | 1
REP_ERR_INVALID = (1 << 31) | 3
REP_ERR_UNKNOWN = (1 << 31) | 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = range(7)
CMD_NAMES = {0: "READ", 1: "WRITE", 2: "DISC", 3: "FLUSH", 4: "TRIM", 5: "CACHE", 6: "WRITE_ZEROES"}
CMD_FLAG_FUA = 1 << 0
RANGED = (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE)

# NBD error values (the spec's subset of errno).
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
NBD_ERRNOS = {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}

MAX_OPTION = 64 << 10  # longest option payload accepted
MAX_PAYLOAD = 32 << 20  # longest READ/WRITE without --block-sizes
PROBE_MASK = 0xFFFFFFFF
TRICKLE_DELAY = 0.05


class Log:
    """One line per event, monotonic timestamp first, flushed at once."""

    def __init__(self, path):
        self.lock = threading.Lock()
        self.f = open(path, "a", buffering=1) if path else sys.stderr

    def __call__(self, msg):
        with self.lock:
            try:
                self.f.write(f"{time.monotonic():.3f} {msg}\n")
                self.f.flush()
            except (OSError, ValueError):
                pass


class Closed(Exception):
    """The peer closed the connection or it failed."""


def recvall(sock, n):
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except ConnectionResetError:
            raise Closed("connection reset by peer") from None
        except OSError as e:
            raise Closed(f"receive failed: {e.strerror or e}") from None
        if not chunk:
            raise Closed("end of file from peer")
        buf += chunk
    return bytes(buf)


def covers(offset, length, byte):
    return offset <= byte < offset + length


class Server:
    def __init__(self, args, log):
        self.args = args
        self.log = log
        self.fd = os.open(args.file, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.export = args.export
        self.tx_flags = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_FUA | TX_SEND_TRIM | TX_SEND_WRITE_ZEROES
        if not args.no_multi_conn:
            self.tx_flags |= TX_CAN_MULTI_CONN
        self.hold = args.hold_write  # (offset, seconds) or None
        self.hold_taken = False
        self.hold_lock = threading.Lock()
        self.conns = {}
        self.conns_lock = threading.Lock()
        self.next_id = 0

    def take_hold(self, req):
        """Whether this request is the one WRITE to hold (once, globally)."""
        if self.hold is None or req.cmd != CMD_WRITE or not covers(req.offset, req.length, self.hold[0]):
            return False
        with self.hold_lock:
            if self.hold_taken:
                return False
            self.hold_taken = True
            return True

    def serve(self):
        host, port = self.args.listen
        ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(64)
        faults = []
        if self.hold:
            faults.append(f"hold-write {self.hold[0]}:{self.hold[1]:g}")
        if self.args.poison is not None:
            faults.append(f"poison {self.args.poison}")
        if self.args.trickle:
            faults.append("trickle")
        if self.args.block_sizes:
            faults.append("block-sizes %d,%d,%d" % self.args.block_sizes)
        if self.args.no_multi_conn:
            faults.append("no-multi-conn")
        self.log(
            f"listening on {host}:{port} export '{self.export}' size {self.size} "
            f"flags {self.tx_flags:#x} faults: {', '.join(faults) or 'none'}"
        )
        while True:
            sock, peer = ls.accept()
            with self.conns_lock:
                self.next_id += 1
                cid = self.next_id
                conn = Conn(self, sock, peer, cid)
                self.conns[cid] = conn
            threading.Thread(target=conn.run, name=f"reader-{cid}", daemon=True).start()

    def forget(self, conn):
        with self.conns_lock:
            self.conns.pop(conn.id, None)

    def shutdown_all(self):
        with self.conns_lock:
            conns = list(self.conns.values())
        for c in conns:
            c.kill("server exiting")


class Request:
    __slots__ = ("flags", "cmd", "cookie", "offset", "length", "payload")

    def __init__(self, flags, cmd, cookie, offset, length, payload=None):
        self.flags, self.cmd, self.cookie = flags, cmd, cookie
        self.offset, self.length, self.payload = offset, length, payload

    def describe(self):
        return f"{CMD_NAMES.get(self.cmd, self.cmd)} of {self.length} bytes at offset {self.offset}"

    def is_probe(self):
        return self.cmd == CMD_READ and self.cookie & PROBE_MASK == PROBE_MASK


class Conn:
    def __init__(self, server, sock, peer, cid):
        self.srv = server
        self.log = server.log
        self.sock = sock
        self.peer = f"{peer[0]}:{peer[1]}"
        self.id = cid
        self.alive = True
        self.why = None
        self.state_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.queue = queue.Queue()
        self.requests = 0  # executed, probes excluded
        self.probes = 0
        self.dropped = 0
        self.worker = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    # --- lifetime -----------------------------------------------------

    def kill(self, why):
        """Marks the connection dead and shuts the socket down (once). The
        descriptor itself is closed by the reader when both threads are done,
        so no thread ever uses a reused descriptor number."""
        with self.state_lock:
            if not self.alive:
                return
            self.alive = False
            self.why = why
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.log(f"conn {self.id} ({self.peer}) closing: {why}")

    def run(self):
        self.log(f"conn {self.id} open from {self.peer}")
        try:
            if self.handshake():
                self.worker = threading.Thread(target=self.work, name=f"worker-{self.id}", daemon=True)
                self.worker.start()
                self.read_requests()
        except Closed as e:
            self.kill(str(e))
        except Exception as e:  # never let one connection take the server down
            self.kill(f"internal error: {type(e).__name__}: {e}")
        finally:
            if self.worker is not None:
                self.queue.put(None)
                self.worker.join()
            self.kill("done")
            try:
                self.sock.close()
            except OSError:
                pass
            self.srv.forget(self)
            self.log(
                f"conn {self.id} ({self.peer}) closed: {self.why} "
                f"(requests={self.requests} probes={self.probes} dropped={self.dropped})"
            )

    def send(self, data):
        with self.send_lock:
            return self._send_locked(data)

    def _send_locked(self, data):
        try:
            self.sock.sendall(data)
            return True
        except OSError as e:
            self.kill(f"send failed: {e.strerror or e}")
            return False

    # --- handshake ----------------------------------------------------

    def opt_reply(self, opt, rtype, data=b""):
        if not self.send(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rtype, len(data)) + data):
            raise Closed(self.why or "send failed")

    def export_info(self, opt):
        self.opt_reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.srv.size, self.srv.tx_flags))
        if self.srv.args.block_sizes:
            self.opt_reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, *self.srv.args.block_sizes))

    def name_ok(self, name):
        return name in (self.srv.export, "")

    def handshake(self):
        """Returns True when the transmission phase begins."""
        self.send(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", recvall(self.sock, 4))
        if cflags & ~CLIENT_FLAGS_KNOWN:
            self.kill(f"unknown client flags {cflags:#x}")
            return False
        no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        while True:
            magic, opt, ln = struct.unpack(">QII", recvall(self.sock, 16))
            if magic != IHAVEOPT:
                self.kill(f"bad option magic {magic:#x}")
                return False
            if ln > MAX_OPTION:
                self.kill(f"option {opt} payload of {ln} bytes is too long")
                return False
            data = recvall(self.sock, ln)
            if opt == OPT_EXPORT_NAME:
                name = data.decode("utf-8", "replace")
                if not self.name_ok(name):
                    self.kill(f"EXPORT_NAME of unknown export '{name}'")
                    return False
                tail = b"" if no_zeroes else bytes(124)
                if not self.send(struct.pack(">QH", self.srv.size, self.srv.tx_flags) + tail):
                    return False
                self.log(f"conn {self.id} ({self.peer}) negotiated export '{name}' with EXPORT_NAME")
                return True
            if opt == OPT_ABORT:
                self.opt_reply(opt, REP_ACK)
                self.kill("client sent ABORT")
                return False
            if opt == OPT_LIST:
                if ln:
                    self.opt_reply(opt, REP_ERR_INVALID, b"LIST takes no data")
                    continue
                name = self.srv.export.encode()
                self.opt_reply(opt, REP_SERVER, struct.pack(">I", len(name)) + name)
                self.opt_reply(opt, REP_ACK)
                continue
            if opt in (OPT_INFO, OPT_GO):
                name = self.parse_info_request(data)
                if name is None:
                    self.opt_reply(opt, REP_ERR_INVALID, b"malformed INFO/GO request")
                    continue
                if not self.name_ok(name):
                    self.opt_reply(opt, REP_ERR_UNKNOWN, b"no such export")
                    continue
                self.export_info(opt)
                self.opt_reply(opt, REP_ACK)
                if opt == OPT_GO:
                    self.log(f"conn {self.id} ({self.peer}) negotiated export '{name}' with GO")
                    return True
                continue
            self.opt_reply(opt, REP_ERR_UNSUP, b"option not supported")

    @staticmethod
    def parse_info_request(data):
        if len(data) < 6:
            return None
        (nl,) = struct.unpack(">I", data[:4])
        if 4 + nl + 2 > len(data):
            return None
        name = data[4 : 4 + nl]
        (nreq,) = struct.unpack(">H", data[4 + nl : 6 + nl])
        if 6 + nl + 2 * nreq != len(data):
            return None
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            return None

    # --- transmission -------------------------------------------------

    def read_requests(self):
        poison = self.srv.args.poison
        while self.alive:
            hdr = recvall(self.sock, 28)
            magic, flags, cmd, cookie, offset, length = struct.unpack(">IHHQQI", hdr)
            if magic != REQUEST_MAGIC:
                self.kill(f"bad request magic {magic:#x}")
                return
            req = Request(flags, cmd, cookie, offset, length)
            if poison is not None and cmd in RANGED and covers(offset, length, poison):
                self.log(
                    f"poisoned {req.describe()} on conn {self.id} ({self.peer}), "
                    f"cookie {cookie:#x}: closing the connection"
                )
                self.kill("poisoned request")
                return
            if cmd == CMD_WRITE:
                if length > MAX_PAYLOAD:
                    self.kill(f"WRITE of {length} bytes is too long")
                    return
                req.payload = recvall(self.sock, length)
            self.queue.put(req)
            if cmd == CMD_DISC:
                return

    def work(self):
        while True:
            req = self.queue.get()
            if req is None:
                break
            if not self.alive:
                self.dropped += 1
                continue
            if req.cmd == CMD_DISC:
                self.kill("client sent DISC")
                continue
            if self.srv.take_hold(req):
                off, secs = self.srv.hold
                self.log(
                    f"holding {req.describe()} on conn {self.id} ({self.peer}), "
                    f"cookie {req.cookie:#x}, for {secs:g} s"
                )
                time.sleep(secs)
                if not self.alive:
                    self.dropped += 1
                    self.log(f"held write dropped: connection gone (conn {self.id}: {self.why})")
                    continue
                self.log(f"held write executed (conn {self.id})")
            self.execute(req)

    def check_block_sizes(self, req):
        bs = self.srv.args.block_sizes
        if not bs or req.cmd not in RANGED:
            return True
        mn, _pref, mx = bs
        bad = []
        if mn > 0 and (req.offset % mn or req.length % mn):
            bad.append(f"not aligned to {mn}")
        if req.cmd in (CMD_READ, CMD_WRITE) and req.length > mx:
            bad.append(f"longer than {mx}")
        if bad:
            self.log(f"block size violation: {req.describe()} on conn {self.id} is {' and '.join(bad)}")
            return False
        return True

    def execute(self, req):
        err, data = 0, b""
        fd = self.srv.fd
        size = self.srv.size
        try:
            if req.cmd in RANGED and (req.length == 0 or req.offset + req.length > size):
                err = EINVAL
            elif not self.check_block_sizes(req):
                err = EINVAL
            elif req.cmd == CMD_READ:
                if req.length > MAX_PAYLOAD:
                    err = EINVAL
                else:
                    data = os.pread(fd, req.length, req.offset)
                    if len(data) < req.length:  # the file shrank
                        data += bytes(req.length - len(data))
            elif req.cmd == CMD_WRITE:
                self.pwrite_all(req.payload, req.offset)
            elif req.cmd == CMD_WRITE_ZEROES:
                done, chunk = 0, bytes(min(req.length, 1 << 20))
                while done < req.length:
                    n = min(len(chunk), req.length - done)
                    self.pwrite_all(chunk[:n], req.offset + done)
                    done += n
            elif req.cmd in (CMD_FLUSH, CMD_TRIM):
                pass  # TRIM is advisory; FLUSH and FUA are handled below
            else:
                err = EINVAL
            if not err and (req.cmd == CMD_FLUSH or req.flags & CMD_FLAG_FUA):
                os.fdatasync(fd)
        except OSError as e:
            err = e.errno if e.errno in NBD_ERRNOS else EIO
            data = b""
        if req.is_probe():
            self.probes += 1
        else:
            self.requests += 1
        hdr = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, err, req.cookie)
        if req.cmd == CMD_READ and self.srv.args.trickle:
            self.trickle(hdr + (data if not err else b""))
        else:
            self.send(hdr + (data if req.cmd == CMD_READ and not err else b""))

    def pwrite_all(self, buf, offset):
        view = memoryview(buf)
        while view:
            n = os.pwrite(self.srv.fd, view, offset)
            view = view[n:]
            offset += n

    def trickle(self, data):
        with self.send_lock:
            for i in range(len(data)):
                if not self.alive or not self._send_locked(data[i : i + 1]):
                    return
                time.sleep(TRICKLE_DELAY)


def parse_listen(s):
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got '{s}'")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_hold(s):
    off, sep, secs = s.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(off, 0), float(secs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected OFFSET:SECONDS, got '{s}'") from None


def parse_block_sizes(s):
    try:
        vals = tuple(int(v, 0) for v in s.split(","))
        if len(vals) != 3 or not all(0 <= v <= 0xFFFFFFFF for v in vals):
            raise ValueError
        return vals
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,PREF,MAX (32-bit values), got '{s}'") from None


def main():
    p = argparse.ArgumentParser(
        description="A misbehaving but protocol-correct NBD server for fault tests.",
        epilog="See the comment at the top of this file for details.",
    )
    p.add_argument("--file", required=True, help="backing file; its size is the export size")
    p.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 10809), help="HOST:PORT (default 127.0.0.1:10809)")
    p.add_argument("--export", default="disk", help="export name (default disk)")
    p.add_argument("--hold-write", type=parse_hold, metavar="OFFSET:SECONDS")
    p.add_argument("--poison", type=lambda v: int(v, 0), metavar="OFFSET")
    p.add_argument("--trickle", action="store_true")
    p.add_argument("--block-sizes", type=parse_block_sizes, metavar="MIN,PREF,MAX")
    p.add_argument("--no-multi-conn", action="store_true")
    p.add_argument("--log", metavar="PATH")
    args = p.parse_args()

    log = Log(args.log)
    try:
        srv = Server(args, log)
    except OSError as e:
        sys.exit(f"rogue-server: cannot open {args.file}: {e.strerror}")

    def on_signal(signum, _frame):
        # Once is enough: a second signal must not interrupt the shutdown.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        srv.serve()
    except SystemExit as e:
        log(f"exiting on {e.code}")
        srv.shutdown_all()
    except OSError as e:
        msg = f"cannot serve on {args.listen[0]}:{args.listen[1]}: {e.strerror or e}"
        log(msg)
        if args.log:
            print(f"rogue-server: {msg}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    # Worker threads may be asleep in a hold or a trickle: do not wait for them.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
