#!/usr/bin/env python3
"""The benchmark matrix, run inside the test VM by scripts/bench.

Every target serves the same 512 MiB backing file on the guest's tmpfs, and
every cell runs in this one boot, so the ratios compare like with like.

Each cell runs --repeats times (3 by default, 1 with --quick, which also runs
only one workload per target, to check that each target works). A round runs
every target once, in an order shuffled for that round (and the workloads of
a target in a shuffled order too), so no target always runs first, last or
right after the same neighbour. The seed is printed and kept, so an order can
be replayed with --seed.

Writes raw fio JSON per cell and results.json into $ENBD_OUT: every run of
every cell is kept ("runs"); bench/report.py turns them into medians and
min-max ranges.
"""
import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import time

ROOT = os.environ.get("ENBD_ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.environ.get("ENBD_OUT", "/tmp/enbd-bench")
KO = f"{ROOT}/drivers/block/enbd/enbd.ko"
BIN = f"{ROOT}/userspace/target/release"
BACKING = "/tmp/bench/disk.img"
SIZE_MB = 512
RUN_DIR = os.environ.get("ENBD_RUN_DIR", "/run/enbd")
# The debug kernel's guest is slower; tests/vm says by how much.
TIME_FACTOR = int(os.environ.get("ENBD_TIME_FACTOR", "1") or 1)

WORKLOADS = {
    "seqread": dict(rw="read", bs="1M", iodepth=8),
    "seqwrite": dict(rw="write", bs="1M", iodepth=8),
    "randread": dict(rw="randread", bs="4k", iodepth=32),
    "randwrite": dict(rw="randwrite", bs="4k", iodepth=32),
}
# What the 8-connection cells (scaling beyond the main matrix) run.
SCALING_WORKLOADS = ("seqread", "randread")

START = time.monotonic()


def log(msg):
    print(f"[bench {time.monotonic() - START:6.0f}s] {msg}", flush=True)


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: rc {r.returncode}: {r.stderr.strip()[-500:]}")
    return r.stdout


def wait_for(pred, timeout, step=0.1):
    """Polls `pred` until it returns a true value or `timeout` seconds pass;
    returns its last value."""
    end = time.monotonic() + timeout * TIME_FACTOR
    while True:
        v = pred()
        if v or time.monotonic() >= end:
            return v
        time.sleep(step)


def wait_port(port, timeout=20):
    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    if not wait_for(up, timeout, 0.2):
        raise RuntimeError(f"nothing listens on {port}")


def diagnose(tag, extra=()):
    """Writes what the guest looks like now to $ENBD_OUT/diag-<tag>.txt and
    returns the file name, for a failure message: the device table (per
    channel: requests sent, probes), the kernel log's tail, every enbd thread
    and where it sleeps (the kernel's enbdN.Mrx/tx threads, the helper's
    proxy pumps), the TCP and unix sockets with their queues (where stuck
    bytes sit), the run directory and the helper logs."""
    path = f"{OUT}/diag-{tag}.txt"
    parts = [
        ("/proc/nbdinfo", "cat /proc/nbdinfo"),
        ("kernel log (tail)", "dmesg | tail -n 150"),
        ("processes", "ps -eo pid,ppid,stat,etime,args | grep -E 'enbd|nbd|fio' | grep -v grep"),
        ("threads and wait channels",
         "ps -eLo pid,tid,stat,wchan:32,comm | grep -E 'enbd|nbd|fio|tls' | grep -v grep"),
        ("TCP sockets", "ss -tanpeio"),
        ("unix sockets", "ss -xanp"),
        (RUN_DIR, f"ls -la {RUN_DIR}; head -n 50 {RUN_DIR}/*.pid 2>/dev/null"),
    ]
    parts += [(f"{p} (tail)", f"tail -n 60 {p}") for p in extra]
    with open(path, "w") as f:
        for title, cmd in parts:
            r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
            f.write(f"==== {title}\n{r.stdout}{r.stderr}\n")
    return path


CERTS = "/tmp/bench/certs"


class Servers:
    """nbdkit (file plugin) and enbd-server (plaintext, and TLS on its own
    port) on the same backing file: the two enbd-servers serve it ',shared'
    (one target runs at a time)."""

    PORTS = {"nbdkit": 10821, "enbd-server": 10822, "enbd-server-tls": 10823}

    def __init__(self):
        self.procs = []

    def start(self):
        self.procs.append(subprocess.Popen(
            ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.PORTS["nbdkit"]), "file", BACKING],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.procs.append(subprocess.Popen(
            [f"{BIN}/enbd-server", "--listen", f"127.0.0.1:{self.PORTS['enbd-server']}",
             "--export", f"disk={BACKING},shared"],
            stdout=subprocess.DEVNULL, stderr=open(f"{OUT}/enbd-server.log", "w")))
        sh(["bash", f"{ROOT}/tests/tools/mkcerts.sh", CERTS])
        self.procs.append(subprocess.Popen(
            [f"{BIN}/enbd-server", "--listen", f"127.0.0.1:{self.PORTS['enbd-server-tls']}",
             "--export", f"disk={BACKING},shared", "--tls-cert", f"{CERTS}/server-cert.pem",
             "--tls-key", f"{CERTS}/server-key.pem", "--tls-client-ca", f"{CERTS}/ca-cert.pem"],
            stdout=subprocess.DEVNULL, stderr=open(f"{OUT}/enbd-server-tls.log", "w")))
        for p in self.PORTS.values():
            wait_port(p)

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


class Replicas:
    """Three read-only enbd-servers of one image, each in a network
    namespace behind a veth pair with its own delay (tc netem on the
    server's side): replica i at 10.99.1i.2, the round trip DELAYS_MS[i]
    longer. The multi-server cells compare enbd on all three (the helper
    picks the fastest) with enbd on one. An enbd-server caching proxy on
    127.0.0.1:PROXY_PORT serves the 20 ms replica's image from a cache
    filled before the cells (warm), to compare with reading the origin.
    The image and the cache are smaller than the backing file, as both
    live in the guest's RAM."""

    DELAYS_MS = {1: 5, 2: 20, 3: 40}
    IMAGE = "/tmp/bench-replica.img"
    IMAGE_MB = 128
    PROXY_PORT = 10824
    CACHE = "/tmp/bench-proxy-cache"

    def __init__(self):
        self.procs = []

    @staticmethod
    def addr(i):
        return f"10.99.1{i}.2:10809"

    def start(self):
        sh(f"dd if=/dev/urandom of={self.IMAGE} bs=1M count={self.IMAGE_MB} status=none")
        for i, ms in self.DELAYS_MS.items():
            ns, c, srv = f"r{i}", f"vr{i}c", f"vr{i}s"
            sh(["ip", "netns", "add", ns])
            sh(["ip", "link", "add", c, "type", "veth", "peer", "name", srv])
            sh(["ip", "link", "set", srv, "netns", ns])
            sh(["ip", "addr", "add", f"10.99.1{i}.1/24", "dev", c])
            sh(["ip", "link", "set", c, "up"])
            for cmd in (["ip", "addr", "add", f"10.99.1{i}.2/24", "dev", srv],
                        ["ip", "link", "set", srv, "up"], ["ip", "link", "set", "lo", "up"],
                        ["tc", "qdisc", "add", "dev", srv, "root", "netem", "delay", f"{ms}ms"]):
                sh(["ip", "netns", "exec", ns] + cmd)
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, f"{BIN}/enbd-server", "--listen", self.addr(i),
                 "--export", f"disk={self.IMAGE},ro,shared"],
                stdout=subprocess.DEVNULL, stderr=open(f"{OUT}/enbd-server-r{i}.log", "w")))
        for i in self.DELAYS_MS:
            ok = wait_for(lambda: subprocess.run(
                ["ip", "netns", "exec", f"r{i}", "ss", "-Hltn", "sport = :10809"],
                capture_output=True, text=True).stdout.strip() != "", 20)
            if not ok:
                raise RuntimeError(f"replica {i} does not listen (see {OUT}/enbd-server-r{i}.log)")
        os.makedirs(self.CACHE, exist_ok=True)
        self.procs.append(subprocess.Popen(
            [f"{BIN}/enbd-server", "--listen", f"127.0.0.1:{self.PROXY_PORT}",
             "--proxy", self.addr(2), "--proxy-export", "disk", "--cache-dir", self.CACHE],
            stdout=subprocess.DEVNULL, stderr=open(f"{OUT}/enbd-server-proxy.log", "w")))
        wait_port(self.PROXY_PORT)
        # Warm: one pass over the whole image fills the cache.
        t0 = time.monotonic()
        sh(["nbdcopy", f"nbd://127.0.0.1:{self.PROXY_PORT}/disk", "null:"])
        log(f"proxy cache warmed in {time.monotonic() - t0:.1f} s")

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()
        for i in self.DELAYS_MS:
            sh(["ip", "netns", "del", f"r{i}"], check=False)
        sh(["rm", "-rf", self.CACHE, self.IMAGE], check=False)


class Loop:
    name = "loop"

    def __enter__(self):
        self.dev = sh(["losetup", "--find", "--show", "--direct-io=on", BACKING]).strip()
        return self.dev

    def __exit__(self, *a):
        sh(["losetup", "-d", self.dev], check=False)


class LinuxNbd:
    DEV = "/dev/nbd0"

    def __init__(self, server, conns):
        self.server, self.conns = server, conns
        self.name = f"nbd-{conns}c-{server}"

    def connected(self):
        return os.path.exists("/sys/block/nbd0/pid")

    def args(self):
        return ["nbd-client", "127.0.0.1", str(Servers.PORTS[self.server]), self.DEV, "-N", "disk",
                "-b", "4096", "-C", str(self.conns)]

    def __enter__(self):
        if self.connected():
            raise RuntimeError(f"{self.name}: {self.DEV} is still connected from the previous target")
        sh(self.args())
        return self.DEV

    def __exit__(self, *a):
        sh(["nbd-client", "-d", self.DEV], check=False)
        # The next target may use nbd0 again: wait until it is really free.
        if not wait_for(lambda: not self.connected(), 15) and a[0] is None:
            raise RuntimeError(f"{self.name}: {self.DEV} still connected 15 s after nbd-client -d")


class LinuxNbdTls(LinuxNbd):
    """nbd-client with TLS (its GnuTLS proxy) against enbd-server's TLS port."""

    def __init__(self, conns):
        super().__init__("enbd-server-tls", conns)
        self.name = f"nbd-tls-{conns}c-enbd-server"

    def args(self):
        return super().args() + [
            "-certfile", f"{CERTS}/client-cert.pem", "-keyfile", f"{CERTS}/client-key.pem",
            "-cacertfile", f"{CERTS}/ca-cert.pem", "-tlshostname", "localhost"]


def device_line(dev):
    """The fields of `dev`'s own line in /proc/nbdinfo ("enbd0 state=..."),
    or None. Matches the first word exactly, so enbd1 never reads enbd10's
    line, and skips its tagged lines ("enbd0 stats ...", "enbd0 channel ...")."""
    with open("/proc/nbdinfo") as f:
        for line in f:
            words = line.split()
            if len(words) < 2 or words[0] != dev or "=" not in words[1]:
                continue
            return dict(w.split("=", 1) for w in words[1:] if "=" in w)
    return None


def client_alive(pid):
    """Whether `pid` is a running enbd-client. A zombie is not: the test
    VM's init does not reap orphans, so exited daemons linger as zombies
    there. Nor is another program that got the pid of a stale pid file."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z" and b"enbd-client" in cmdline


class Enbd:
    DEV = "/dev/enbd0"
    # Connects so far, for the helper logs' names.
    connects = 0

    def __init__(self, server, chans, tls=None):
        self.server, self.chans, self.tls = server, chans, tls
        kind = {None: "", "ktls": "ktls-", "proxy": "tlsproxy-"}[tls]
        self.name = f"enbd-{kind}{chans}c-{server}"
        self.short = os.path.basename(self.DEV)

    def connect_args(self):
        port = Servers.PORTS[self.server + ("-tls" if self.tls else "")]
        export = "disk" if self.server == "enbd-server" else ""
        args = [f"{BIN}/enbd-client", "connect", self.DEV, f"127.0.0.1:{port}",
                "--export", export, "--channels", str(self.chans), "--log", self.log]
        if self.tls:
            args += ["--tls", "--ca", f"{CERTS}/ca-cert.pem", "--cert", f"{CERTS}/client-cert.pem",
                     "--key", f"{CERTS}/client-key.pem"]
            if self.tls == "proxy":
                args += ["--tls-fallback", "always-proxy"]
        return args

    def ready(self):
        """Whether the device is ready to be measured, once its channels are up."""
        return True

    def pid_files(self):
        return [f"{RUN_DIR}/{self.short}.guardian.pid", f"{RUN_DIR}/{self.short}.pid"]

    def resident_pids(self):
        pids = set()
        for p in self.pid_files():
            try:
                pids.add(int(open(p).read().split()[0]))
            except (OSError, ValueError, IndexError):
                pass
        return pids

    def leftovers(self):
        """What a previous connect of this device left behind: state file,
        live guardian or helper, a configured device. Empty when idle."""
        found = []
        if os.path.exists(f"{RUN_DIR}/{self.short}.state"):
            found.append(f"{RUN_DIR}/{self.short}.state exists")
        found += [f"enbd-client pid {p} still runs" for p in sorted(self.resident_pids()) if client_alive(p)]
        line = device_line(self.short)
        if line and line.get("state") != "unconfigured":
            found.append(f"{self.short} is {line.get('state')}")
        return found

    def __enter__(self):
        # A helper or guardian of the previous target that still runs can
        # act on this device's new configuration (and its exit removes the
        # state and pid files the new connect has just written): start only
        # on an idle device.
        left = self.leftovers()
        if left:
            raise RuntimeError(f"{self.name}: {self.DEV} not idle before connect: " + "; ".join(left))
        Enbd.connects += 1
        self.log = f"{OUT}/enbd-client-{Enbd.connects:03d}-{self.name}.log"
        sh(self.connect_args())
        # Proxy channels are opened by the helper after it forks, so the
        # count can lag the connect; it must reach exactly what was asked.
        def all_up():
            line = device_line(self.short)
            return line is not None and line.get("channels") == str(self.chans)

        if not wait_for(all_up, 30, 0.2):
            got = (device_line(self.short) or {}).get("channels", "no device line")
            diag = diagnose(f"{self.name}-connect", [self.log])
            raise RuntimeError(f"{self.name}: {self.DEV} has {got} of {self.chans} channel(s) 30 s after "
                               f"connect (see {diag})")
        if not wait_for(self.ready, 60, 0.2):
            diag = diagnose(f"{self.name}-connect", [self.log])
            raise RuntimeError(f"{self.name}: not ready 60 s after connect (see {diag})")
        # The guardian and helper write their pid files when they start.
        if not wait_for(lambda: all(os.path.exists(p) for p in self.pid_files()), 10):
            raise RuntimeError(f"{self.name}: no guardian/helper pid files in {RUN_DIR}")
        self.pids = self.resident_pids()
        return self.DEV

    def __exit__(self, *a):
        r = subprocess.run([f"{BIN}/enbd-client", "disconnect", self.DEV], capture_output=True, text=True)
        if r.returncode != 0:
            if a[0] is not None:
                return  # do not hide the error that is on its way out
            diag = diagnose(f"{self.name}-disconnect", [self.log])
            raise RuntimeError(f"{self.name}: disconnect failed: {r.stderr.strip()[-300:]} (see {diag})")
        pids = self.pids | self.resident_pids()
        # The helper sees the disconnect within its 200 ms poll and exits,
        # removing the state and pid files; its guardian follows. Only then
        # may the next target connect (see __enter__).
        gone = wait_for(lambda: not any(client_alive(p) for p in pids)
                        and not os.path.exists(f"{RUN_DIR}/{self.short}.state"), 30)
        if a[0] is not None:
            return
        if not gone:
            diag = diagnose(f"{self.name}-disconnect", [self.log])
            raise RuntimeError(f"{self.name}: helper/guardian still running or state file left 30 s after "
                               f"disconnect: {'; '.join(self.leftovers())} (see {diag})")


class EnbdReplicas(Enbd):
    """enbd on replicas `ids` of Replicas, one channel each (or, with no
    ids, on the warm caching proxy); with several, measured once the
    helper has chosen one (its first probe round)."""

    def __init__(self, ids):
        super().__init__("replicas", max(len(ids), 1))
        self.ids = ids
        if not ids:
            self.name = "enbd-proxy-warm"
        elif len(ids) == 1:
            self.name = f"enbd-replica-{Replicas.DELAYS_MS[ids[0]]}ms"
        else:
            self.name = "enbd-replicas-" + "-".join(str(Replicas.DELAYS_MS[i]) for i in ids) + "ms"

    def connect_args(self):
        addrs = [Replicas.addr(i) for i in self.ids] or [f"127.0.0.1:{Replicas.PROXY_PORT}"]
        return ([f"{BIN}/enbd-client", "connect", self.DEV] + addrs
                + ["--export", "disk", "--channels", str(self.chans), "--log", self.log])

    def ready(self):
        if len(self.ids) <= 1:
            return True
        with open("/proc/nbdinfo") as f:
            return any(line.startswith(f"{self.short} server ") and " role=active" in line for line in f)


def fio(dev, wl, runtime, ramp, tag, diag_logs=()):
    p = WORKLOADS[wl]
    out = f"{OUT}/fio-{tag}-{wl}.json"
    args = ["fio", "--name=" + wl, f"--filename={dev}", "--direct=1", "--ioengine=libaio",
            f"--rw={p['rw']}", f"--bs={p['bs']}", f"--iodepth={p['iodepth']}", "--numjobs=1",
            f"--size={SIZE_MB - 16}M", "--time_based", f"--runtime={runtime}",
            f"--ramp_time={ramp}", "--randrepeat=0", "--norandommap",
            "--output-format=json", f"--output={out}"]
    # A stuck device must fail the run, not hang it until the VM's limit.
    limit = (runtime + ramp + 120) * TIME_FACTOR
    try:
        sh(args, timeout=limit)
    except subprocess.TimeoutExpired:
        diag = diagnose(f"{tag}-{wl}", diag_logs)
        raise RuntimeError(f"{tag} {wl}: fio did not finish within {limit} s (see {diag})") from None
    with open(out) as f:
        j = json.load(f)["jobs"][0]
    side = j["read"] if p["rw"].endswith("read") else j["write"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "mbps": side["bw_bytes"] / 1e6,
        "iops": side["iops"],
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "errors": j.get("error", 0),
    }


def reads_completed(dev):
    with open(f"/sys/block/{os.path.basename(dev)}/stat") as f:
        return int(f.read().split()[0])


def established(port):
    """(local address, socket inode) of each established TCP connection to
    `port` on this host."""
    conns = []
    for line in sh(f"ss -Htne state established '( dport = :{port} )'").splitlines():
        words = line.split()
        ino = re.search(r"\bino:(\d+)", line)
        if len(words) >= 4 and ino:
            conns.append((words[2], ino.group(1)))
    return conns


def failover(runtime, out):
    """enbd, 4 channels, random read; one channel's connection is killed
    midway through fio's run. Reports the worst completion latency and
    throughput before and after. Fails if fio fails or the kill did not
    happen."""
    port = Servers.PORTS["enbd-server"]
    target = Enbd("enbd-server", 4)
    with target as dev:
        log_path = f"{OUT}/failover"
        iops_file = f"{log_path}_iops.1.log"
        if os.path.exists(iops_file):
            os.remove(iops_file)
        reads0 = reads_completed(dev)
        # Log timestamps in CLOCK_MONOTONIC milliseconds (clock id 1), the
        # clock of time.monotonic(), so the kill lands on fio's own time line.
        p = subprocess.Popen(
            ["fio", "--name=failover", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
             "--rw=randread", "--bs=4k", "--iodepth=32", "--time_based", f"--runtime={runtime}",
             f"--size={SIZE_MB - 16}M", f"--write_iops_log={log_path}", "--log_avg_msec=500",
             "--log_alternate_epoch=1", "--log_alternate_epoch_clock_id=1",
             "--output-format=json", f"--output={OUT}/fio-failover.json"],
            stdout=subprocess.DEVNULL, stderr=open(f"{OUT}/fio-failover.err", "w"))

        def fio_err():
            with open(f"{OUT}/fio-failover.err") as f:
                return f.read().strip()[-300:]

        # Time the kill from when fio's I/O started, not from Popen (fio
        # takes a while to start under TCG).
        if not wait_for(lambda: p.poll() is not None or reads_completed(dev) > reads0, 30, 0.05) \
                or p.poll() is not None:
            p.kill()
            raise RuntimeError(f"failover: fio did no I/O (rc {p.wait()}): {fio_err()}")
        io_start = time.monotonic()
        time.sleep(runtime / 2)
        # Kill the connection of one channel: the first established socket
        # to the server.
        conns = established(port)
        if len(conns) != 4:
            p.kill()
            p.wait()
            raise RuntimeError(f"failover: expected 4 connections to port {port} before the kill, "
                               f"found {len(conns)}: {conns}")
        local, ino = conns[0]
        # The inode tells this socket from a new one on the same port.
        ident = (lambda c: c[1]) if ino != "0" else (lambda c: c[0])
        addr, sport = local.rsplit(":", 1)
        kill_t = time.monotonic()
        sh(["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(port), "src", addr, "sport", "=", sport],
           check=False)
        # `ss -K` succeeds even when it destroys nothing (no
        # CONFIG_INET_DIAG_DESTROY, no match): the socket must be gone.
        killed = wait_for(lambda: ident(conns[0]) not in {ident(c) for c in established(port)}, 5, 0.05)
        try:
            rc = p.wait(timeout=(runtime + 120) * TIME_FACTOR)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            diag = diagnose("failover", [target.log])
            raise RuntimeError(f"failover: fio did not finish (see {diag})") from None
        channels_after = (device_line(target.short) or {}).get("channels")
    if rc != 0:
        raise RuntimeError(f"failover: fio exited with status {rc}: {fio_err()}")
    if not killed:
        raise RuntimeError(f"failover: the connection {local} (socket inode {ino}) was still established "
                           f"5 s after ss -K: the kill did not happen")
    with open(f"{OUT}/fio-failover.json") as f:
        j = json.load(f)["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"failover: fio reports error {j['error']} ({j.get('error_msg', '')})")
    r = j["read"]
    kill_ms = kill_t * 1000
    samples = []
    if os.path.exists(iops_file):
        for line in open(iops_file):
            f = line.split(",")
            samples.append((int(f[0]), int(f[1])))
    if not samples:
        raise RuntimeError(f"failover: fio wrote no IOPS log ({iops_file})")
    # Each sample covers the 500 ms before its timestamp; leave out the
    # windows that contain the kill and the second after it.
    before = [v for t, v in samples if t < kill_ms]
    after = [v for t, v in samples if t - 500 > kill_ms + 1000]
    # fio's first window ends 500 ms after its job started.
    fio_start_ms = samples[0][0] - 500
    out["failover"] = {
        "killed": local,
        "kill_after_fio_start_s": round((kill_ms - fio_start_ms) / 1000, 2),
        "kill_after_io_start_s": round(kill_t - io_start, 2),
        "runtime_s": runtime,
        "max_latency_ms": r["clat_ns"]["max"] / 1e6,
        "iops_before": sum(before) / len(before) if before else 0,
        "iops_after": sum(after) / len(after) if after else 0,
        "channels_after": channels_after,
        "fio_status": rc,
        "errors": j.get("error", 0),
    }


def quick_plan(plan):
    """A smoke test needs every target once, not every cell (about 4
    minutes instead of 8 in CI): one workload per target, taken in turn so
    each workload still runs on several targets, and the same one for the
    targets a ratio compares (enbd and nbd at one count, the multi-server
    group), so the report's ratios are exercised too."""
    def group(name):
        if name.startswith(("enbd-replica", "enbd-proxy")):
            return "multi-server"
        return re.sub(r"^e?nbd-k?", "", name)

    chosen = {}
    out = []
    for t, wls in plan:
        g = group(t.name)
        wl = chosen.setdefault(g, wls[len(chosen) % len(wls)])
        out.append((t, [wl if wl in wls else wls[0]]))
    return out


def run_rounds(plan, results, rng, runtime, ramp):
    """Runs every cell of `plan` once per round, each round in a new
    shuffled order, adding the runs to `results`."""
    repeats = results["repeats"]
    ncells = sum(len(w) for _, w in plan) * repeats
    done = 0
    for rnd in range(repeats):
        order = plan[:]
        rng.shuffle(order)
        results["order"].append([t.name for t, _ in order])
        for t, wls in order:
            wls = wls[:]
            rng.shuffle(wls)
            with t as dev:
                logs = [t.log] if isinstance(t, Enbd) else []
                for wl in wls:
                    done += 1
                    log(f"cell {done}/{ncells} (round {rnd + 1}/{repeats}): {t.name} {wl}")
                    run = fio(dev, wl, runtime, ramp, f"{t.name}-r{rnd + 1}", logs)
                    results["cells"][t.name][wl]["runs"].append(run)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short cells, one round: check everything runs")
    ap.add_argument("--repeats", type=int, help="rounds: runs of each cell (default 3; 1 with --quick)")
    ap.add_argument("--seed", type=int, help="seed of the shuffled order (default: from the clock)")
    a = ap.parse_args()
    runtime, ramp = (2, 1) if a.quick else (10, 3)
    repeats = a.repeats or (1 if a.quick else 3)
    seed = a.seed if a.seed is not None else int(time.time())
    rng = random.Random(seed)
    log(f"{repeats} round(s), order seed {seed}")
    os.makedirs(OUT, exist_ok=True)
    os.makedirs("/tmp/bench", exist_ok=True)
    sh(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB + 64}M", "tmpfs", "/tmp/bench"])
    sh(f"dd if=/dev/urandom of={BACKING} bs=1M count={SIZE_MB} status=none")
    sh(["modprobe", "nbd", "nbds_max=4"])
    sh(["insmod", KO])
    servers = Servers()
    servers.start()
    replicas = Replicas()
    replicas.start()
    # Linux nbd runs at every count enbd runs at, so "vs nbd" always
    # compares the same count (report.py never falls back to another).
    plan = [(Loop(), list(WORKLOADS))]
    for server in ("enbd-server", "nbdkit"):
        for c in (1, 2, 4):
            plan.append((LinuxNbd(server, c), list(WORKLOADS)))
            plan.append((Enbd(server, c), list(WORKLOADS)))
    # The userspace TLS proxy runs in quick mode (CI) too, on the server the
    # kTLS target uses, where it once stalled (issue 12); a stall leaves a
    # diag-*.txt in $ENBD_OUT.
    plan += [(Enbd("enbd-server", 1, tls="ktls"), list(WORKLOADS)),
             (Enbd("enbd-server", 1, tls="proxy"), list(WORKLOADS))]
    plan += [(LinuxNbdTls(1), list(WORKLOADS))]
    # Scaling beyond 4 connections: 8 on both sides.
    plan += [(LinuxNbd("enbd-server", 8), list(SCALING_WORKLOADS)),
             (Enbd("enbd-server", 8), list(SCALING_WORKLOADS))]
    # Multi-server: three replicas at 5, 20 and 40 ms vs the 5 ms and the
    # 20 ms one alone, and the warm proxy vs its origin, the 20 ms one
    # (report.py's "Multi-server" table).
    plan += [(EnbdReplicas(ids), list(SCALING_WORKLOADS)) for ids in ((1, 2, 3), (1,), (2,), ())]
    if a.quick:
        plan = quick_plan(plan)
    names = [t.name for t, _ in plan]
    assert len(set(names)) == len(names), names
    ncells = sum(len(w) for _, w in plan) * repeats
    results = {"format": 2, "quick": a.quick, "runtime": runtime, "ramp": ramp, "repeats": repeats,
               "seed": seed, "order": [], "cells": {}}
    # The table lists the cells in the plan's order, whatever order they ran in.
    for t, wls in plan:
        results["cells"][t.name] = {wl: {"runs": []} for wl in WORKLOADS if wl in wls}
    try:
        run_rounds(plan, results, rng, runtime, ramp)
        log("failover: 4 channels, random read, one connection killed")
        failover(max(runtime * 2, 8), results)
    except BaseException:
        # What ran so far, for the post-mortem (report.py is not run).
        with open(f"{OUT}/results-partial.json", "w") as f:
            json.dump(results, f, indent=1)
        raise
    servers.stop()
    replicas.stop()
    sh(["rmmod", "enbd"], check=False)
    with open(f"{OUT}/results.json", "w") as f:
        json.dump(results, f, indent=1)
    # A run without numbers or with I/O errors fails the bench (the quick
    # mode exists to catch exactly that).
    bad = [f"{t} {wl} run {i + 1}" for t, wls in results["cells"].items() for wl, c in wls.items()
           for i, r in enumerate(c["runs"]) if r["errors"] or r["iops"] <= 0 or r["mbps"] <= 0]
    if results["failover"].get("errors"):
        bad.append("failover (fio errors)")
    if bad:
        raise RuntimeError("runs without numbers or with errors: " + ", ".join(bad))
    log(f"done: {ncells} runs of {ncells // repeats} cells, all with numbers and no errors")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        print(f"bench failed: {e}", file=sys.stderr)
        sys.exit(1)
