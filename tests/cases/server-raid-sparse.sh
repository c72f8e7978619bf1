# linear and raid0 exports over sparse components report their holes to nbdinfo --map and qemu-img map, qemu-img convert from them is byte-identical and sparse, CACHE and FAST_ZERO reach the components, and a convert into a raid0 export leaves its components sparse
# timeout: 240
d=/tmp/raid-sparse
rm -rf "$d"
mkdir -p "$d"
# Random bytes at byte offset $3 of file $1, $2 bytes long.
put() {
	head -c "$2" /dev/urandom | dd of="$1" bs="$2" seek="$3" oflag=seek_bytes iflag=fullblock conv=notrunc status=none ||
		fail "cannot write $2 bytes at $3 of $1"
}
# Data extents of a `qemu-img map --output=json` on stdin, "start length".
json_data() {
	python3 -c 'import json,sys
for e in json.load(sys.stdin):
    if e["data"]:
        print(e["start"], e["length"])'
}
# Data extents ("start length") of `nbdinfo --map` on stdin, after checking
# that the extents cover $1 bytes in order and the others are "3 hole,zero".
nbdinfo_data() {
	python3 -c 'import sys
size, at = int(sys.argv[1]), 0
for line in sys.stdin:
    start, length, kind = (int(x) for x in line.split()[:3])
    if start != at:
        sys.exit(f"extent at {start}, expected {at}")
    if kind == 0:
        print(start, length)
    elif kind != 3:
        sys.exit(f"extent type {kind} at {start}")
    at += length
if at != size:
    sys.exit(f"extents cover {at} of {size} bytes")' "$1"
}
alloc_kib() { du -k "$1" | cut -f1; }
# Checks export $1 (URL) of $2 bytes against reference image $3 and the
# data extents $4 ("start length" lines, merged).
check_export() {
	local url=$1 size=$2 ref=$3 want=$4 got
	nbdinfo --map "$url" >"$d/map.txt" || fail "nbdinfo --map $url"
	cat "$d/map.txt" >&2
	got=$(nbdinfo_data "$size" <"$d/map.txt") || fail "nbdinfo --map of $url: $got"
	expect_eq "$got" "$want" "nbdinfo --map data of $url"
	run qemu-img map --output=json "$url" >"$d/qmap.json"
	expect_eq "$(json_data <"$d/qmap.json")" "$want" "qemu-img map data of $url"
	rm -f "$d/out.raw"
	run qemu-img convert -f raw -O raw "$url" "$d/out.raw"
	run cmp "$ref" "$d/out.raw"
	# qemu allocates the first block of a raw file it creates, on purpose.
	expect_eq "$(qemu-img map --output=json "$d/out.raw" | json_data | grep -vx '0 4096')" "$want" "map of the copy of $url"
	[ "$(alloc_kib "$d/out.raw")" -le 1024 ] || fail "the copy of $url is not sparse: $(alloc_kib "$d/out.raw") KiB"
}

# Linear: 8 MiB then 12 MiB. Data: 4 KiB at 1 MiB; the last 64 KiB of the
# first and the first 64 KiB of the second, one extent across the boundary;
# 256 KiB at 4 MiB into the second (12 MiB into the export).
run truncate -s 8M "$d/lin-a.img"
run truncate -s 12M "$d/lin-b.img"
put "$d/lin-a.img" 4096 $((1 << 20))
put "$d/lin-a.img" 65536 $(((8 << 20) - 65536))
put "$d/lin-b.img" 65536 0
put "$d/lin-b.img" 262144 $((4 << 20))
cat "$d/lin-a.img" "$d/lin-b.img" >"$d/lin-ref.img"

# raid0: three components of 8 MiB, 64 KiB stripes (stripe k on component
# k % 3 at (k / 3) * 64 KiB). Data: row 2 of components 0 and 1 (stripes 6
# and 7, one extent at 384 KiB); 4 KiB at 1 MiB + 4 KiB on component 2
# (stripe 50, export offset 50 * 64 KiB + 4 KiB); the last row of
# components 0 and 1 (stripes 381 and 382), component 2's last a hole.
st=65536
for c in 0 1 2; do run truncate -s 8M "$d/r0-$c.img"; done
put "$d/r0-0.img" $st $((2 * st))
put "$d/r0-1.img" $st $((2 * st))
put "$d/r0-2.img" 4096 $(((1 << 20) + 4096))
put "$d/r0-0.img" $st $(((8 << 20) - st))
put "$d/r0-1.img" $st $(((8 << 20) - st))
python3 - $st "$d/r0-ref.img" "$d"/r0-{0,1,2}.img <<'PY' || fail "cannot build the raid0 reference"
import sys
st, ref, comps = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
files = [open(c, "rb") for c in comps]
with open(ref, "wb") as out:
    while chunks := [f.read(st) for f in files]:
        if not chunks[0]:
            break
        out.write(b"".join(chunks))
PY

start_server 10809 "lin=linear:$d/lin-a.img,$d/lin-b.img" "r0=raid0:$d/r0-0.img,$d/r0-1.img,$d/r0-2.img,stripe=64K"
check_export nbd://127.0.0.1:10809/lin $((20 << 20)) "$d/lin-ref.img" "1048576 4096
8323072 131072
12582912 262144"
check_export nbd://127.0.0.1:10809/r0 $((24 << 20)) "$d/r0-ref.img" "393216 131072
3280896 4096
24969216 131072"
# Reading the raid0 export whole (structured replies, hole chunks).
expect_eq "$(nbdcopy nbd://127.0.0.1:10809/r0 - | md5sum | cut -d' ' -f1)" "$(md5sum <"$d/r0-ref.img" | cut -d' ' -f1)" "nbdcopy of r0"
# CACHE: forwarded to each component's span; past the end EINVAL (22).
tool=$ENBD_ROOT/tests/tools/nbdcmd.py
expect_eq "$(python3 "$tool" 127.0.0.1 10809 r0 cache 0 $((24 << 20)))" 0 "CACHE of r0"
expect_eq "$(python3 "$tool" 127.0.0.1 10809 lin cache $((8 << 20)) 8192)" 0 "CACHE across lin's components"
expect_eq "$(python3 "$tool" 127.0.0.1 10809 r0 cache $(((24 << 20) - 4096)) 8192)" 22 "CACHE past the end of r0"
# FAST_ZERO that may punch: a hole on each component it touches. Stripes
# 6 and 7 (row 2 of components 0 and 1) go, the rest stays.
expect_eq "$(python3 "$tool" 127.0.0.1 10809 r0 fast-zero 393216 131072)" 0 "FAST_ZERO across two components of r0"
run qemu-io -f raw -c 'read -P 0 393216 131072' nbd://127.0.0.1:10809/r0
for c in 0 1; do
	cmp -n $st -i $((2 * st)):0 "$d/r0-$c.img" /dev/zero || fail "row 2 of component $c was not zeroed"
done
expect_eq "$(qemu-img map --output=json nbd://127.0.0.1:10809/r0 | json_data)" "3280896 4096
24969216 131072" "qemu-img map of r0 after FAST_ZERO"
# And through qemu's own client (-n: no fallback, -u: may unmap), across
# lin's boundary: the extent there is gone.
run qemu-io -f raw -c "write -z -n -u 8323072 131072" nbd://127.0.0.1:10809/lin
expect_eq "$(qemu-img map --output=json nbd://127.0.0.1:10809/lin | json_data)" "1048576 4096
12582912 262144" "qemu-img map of lin after FAST_ZERO"
kill -0 "$SERVER_PID" || fail "server died"
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null

# Into a raid0 export full of 0xff: qemu-img zeroes it first (FAST_ZERO, a
# hole punched on each component), then writes only the data, so each
# component ends up holding its stripes of the linear reference, sparse.
for c in 0 1 2; do
	head -c 8M /dev/zero | tr '\0' '\377' >"$d/t-$c.img"
done
# The same 20 MiB as the linear export, padded to 24 MiB with a hole.
cp --sparse=always "$d/lin-ref.img" "$d/src.img"
run truncate -s 24M "$d/src.img"
start_server 10810 "t=raid0:$d/t-0.img,$d/t-1.img,$d/t-2.img,stripe=64K"
run qemu-img convert -n -f raw -O raw "$d/src.img" nbd://127.0.0.1:10810/t
check_export nbd://127.0.0.1:10810/t $((24 << 20)) "$d/src.img" "1048576 4096
8323072 131072
12582912 262144"
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null
for c in 0 1 2; do
	[ "$(alloc_kib "$d/t-$c.img")" -le 1024 ] || fail "component $c of the target is not sparse: $(alloc_kib "$d/t-$c.img") KiB"
done
rm -rf "$d"
