#!/usr/bin/env python3
"""The benchmark matrix, run inside the test VM by scripts/bench.

Every target serves the same 512 MiB backing file on the guest's tmpfs, and
every cell runs in this one boot, so the ratios compare like with like.
Writes raw fio JSON per cell and results.json into $ENBD_OUT.
"""
import argparse
import json
import os
import shutil
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

WORKLOADS = {
    "seqread": dict(rw="read", bs="1M", iodepth=8),
    "seqwrite": dict(rw="write", bs="1M", iodepth=8),
    "randread": dict(rw="randread", bs="4k", iodepth=32),
    "randwrite": dict(rw="randwrite", bs="4k", iodepth=32),
}

START = time.monotonic()


def log(msg):
    print(f"[bench {time.monotonic() - START:6.0f}s] {msg}", flush=True)


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: rc {r.returncode}: {r.stderr.strip()[-500:]}")
    return r.stdout


def wait_port(port, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


CERTS = "/tmp/bench/certs"


class Servers:
    """nbdkit (file plugin) and enbd-server (plaintext, and TLS on its own
    port) on the same backing file."""

    PORTS = {"nbdkit": 10821, "enbd-server": 10822, "enbd-server-tls": 10823}

    def __init__(self):
        self.procs = []

    def start(self):
        self.procs.append(subprocess.Popen(
            ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.PORTS["nbdkit"]), "file", BACKING],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.procs.append(subprocess.Popen(
            [f"{BIN}/enbd-server", "--listen", f"127.0.0.1:{self.PORTS['enbd-server']}",
             "--export", f"disk={BACKING}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        sh(["bash", f"{ROOT}/tests/tools/mkcerts.sh", CERTS])
        self.procs.append(subprocess.Popen(
            [f"{BIN}/enbd-server", "--listen", f"127.0.0.1:{self.PORTS['enbd-server-tls']}",
             "--export", f"disk={BACKING}", "--tls-cert", f"{CERTS}/server-cert.pem",
             "--tls-key", f"{CERTS}/server-key.pem", "--tls-client-ca", f"{CERTS}/ca-cert.pem"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in self.PORTS.values():
            wait_port(p)

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


class Loop:
    name = "loop"

    def __enter__(self):
        self.dev = sh(["losetup", "--find", "--show", "--direct-io=on", BACKING]).strip()
        return self.dev

    def __exit__(self, *a):
        sh(["losetup", "-d", self.dev], check=False)


class LinuxNbd:
    def __init__(self, server, conns):
        self.server, self.conns = server, conns
        self.name = f"nbd-{conns}c-{server}"

    def __enter__(self):
        port = Servers.PORTS[self.server]
        sh(["nbd-client", "127.0.0.1", str(port), "/dev/nbd0", "-N", "disk", "-b", "4096",
            "-C", str(self.conns)])
        return "/dev/nbd0"

    def __exit__(self, *a):
        sh(["nbd-client", "-d", "/dev/nbd0"], check=False)
        time.sleep(0.5)


class LinuxNbdTls(LinuxNbd):
    """nbd-client with TLS (its GnuTLS proxy) against enbd-server's TLS port."""

    def __init__(self, conns):
        super().__init__("enbd-server-tls", conns)
        self.name = f"nbd-tls-{conns}c-enbd-server"

    def __enter__(self):
        sh(["nbd-client", "127.0.0.1", str(Servers.PORTS["enbd-server-tls"]), "/dev/nbd0", "-N", "disk",
            "-b", "4096", "-C", str(self.conns), "-certfile", f"{CERTS}/client-cert.pem",
            "-keyfile", f"{CERTS}/client-key.pem", "-cacertfile", f"{CERTS}/ca-cert.pem",
            "-tlshostname", "localhost"])
        return "/dev/nbd0"


class Enbd:
    def __init__(self, server, chans, tls=None):
        self.server, self.chans, self.tls = server, chans, tls
        kind = {None: "", "ktls": "ktls-", "proxy": "tlsproxy-"}[tls]
        self.name = f"enbd-{kind}{chans}c-{server}"

    def __enter__(self):
        port = Servers.PORTS[self.server + ("-tls" if self.tls else "")]
        export = "disk" if self.server == "enbd-server" else ""
        args = [f"{BIN}/enbd-client", "connect", "/dev/enbd0", f"127.0.0.1:{port}",
                "--export", export, "--channels", str(self.chans)]
        if self.tls:
            args += ["--tls", "--ca", f"{CERTS}/ca-cert.pem", "--cert", f"{CERTS}/client-cert.pem",
                     "--key", f"{CERTS}/client-key.pem"]
            if self.tls == "proxy":
                args += ["--tls-fallback", "always-proxy"]
        sh(args)
        # Proxy channels are opened by the helper after it forks.
        end = time.monotonic() + 20
        while time.monotonic() < end and f"channels={self.chans} " not in open("/proc/nbdinfo").read():
            time.sleep(0.2)
        return "/dev/enbd0"

    def __exit__(self, *a):
        sh([f"{BIN}/enbd-client", "disconnect", "/dev/enbd0"], check=False)
        time.sleep(0.5)


def fio(dev, wl, runtime, ramp, tag):
    p = WORKLOADS[wl]
    out = f"{OUT}/fio-{tag}-{wl}.json"
    args = ["fio", "--name=" + wl, f"--filename={dev}", "--direct=1", "--ioengine=libaio",
            f"--rw={p['rw']}", f"--bs={p['bs']}", f"--iodepth={p['iodepth']}", "--numjobs=1",
            f"--size={SIZE_MB - 16}M", "--time_based", f"--runtime={runtime}",
            f"--ramp_time={ramp}", "--randrepeat=0", "--norandommap",
            "--output-format=json", f"--output={out}"]
    # A stuck device must fail the run, not hang it until the VM's limit.
    try:
        sh(args, timeout=runtime + ramp + 120)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{tag} {wl}: fio did not finish within {runtime + ramp + 120} s") from None
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


def failover(runtime, out):
    """enbd, 4 channels, random read; one channel's connection is killed
    midway. Reports the worst completion latency and throughput before and
    after."""
    port = Servers.PORTS["enbd-server"]
    with Enbd("enbd-server", 4) as dev:
        log_path = f"{OUT}/failover_iops"
        p = subprocess.Popen(
            ["fio", "--name=failover", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
             "--rw=randread", "--bs=4k", "--iodepth=32", "--time_based", f"--runtime={runtime}",
             f"--size={SIZE_MB - 16}M", f"--write_iops_log={log_path}", "--log_avg_msec=500",
             "--output-format=json", f"--output={OUT}/fio-failover.json"])
        time.sleep(runtime / 2)
        # Kill the connection of one channel: the first established socket to the server.
        conns = sh(f"ss -Htn state established '( dport = :{port} )'").split("\n")
        conns = [c.split() for c in conns if c.strip()]
        killed = None
        if conns:
            local = conns[0][2]
            sh(["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(port), "src", local.rsplit(":", 1)[0],
                "sport", "=", local.rsplit(":", 1)[1]], check=False)
            killed = local
        kill_t = runtime / 2
        p.wait()
    with open(f"{OUT}/fio-failover.json") as f:
        j = json.load(f)["jobs"][0]
    r = j["read"]
    before, after = [], []
    iops_file = f"{log_path}_iops.1.log"
    if os.path.exists(iops_file):
        for line in open(iops_file):
            t_ms, v = int(line.split(",")[0]), int(line.split(",")[1])
            (before if t_ms / 1000 < kill_t - 0.5 else after if t_ms / 1000 > kill_t + 1 else []).append(v)
    out["failover"] = {
        "killed": killed,
        "max_latency_ms": r["clat_ns"]["max"] / 1e6,
        "iops_before": sum(before) / len(before) if before else 0,
        "iops_after": sum(after) / len(after) if after else 0,
        "errors": j.get("error", 0),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short cells: check everything runs")
    a = ap.parse_args()
    runtime, ramp = (2, 1) if a.quick else (15, 3)
    os.makedirs(OUT, exist_ok=True)
    os.makedirs("/tmp/bench", exist_ok=True)
    sh(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB + 64}M", "tmpfs", "/tmp/bench"])
    sh(f"dd if=/dev/urandom of={BACKING} bs=1M count={SIZE_MB} status=none")
    sh(["modprobe", "nbd", "nbds_max=4"])
    sh(["insmod", KO])
    servers = Servers()
    servers.start()
    targets = [Loop()]
    for server in ("enbd-server", "nbdkit"):
        for c in (1, 4):
            targets.append(LinuxNbd(server, c))
        for c in (1, 2, 4):
            targets.append(Enbd(server, c))
    targets += [Enbd("enbd-server", 1, tls="ktls"), LinuxNbdTls(1)]
    if not a.quick:
        # Left out of the quick (CI) run: the userspace TLS proxy stalled
        # for good in 1 of 3 bench runs on 2026-11-23 (not reproduced in 6
        # targeted runs); an open defect, see the issue notes. The QEMU case
        # tls-proxy-fallback still tests the proxy.
        targets.insert(-1, Enbd("enbd-server", 1, tls="proxy"))
    scaling = []
    for c in (2, 8):
        scaling.append(LinuxNbd("enbd-server", c))
    scaling.append(Enbd("enbd-server", 8))
    results = {"quick": a.quick, "runtime": runtime, "cells": {}}
    cells = [(t, wl) for t in targets for wl in WORKLOADS]
    cells += [(t, wl) for t in scaling for wl in ("seqread", "randread")]
    done = 0
    for t in targets + scaling:
        wls = [wl for tt, wl in cells if tt is t]
        with t as dev:
            for wl in wls:
                done += 1
                log(f"cell {done}/{len(cells)}: {t.name} {wl}")
                results["cells"].setdefault(t.name, {})[wl] = fio(dev, wl, runtime, ramp, t.name)
    log("failover: 4 channels, random read, one connection killed")
    failover(max(runtime * 2, 8), results)
    servers.stop()
    sh(["rmmod", "enbd"], check=False)
    with open(f"{OUT}/results.json", "w") as f:
        json.dump(results, f, indent=1)
    # A cell without numbers or with I/O errors fails the run (the quick
    # mode exists to catch exactly that).
    bad = [f"{t} {wl}" for t, wls in results["cells"].items() for wl, c in wls.items()
           if c["errors"] or c["iops"] <= 0 or c["mbps"] <= 0]
    if results["failover"].get("errors"):
        bad.append("failover (fio errors)")
    if bad:
        raise RuntimeError("cells without numbers or with errors: " + ", ".join(bad))
    log(f"done: {len(cells)} cells, all with numbers and no errors")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        print(f"bench failed: {e}", file=sys.stderr)
        sys.exit(1)
