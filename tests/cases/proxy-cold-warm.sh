# the caching proxy (enbd-server --proxy): a kernel client reads an image through it cold (md5 right, the whole image fetched from the upstream once, its NAME.crc checksums loaded), warm (md5 right, no byte from the upstream, by the proxy's own counter) and after a restart of the proxy (the cache kept: still no byte from the upstream)
# timeout: 240
# shellcheck source=tests/proxy-lib.sh
. "$ENBD_ROOT/tests/proxy-lib.sh"
img=/tmp/up.img
size=$((48 << 20))

load_enbd
start_checked_upstream "$img" 48
sum=$UPSTREAM_SUM
rm -rf "$PROXY_CACHE"

# Cold: every byte comes from the upstream, each 16 MiB block once and
# checked against the upstream's d.crc.
start_proxy /tmp/enbd-proxy-1.log 10809
grep -q 'upstream checksums loaded' /tmp/enbd-proxy-1.log ||
	fail "the proxy did not load the upstream's checksums (d.crc)"
read_through_proxy /tmp/enbd-proxy-1.log 48 "$sum" cold
expect_eq "$(counter /tmp/enbd-proxy-1.log upstream)" "$size" "bytes from upstream after the cold read"
for f in d.cache d.map; do
	[ -f "$PROXY_CACHE/$f" ] || fail "no $f in $PROXY_CACHE"
done
cached=$(counter /tmp/enbd-proxy-1.log cache)
echo "after the cold read: $(grep -E 'proxy d: [0-9]+ bytes' /tmp/enbd-proxy-1.log | tail -n1 | sed 's/.*proxy d:/proxy d:/')"

# Warm: the same bytes, none of them from the upstream.
read_through_proxy /tmp/enbd-proxy-1.log 48 "$sum" warm
expect_eq "$(counter /tmp/enbd-proxy-1.log upstream)" "$size" "bytes from upstream after the warm read (unchanged)"
warm=$(counter /tmp/enbd-proxy-1.log cache)
[ $((warm - cached)) -ge "$size" ] ||
	fail "the warm read served $((warm - cached)) bytes from the cache, expected at least $size"
echo "after the warm read: $(grep -E 'proxy d: [0-9]+ bytes' /tmp/enbd-proxy-1.log | tail -n1 | sed 's/.*proxy d:/proxy d:/')"
grep -E 'checksum mismatch|cache corruption' /tmp/enbd-proxy-1.log && fail "corruption reported on a good image"

# Restarted: the cache (data and map) is kept.
stop_proxy
start_proxy /tmp/enbd-proxy-2.log 10809
grep -qE 'proxy cache opened.* present=384' /tmp/enbd-proxy-2.log ||
	fail "the restarted proxy does not find its 384 chunks (48 MiB) cached"
read_through_proxy /tmp/enbd-proxy-2.log 48 "$sum" restarted
expect_eq "$(counter /tmp/enbd-proxy-2.log upstream)" 0 "bytes from upstream after the restart"
[ "$(counter /tmp/enbd-proxy-2.log cache)" -ge "$size" ] || fail "the restarted proxy did not serve from its cache"
echo "after the restart: $(grep -E 'proxy d: [0-9]+ bytes' /tmp/enbd-proxy-2.log | tail -n1 | sed 's/.*proxy d:/proxy d:/')"

stop_proxy
kill "$UPSTREAM_PID"
wait "$UPSTREAM_PID" 2>/dev/null
rm -rf "$img" "$img.crc" "$PROXY_CACHE"
