#!/usr/bin/env python3
"""Reads random blocks of a device for a while, from several threads, with
O_DIRECT, and compares each with the same range of a reference image.

Prints one line: reads, MiB, errors, mismatches, longest read (ms). Exits 1
on any read error or mismatch, 2 on bad use. A stall shows as the longest
read: the time one read took, from its submission to its data.
"""
import argparse, mmap, os, random, sys, threading, time

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("device")
    ap.add_argument("image", help="reference image, the device's expected content")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--bs", type=int, default=65536)
    ap.add_argument("--until", help="stop once this file exists (after --seconds at least)")
    a = ap.parse_args()
    size = os.path.getsize(a.image)
    if size < a.bs:
        sys.exit(2)
    blocks = size // a.bs
    lock = threading.Lock()
    st = {"reads": 0, "bytes": 0, "errors": 0, "bad": 0, "max": 0.0, "first": None}
    end = time.monotonic() + a.seconds

    def worker(seed):
        rnd = random.Random(seed)
        fd = os.open(a.device, os.O_RDONLY | os.O_DIRECT)
        ref = os.open(a.image, os.O_RDONLY)
        buf = mmap.mmap(-1, a.bs)
        try:
            while time.monotonic() < end or (a.until and not os.path.exists(a.until)):
                off = rnd.randrange(blocks) * a.bs
                t0 = time.monotonic()
                try:
                    n = os.preadv(fd, [buf], off)
                except OSError as e:
                    with lock:
                        st["errors"] += 1
                        st["first"] = st["first"] or f"read at {off}: {e}"
                    continue
                dt = time.monotonic() - t0
                good = n == a.bs and buf[:n] == os.pread(ref, a.bs, off)
                with lock:
                    st["reads"] += 1
                    st["bytes"] += n
                    st["max"] = max(st["max"], dt)
                    if not good:
                        st["bad"] += 1
                        st["first"] = st["first"] or f"data at {off} differs from the image"
                if time.monotonic() > end + 600:
                    break
        finally:
            os.close(fd)
            os.close(ref)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(a.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(f"readverify: {st['reads']} reads, {st['bytes'] / 2**20:.0f} MiB, "
          f"{st['errors']} errors, {st['bad']} mismatches, longest read {st['max'] * 1000:.0f} ms"
          + (f"; first problem: {st['first']}" if st["first"] else ""))
    sys.exit(1 if st["errors"] or st["bad"] or not st["reads"] else 0)

main()
