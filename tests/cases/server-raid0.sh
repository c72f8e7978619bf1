# a raid0 export over components of different sizes: data written through /dev/enbd0 reads back, and each component holds exactly its stripes
# timeout: 240
# Components of 24, 28 and 33 MiB + 12 KiB, stripes of 64 KiB: each gives
# the smallest (24 MiB), so the export is 72 MiB and the others' tails are
# unused (and stay zero). The second is a block device (a loop device).
st=65536
per=$((24 << 20))
size=$((3 * per))
run truncate -s 24M /tmp/raid-a.img
run truncate -s 28M /tmp/raid-b.img
run truncate -s $(((33 << 20) + 12288)) /tmp/raid-c.img
loop=$(losetup --find --show /tmp/raid-b.img) || fail "losetup failed"
trap 'losetup -d "$loop"' EXIT
comps=(/tmp/raid-a.img "$loop" /tmp/raid-c.img)
load_enbd
start_server 10809 "r=raid0:${comps[0]},${comps[1]},${comps[2]},stripe=64K"
grep -q "unused_bytes=4194304" /tmp/enbd-server-10809.log || fail "no warning naming the 4 MiB unused on ${comps[1]}"
grep -q "unused_bytes=$(((9 << 20) + 12288))" /tmp/enbd-server-10809.log || fail "no warning naming the unused tail of ${comps[2]}"
connect_enbd /dev/enbd0 10809 r --channels 2
expect_eq "$(blockdev --getsize64 /dev/enbd0)" "$size" "export size (3 x 24 MiB)"

# The reference image, written in 1 MiB requests (16 stripes each).
head -c "$size" /dev/urandom >/tmp/raid-ref.bin
run dd if=/tmp/raid-ref.bin of=/dev/enbd0 bs=1M oflag=direct conv=notrunc status=none
# An 8 KiB write across the boundary of stripes 128 and 129 (components 2
# and 0), with O_SYNC; and zeroes across seven stripes.
head -c 8192 /dev/urandom >/tmp/raid-patch.bin
off=$((129 * st - 4096))
run dd if=/tmp/raid-patch.bin of=/dev/enbd0 bs=8192 seek="$off" oflag=seek_bytes,direct,sync conv=notrunc status=none
run dd if=/tmp/raid-patch.bin of=/tmp/raid-ref.bin bs=8192 seek="$off" oflag=seek_bytes conv=notrunc status=none
run blkdiscard -z -o $((5 * st + 4096)) -l $((7 * st)) /dev/enbd0
run dd if=/dev/zero of=/tmp/raid-ref.bin bs=4096 seek=$(((5 * st + 4096) / 4096)) count=$((7 * st / 4096)) conv=notrunc status=none
sum=$(md5sum </tmp/raid-ref.bin | cut -d' ' -f1)
echo 3 >/proc/sys/vm/drop_caches
expect_eq "$(dd if=/dev/enbd0 bs=1M iflag=direct status=none | md5sum | cut -d' ' -f1)" "$sum" "md5 of /dev/enbd0"
run "$CLIENT" disconnect /dev/enbd0

# The layout on disk: stripe k is on component k % 3 at (k / 3) * 64 KiB.
# First, last and some in between, including both stripes of the patch and
# the zeroed ones, then the whole image rebuilt from the components.
last=$((size / st - 1))
for k in 0 1 2 3 4 5 6 11 12 128 129 700 $((last - 2)) $((last - 1)) "$last"; do
	c=$((k % 3)) row=$((k / 3))
	cmp -n "$st" -i "$((k * st)):$((row * st))" /tmp/raid-ref.bin "${comps[$c]}" ||
		fail "stripe $k is not at $((row * st)) on ${comps[$c]}"
done
python3 - "$st" /tmp/raid-ref.bin "${comps[@]}" <<'PY' || fail "the components do not rebuild the reference image"
import sys
st, ref, comps = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
files = [open(c, "rb") for c in comps]
with open(ref, "rb") as r:
    k = 0
    while chunk := r.read(st):
        if files[k % len(files)].read(st) != chunk:
            sys.exit(f"stripe {k} differs")
        k += 1
print(f"{k} stripes rebuilt")
PY
# The unused tails were never written.
cmp -n $((4 << 20)) -i "$per:0" "${comps[1]}" /dev/zero || fail "the unused tail of ${comps[1]} was written"
cmp -n $(((9 << 20) + 12288)) -i "$per:0" "${comps[2]}" /dev/zero || fail "the unused tail of ${comps[2]} was written"
