# enbd-server reports holes to nbdinfo --map and qemu-img map, and qemu-img convert through it both ways keeps content and sparseness
# timeout: 180
# The image: 64 MiB, with 4 KiB of data at 1 MiB and 256 KiB at 32 MiB; the
# rest was never written.
rm -f /tmp/sparse.img /tmp/src.img /tmp/out.raw /tmp/out.qcow2 /tmp/tgt.img
run truncate -s 64M /tmp/sparse.img
printf 'hello' | dd of=/tmp/sparse.img bs=1 seek=1048576 conv=notrunc status=none
head -c 262144 /dev/urandom | dd of=/tmp/sparse.img bs=64K seek=512 iflag=fullblock conv=notrunc status=none
cp --sparse=always /tmp/sparse.img /tmp/src.img
sum=$(md5sum </tmp/sparse.img | cut -d' ' -f1)
# What each tool must see, as "start length" of the data extents.
want_data="1048576 4096
33554432 262144"
# Data extents of a `qemu-img map --output=json` on stdin.
json_data() {
	python3 -c 'import json,sys
for e in json.load(sys.stdin):
    if e["data"]:
        print(e["start"], e["length"])'
}
# Allocated KiB of a file.
alloc_kib() { du -k "$1" | cut -f1; }
expect_eq "$(qemu-img map --output=json /tmp/sparse.img | json_data)" "$want_data" "the image's own map"

start_server 10809 "disk=/tmp/sparse.img,desc=a sparse test disk"
url=nbd://127.0.0.1:10809/disk
# libnbd: holes are "3 hole,zero", data "0 data", merged and in order.
nbdinfo --map "$url" | tee /tmp/map.txt >&2
expect_eq "$(awk '{print $1, $2, $3}' /tmp/map.txt)" "0 1048576 3
1048576 4096 0
1052672 32501760 3
33554432 262144 0
33816576 33292288 3" "nbdinfo --map"
# qemu: the same through its own NBD client.
run qemu-img map --output=json "$url" >/tmp/qmap.json
expect_eq "$(json_data </tmp/qmap.json)" "$want_data" "qemu-img map of the export"
# Reading the export (structured replies, hole chunks) gives the image.
expect_eq "$(nbdcopy "$url" - | md5sum | cut -d' ' -f1)" "$sum" "nbdcopy of the export"

# From the server to local files: same content, still sparse.
run qemu-img convert -f raw -O raw "$url" /tmp/out.raw
run cmp /tmp/sparse.img /tmp/out.raw
[ "$(alloc_kib /tmp/out.raw)" -le 1024 ] || fail "out.raw is not sparse: $(alloc_kib /tmp/out.raw) KiB"
# qemu allocates the first block of a raw file it creates, on purpose.
expect_eq "$(qemu-img map --output=json /tmp/out.raw | json_data | grep -vx '0 4096')" "$want_data" "map of out.raw"
run qemu-img convert -f raw -O qcow2 "$url" /tmp/out.qcow2
run qemu-img compare -f raw -F qcow2 /tmp/out.raw /tmp/out.qcow2
# Whole 64 KiB clusters in qcow2.
expect_eq "$(qemu-img map --output=json /tmp/out.qcow2 | json_data)" "1048576 65536
33554432 262144" "data clusters of out.qcow2"
[ "$(alloc_kib /tmp/out.qcow2)" -le 2048 ] || fail "out.qcow2 is not sparse: $(alloc_kib /tmp/out.qcow2) KiB"
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null

# From a local sparse image into an export full of 0xff: qemu-img zeroes
# the target (FAST_ZERO, a hole punch here), then writes only the data.
head -c 64M /dev/zero | tr '\0' '\377' >/tmp/tgt.img
start_server 10810 tgt=/tmp/tgt.img
run qemu-img convert -n -f raw -O raw /tmp/src.img nbd://127.0.0.1:10810/tgt
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null
run cmp /tmp/src.img /tmp/tgt.img
[ "$(alloc_kib /tmp/tgt.img)" -le 1024 ] || fail "the target is not sparse: $(alloc_kib /tmp/tgt.img) KiB"
expect_eq "$(qemu-img map --output=json /tmp/tgt.img | json_data)" "$want_data" "map of the target"
rm -f /tmp/sparse.img /tmp/src.img /tmp/out.raw /tmp/out.qcow2 /tmp/tgt.img
