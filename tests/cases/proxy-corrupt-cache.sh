# the caching proxy never serves bad bytes: a byte flipped in its cache file is caught at the next read (logged with the chunk), fetched again from the upstream and served right, the cache file repaired; an upstream whose data fails its own d.crc checksums has that block refused with EIO (logged), the other blocks served; with a good upstream beside it, every block reads right
# timeout: 240
# shellcheck source=tests/proxy-lib.sh
. "$ENBD_ROOT/tests/proxy-lib.sh"
img=/tmp/up.img
bad=/tmp/bad.img
MiB16=$((16 << 20))
size=$((48 << 20))

# md5 of 16 MiB block $2 of $1; reads of the device bypass its page cache.
block_md5() {
	local flag=
	[ -b "$1" ] && flag=iflag=direct
	dd if="$1" bs=1M skip=$(($2 * 16)) count=16 $flag status=none | md5sum | cut -d' ' -f1
}

load_enbd
make_backing "$img" 48
sum=$(write_random "$img" 48)
rm -f /tmp/random-48.bin # /tmp is small
run "$SERVER" checksum "$img"
start_server 10809 "d=$img,ro,crc"
GOOD_PID=$SERVER_PID
rm -rf "$PROXY_CACHE"

# A byte flipped in the cache file of a running proxy, after a cold read.
start_proxy /tmp/enbd-proxy-1.log 10809
read_through_proxy /tmp/enbd-proxy-1.log 48 "$sum" cold
expect_eq "$(counter /tmp/enbd-proxy-1.log upstream)" "$size" "bytes from upstream after the cold read"
run cmp "$img" "$PROXY_CACHE/d.cache"
flip_byte "$PROXY_CACHE/d.cache" $((20 << 20))
cmp -s "$img" "$PROXY_CACHE/d.cache" && fail "the flip did not change the cache file"
read_through_proxy /tmp/enbd-proxy-1.log 48 "$sum" "after-corruption"
# Chunk 160 = 20 MiB / 128 KiB; it is fetched again with its whole
# 16 MiB checksum block.
grep -E 'cache corruption: chunk 160 \(bytes 20971520\.\.21102592\)' /tmp/enbd-proxy-1.log ||
	fail "the proxy did not log the corrupt chunk 160"
expect_eq "$(counter /tmp/enbd-proxy-1.log corrupt)" 1 "corrupt cache chunks refetched"
expect_eq "$(counter /tmp/enbd-proxy-1.log upstream)" $((size + MiB16)) "bytes from upstream after the refetch"
run cmp "$img" "$PROXY_CACHE/d.cache"
stop_proxy
rm -rf "$PROXY_CACHE"

# An upstream that serves a changed image with the checksums of the good
# one (a plain export, and the sidecar as a plain export named d.crc).
run cp "$img" "$bad"
flip_byte "$bad" $((MiB16 + 12345))
start_server 10811 "d=$bad,ro" "d.crc=$img.crc,ro"
BAD_PID=$SERVER_PID
start_proxy /tmp/enbd-proxy-2.log 10811
grep -q 'upstream checksums loaded' /tmp/enbd-proxy-2.log || fail "the proxy did not load d.crc from the bad upstream"
connect_enbd /dev/enbd0 10810 d
dd if=/dev/enbd0 of=/dev/null bs=1M skip=16 count=16 iflag=direct status=none 2>/tmp/dd.err &&
	fail "block 1 read although the upstream's copy fails its checksum"
cat /tmp/dd.err >&2
grep -q "Input/output error" /tmp/dd.err || fail "reading block 1 failed, but not with an I/O error"
for b in 0 2; do
	expect_eq "$(block_md5 /dev/enbd0 $b)" "$(block_md5 "$img" $b)" "block $b beside the bad one"
done
run "$CLIENT" disconnect /dev/enbd0
grep -E 'checksum mismatch: block 1 \(bytes 16777216\.\.33554432\)' /tmp/enbd-proxy-2.log ||
	fail "the proxy did not log the bad upstream block 1"
wait_for 20 grep -q 'bytes from upstream' /tmp/enbd-proxy-2.log || fail "no counter line"
[ "$(counter /tmp/enbd-proxy-2.log bad)" -ge 1 ] || fail "no bad upstream block counted"
# The bad block was never cached.
stop_proxy
rm -rf "$PROXY_CACHE"

# The bad upstream beside a good one: whichever the proxy prefers, every
# block reads right (a block that fails on one is fetched from the other).
start_proxy /tmp/enbd-proxy-3.log 10811 10809
read_through_proxy /tmp/enbd-proxy-3.log 48 "$sum" "two-upstream"
if grep -q 'checksum mismatch' /tmp/enbd-proxy-3.log; then
	grep -q 'bad upstream' /tmp/enbd-proxy-3.log || fail "counter line missing"
	[ "$(counter /tmp/enbd-proxy-3.log bad)" -ge 1 ] || fail "a mismatch logged but not counted"
fi
stop_proxy

kill "$GOOD_PID" "$BAD_PID"
wait "$GOOD_PID" "$BAD_PID" 2>/dev/null
rm -rf "$img" "$img.crc" "$bad" "$PROXY_CACHE"
