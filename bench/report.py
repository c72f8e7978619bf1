#!/usr/bin/env python3
"""Turns a bench results.json into a Markdown table and a PNG plot.

    report.py RESULTS.json OUT_PREFIX [--machine TEXT]

Writes OUT_PREFIX.md and OUT_PREFIX.png (with gnuplot). Ratios: "vs nbd"
compares with Linux nbd at the same connection count on the same server,
"vs loop" with loop on the same backing file, all from one VM boot.
"""
import json
import os
import re
import subprocess
import sys
import time

WORKLOADS = ["seqread", "seqwrite", "randread", "randwrite"]
LABEL = {
    "seqread": "seq read 1M QD8",
    "seqwrite": "seq write 1M QD8",
    "randread": "rand read 4k QD32",
    "randwrite": "rand write 4k QD32",
}


def metric(wl):
    return "mbps" if wl.startswith("seq") else "iops"


def fmt(v, m):
    return f"{v:,.0f} MB/s" if m == "mbps" else f"{v:,.0f} IOPS"


def peer(name):
    """The Linux nbd cells to compare an enbd cell with, best first."""
    m = re.match(r"enbd-(?:(ktls|tlsproxy)-)?(\d+)c-(.+)$", name)
    if not m:
        return
    tls, c, server = m.group(1), int(m.group(2)), m.group(3)
    if tls:
        yield f"nbd-tls-{c}c-{server}"
        return
    # Linux nbd runs at 1, 2, 4 and 8 connections; compare at the same count
    # where measured, else the nearest lower one.
    for cc in (c, 4 if c > 4 else c, 1):
        yield f"nbd-{cc}c-{server}"


def main():
    src, prefix = sys.argv[1], sys.argv[2]
    machine = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--machine" else ""
    r = json.load(open(src))
    cells = r["cells"]
    loop = cells.get("loop", {})
    lines = [
        f"# enbd benchmark, {time.strftime('%Y-%m-%d')}",
        "",
        f"Machine: {machine}. One TCG guest boot, 2 vCPUs, 2 GiB; 512 MiB backing file on guest tmpfs; "
        f"fio direct=1 libaio, {r['runtime']} s per cell{' (QUICK MODE: smoke test, numbers not meaningful)' if r.get('quick') else ''}.",
        "Ratios are within this run: vs nbd = Linux nbd at the same connection count on the same server; "
        "vs loop = loop with direct I/O on the same file.",
        "",
        "| target | workload | throughput | p50 | p99 | vs nbd | vs loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, wls in cells.items():
        for wl in WORKLOADS:
            if wl not in wls:
                continue
            c = wls[wl]
            m = metric(wl)
            vs_nbd = "-"
            for p in peer(name):
                if p in cells and wl in cells[p] and cells[p][wl][m] > 0:
                    label = re.match(r"nbd-((?:tls-)?\d+c)-", p).group(1)
                    vs_nbd = f"{c[m] / cells[p][wl][m]:.2f}x ({label})"
                    break
            vs_loop = f"{c[m] / loop[wl][m]:.3f}x" if wl in loop and loop[wl][m] > 0 else "-"
            if name.startswith("enbd-ktls-") or name.startswith("enbd-tlsproxy-"):
                plain = re.sub(r"enbd-(ktls|tlsproxy)-", "enbd-", name)
                if plain in cells and wl in cells[plain] and cells[plain][wl][m] > 0:
                    vs_loop += f"; {c[m] / cells[plain][wl][m]:.2f}x plaintext"
            lines.append(
                f"| {name} | {LABEL[wl]} | {fmt(c[m], m)} | {c['p50_us']:,.0f} us | {c['p99_us']:,.0f} us | {vs_nbd} | {vs_loop} |"
            )
    f = r.get("failover")
    if f:
        lines += [
            "",
            "## Failover (enbd, 4 channels, rand read 4k QD32, one connection killed midway)",
            "",
            f"- worst completion latency: {f['max_latency_ms']:.0f} ms",
            f"- IOPS before the kill: {f['iops_before']:,.0f}; after: {f['iops_after']:,.0f}",
            f"- fio errors: {f['errors']}",
        ]
    with open(prefix + ".md", "w") as out:
        out.write("\n".join(lines) + "\n")

    # Plot: throughput relative to loop, per workload, for each target.
    dat = prefix + ".dat"
    names = [n for n in cells if n != "loop"]
    with open(dat, "w") as out:
        out.write("target " + " ".join(WORKLOADS) + "\n")
        for n in names:
            vals = []
            for wl in WORKLOADS:
                m = metric(wl)
                v = cells[n].get(wl, {}).get(m, 0)
                base = loop.get(wl, {}).get(m, 0)
                vals.append(f"{v / base:.4f}" if base else "0")
            out.write(n + " " + " ".join(vals) + "\n")
    gp = f"""
set terminal pngcairo size 1400,700 noenhanced
set output '{prefix}.png'
set title 'Throughput relative to loop (same run); higher is better'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set xtics rotate by -35
set ylabel 'fraction of loop'
set key outside right
set grid ytics
plot for [i=2:5] '{dat}' using i:xtic(1) title columnhead
"""
    try:
        subprocess.run(["gnuplot"], input=gp, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"report: no plot ({e})", file=sys.stderr)
    os.remove(dat)


if __name__ == "__main__":
    main()
