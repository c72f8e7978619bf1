#!/usr/bin/env python3
"""Turns a bench results.json into a Markdown table and a PNG plot.

    report.py RESULTS.json OUT_PREFIX [--machine TEXT]

Writes OUT_PREFIX.md and OUT_PREFIX.png (with gnuplot). Every cell ran one
or more times (guest-bench.py --repeats); the table shows the median and the
min-max range of its runs.

Ratios, all within one VM boot:
- "vs nbd" compares with Linux nbd at the same connection count on the same
  server, and only that: where nbd did not run at that count, the row says so
  instead of using another count. The ratio is of the medians. It is called a
  win or a loss only when the two min-max ranges do not overlap; otherwise it
  is marked "≈". A cell with a single run on either side is not judged.
- "vs loop" compares with loop on the same backing file (medians).

Also reads the older results format (one run per cell, no "runs" list).
"""
import json
import os
import re
import statistics
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


def unit(m):
    return "MB/s" if m == "mbps" else "IOPS"


def runs(cell):
    """The runs of a cell: the "runs" list, or the cell itself (one run) in
    the older format."""
    return cell["runs"] if "runs" in cell else [cell]


def measured(cells, name, wl):
    """Whether cell (name, wl) exists and has at least one run."""
    return name in cells and wl in cells[name] and len(runs(cells[name][wl])) > 0


class Stat:
    """Median and range of one value over a cell's runs."""

    def __init__(self, cell, key):
        vals = [r[key] for r in runs(cell)]
        self.n = len(vals)
        self.med = statistics.median(vals)
        self.lo = min(vals)
        self.hi = max(vals)


def peer(name):
    """The Linux nbd cell that an enbd cell compares with: the same
    connection count on the same server, or None for a cell that is not enbd.
    There is exactly one candidate; if it was not measured, there is no
    comparison (never a fallback to another count)."""
    m = re.match(r"enbd-(?:(ktls|tlsproxy)-)?(\d+)c-(.+)$", name)
    if not m:
        return None
    tls, c, server = m.group(1), int(m.group(2)), m.group(3)
    if tls:
        return f"nbd-tls-{c}c-{server}"
    return f"nbd-{c}c-{server}"


def verdict(a, b):
    """How `a` compares with `b` (both Stats, higher is better): "win" or
    "loss" when the ranges do not overlap, "≈" when they do, None when either
    has fewer than 2 runs."""
    if a.n < 2 or b.n < 2:
        return None
    if a.lo > b.hi:
        return "win"
    if a.hi < b.lo:
        return "loss"
    return "≈"


def compare(a, b, label):
    """The "vs nbd" cell text for Stats `a` (enbd) and `b` (nbd)."""
    ratio = a.med / b.med
    v = verdict(a, b)
    if v is None:
        return f"{ratio:.2f}x ({label}; {min(a.n, b.n)} run, not judged)"
    if v == "≈":
        return f"≈ {ratio:.2f}x ({label})"
    return f"{ratio:.2f}x {v} ({label})"


def count_label(nbd_name):
    return re.match(r"nbd-((?:tls-)?\d+c)-", nbd_name).group(1)


def throughput(cell, m):
    s = Stat(cell, m)
    if s.n == 1:
        return f"{s.med:,.0f} {unit(m)}"
    return f"{s.med:,.0f} {unit(m)} ({s.lo:,.0f}–{s.hi:,.0f})"


def vs_nbd(name, cells, wl, m):
    p = peer(name)
    if p is None:
        return "-"
    label = count_label(p)
    if not measured(cells, p, wl):
        return f"- (nbd not run at {label})"
    b = Stat(cells[p][wl], m)
    if b.med <= 0:
        return f"- (nbd {label} has no throughput)"
    return compare(Stat(cells[name][wl], m), b, label)


def table(r):
    cells = r["cells"]
    loop = cells.get("loop", {})
    lines = [
        "| target | workload | runs | throughput: median (min–max) | p50 | p99 | vs nbd, same count | vs loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, wls in cells.items():
        for wl in WORKLOADS:
            if not measured(cells, name, wl):
                continue
            c = wls[wl]
            m = metric(wl)
            med = Stat(c, m).med
            vs_loop = "-"
            if measured(cells, "loop", wl) and Stat(loop[wl], m).med > 0:
                vs_loop = f"{med / Stat(loop[wl], m).med:.3f}x"
            if name.startswith("enbd-ktls-") or name.startswith("enbd-tlsproxy-"):
                plain = re.sub(r"enbd-(ktls|tlsproxy)-", "enbd-", name)
                if measured(cells, plain, wl) and Stat(cells[plain][wl], m).med > 0:
                    vs_loop += f"; {med / Stat(cells[plain][wl], m).med:.2f}x plaintext"
            lines.append(
                f"| {name} | {LABEL[wl]} | {len(runs(c))} | {throughput(c, m)} | "
                f"{Stat(c, 'p50_us').med:,.0f} us | {Stat(c, 'p99_us').med:,.0f} us | "
                f"{vs_nbd(name, cells, wl, m)} | {vs_loop} |"
            )
    return lines


def multi_server(cells):
    """The multi-server comparisons: enbd on three replicas (5/20/40 ms)
    against the 5 ms replica alone (the cost of probing and choosing) and
    the 20 ms one alone (what choosing the fastest gains); enbd on the warm
    caching proxy against its origin, the 20 ms replica."""
    multi = next((n for n in cells if n.startswith("enbd-replicas-")), None)
    if multi is None:
        return []
    lines = ["", "## Multi-server (read-only replicas behind netem delays; ratios of medians)", "",
             "| workload | " + multi + " | vs enbd-replica-5ms | vs enbd-replica-20ms |", "|---|---|---|---|"]
    for wl in WORKLOADS:
        if not measured(cells, multi, wl):
            continue
        m = metric(wl)
        a = Stat(cells[multi][wl], m)
        cols = []
        for alone in ("enbd-replica-5ms", "enbd-replica-20ms"):
            if measured(cells, alone, wl) and Stat(cells[alone][wl], m).med > 0:
                cols.append(compare(a, Stat(cells[alone][wl], m), alone.rsplit("-", 1)[1] + " alone"))
            else:
                cols.append("-")
        lines.append(f"| {LABEL[wl]} | {throughput(cells[multi][wl], m)} | {cols[0]} | {cols[1]} |")
    proxy, origin = "enbd-proxy-warm", "enbd-replica-20ms"
    rows = [wl for wl in WORKLOADS if measured(cells, proxy, wl) and measured(cells, origin, wl)]
    if rows:
        lines += ["", f"| workload | {proxy} | vs its origin, {origin} |", "|---|---|---|"]
        for wl in rows:
            m = metric(wl)
            b = Stat(cells[origin][wl], m)
            vs = compare(Stat(cells[proxy][wl], m), b, "origin") if b.med > 0 else "-"
            lines.append(f"| {LABEL[wl]} | {throughput(cells[proxy][wl], m)} | {vs} |")
    return lines


def main():
    src, prefix = sys.argv[1], sys.argv[2]
    machine = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--machine" else ""
    r = json.load(open(src))
    cells = r["cells"]
    loop = cells.get("loop", {})
    repeats = r.get("repeats", 1)
    if "order" in r:
        how = (f"each cell ran {repeats} time(s), once per round; every round ran the targets, and "
               f"each target's workloads, in a newly shuffled order (seed {r.get('seed')})")
    else:
        how = "each cell ran once, in a fixed order (results of the older bench)"
    ramp = f" after {r['ramp']} s of ramp-up" if "ramp" in r else ""
    lines = [
        f"# enbd benchmark, {time.strftime('%Y-%m-%d')}",
        "",
        f"Machine: {machine}. One TCG guest boot, 2 vCPUs, 2 GiB; 512 MiB backing file on guest tmpfs; "
        f"fio direct=1 libaio, {r['runtime']} s per run{ramp}"
        f"{' (QUICK MODE: smoke test, numbers not meaningful)' if r.get('quick') else ''}; {how}.",
        "Throughput is the median of the runs with their min–max range; p50/p99 are medians over the runs.",
        "Ratios are within this run, of medians: vs nbd = Linux nbd at the same connection count on the "
        "same server (no other count is ever used); vs loop = loop with direct I/O on the same file. "
        "A ratio is a **win** or a **loss** only when the min–max ranges of the two cells do not overlap; "
        "\"≈\" marks overlapping ranges, and a cell with one run is not judged.",
        "",
    ]
    lines += table(r)
    lines += multi_server(cells)
    f = r.get("failover")
    if f:
        lines += [
            "",
            "## Failover (enbd, 4 channels, rand read 4k QD32, one connection killed midway)",
            "",
        ]
        if "kill_after_fio_start_s" in f:
            lines.append(f"- connection {f['killed']} killed {f['kill_after_fio_start_s']:.1f} s after fio "
                         f"started (run of {f['runtime_s']} s); fio exit status {f['fio_status']}")
        lines += [
            f"- worst completion latency: {f['max_latency_ms']:.0f} ms",
            f"- IOPS before the kill: {f['iops_before']:,.0f}; after: {f['iops_after']:,.0f}",
            f"- fio errors: {f['errors']}",
        ]
    with open(prefix + ".md", "w") as out:
        out.write("\n".join(lines) + "\n")

    # Plot: throughput relative to loop's median, per workload, for each
    # target: the median as the bar, min-max as the error bar.
    dat = prefix + ".dat"
    names = [n for n in cells if n != "loop"]
    with open(dat, "w") as out:
        out.write("# target " + " ".join(f"{w} {w}_min {w}_max" for w in WORKLOADS) + "\n")
        for n in names:
            vals = []
            for wl in WORKLOADS:
                m = metric(wl)
                base = Stat(loop[wl], m).med if measured(cells, "loop", wl) else 0
                if measured(cells, n, wl) and base:
                    s = Stat(cells[n][wl], m)
                    vals += [f"{s.med / base:.4f}", f"{s.lo / base:.4f}", f"{s.hi / base:.4f}"]
                else:
                    vals += ["0", "0", "0"]
            out.write(n + " " + " ".join(vals) + "\n")
    gp = f"""
set terminal pngcairo size 1400,700 noenhanced
set output '{prefix}.png'
set title 'Throughput relative to loop (same run): median, bars from min to max; higher is better'
set style data histograms
set style histogram errorbars gap 1 lw 1
set style fill solid 0.8 border -1
set xtics rotate by -35
set ylabel 'fraction of loop'
set key outside right
set grid ytics
plot for [i=0:3] '{dat}' using (column(2+3*i)):(column(3+3*i)):(column(4+3*i)):xtic(1) \\
    title word('{" ".join(WORKLOADS)}', i+1)
"""
    try:
        subprocess.run(["gnuplot"], input=gp, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"report: no plot ({e})", file=sys.stderr)
    os.remove(dat)


if __name__ == "__main__":
    main()
