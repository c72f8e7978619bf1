# the caching proxy never serves bad bytes: a byte flipped in its cache file is caught at the next read (logged with the chunk), fetched again from the upstream and served right, the cache file repaired; an upstream whose data fails its own d.crc checksums has that block refused with EIO (logged) and never cached, the other blocks served; restarted on that cache with a good upstream beside the bad one (the bad one chosen: the good one is stopped while the proxy starts), the bad one is asked for the block first (mismatch logged), the good one serves it, every block reads right and the cache file ends equal to the image
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
start_checked_upstream "$img" 48
sum=$UPSTREAM_SUM
GOOD_PID=$UPSTREAM_PID
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
stop_proxy
# The bad block was never cached: its bytes in the cache file were never
# written (zeros); the blocks beside it are the image's.
zeros=$(dd if=/dev/zero bs=1M count=16 status=none | md5sum | cut -d' ' -f1)
expect_eq "$(block_md5 "$PROXY_CACHE/d.cache" 1)" "$zeros" "block 1 of the cache file"
for b in 0 2; do
	expect_eq "$(block_md5 "$PROXY_CACHE/d.cache" $b)" "$(block_md5 "$img" $b)" "block $b of the cache file"
done

# The bad upstream beside a good one, on the same cache (both serve the
# same d.crc, so it is kept: a bad block in it would break the md5). The
# good one is stopped while the proxy starts, so the bad one is chosen (and
# kept: equal upstreams never flap) and asked for block 1 first.
kill -STOP "$GOOD_PID"
start_proxy /tmp/enbd-proxy-3.log 10811 10809
kill -CONT "$GOOD_PID"
grep -q 'upstream chosen.*upstream=127.0.0.1:10811' /tmp/enbd-proxy-3.log ||
	fail "the proxy did not choose the bad upstream at start-up"
read_through_proxy /tmp/enbd-proxy-3.log 48 "$sum" "two-upstream"
grep -E 'checksum mismatch: block 1 .*upstream=127.0.0.1:10811' /tmp/enbd-proxy-3.log ||
	fail "the bad upstream was not asked for block 1"
expect_eq "$(counter /tmp/enbd-proxy-3.log bad)" 1 "bad upstream blocks"
# Block 1 twice (the bad copy, then the good one); blocks 0 and 2 cached.
expect_eq "$(counter /tmp/enbd-proxy-3.log upstream)" $((2 * MiB16)) "bytes from upstream"
stop_proxy
run cmp "$img" "$PROXY_CACHE/d.cache"

kill "$GOOD_PID" "$BAD_PID"
wait "$GOOD_PID" "$BAD_PID" 2>/dev/null
rm -rf "$img" "$img.crc" "$bad" "$PROXY_CACHE"
