# the caching proxy (here with --proxy-any: the export is opened when the client asks for it) with two upstreams chooses one by round-trip time; when the chosen one is killed between two reads, the next cold read fails over to the other (logged), and the whole image reads right; with both dead, the cached image still reads right
# timeout: 240
# shellcheck source=tests/proxy-lib.sh
. "$ENBD_ROOT/tests/proxy-lib.sh"
img=/tmp/up.img
img2=/tmp/up2.img

load_enbd
make_backing "$img" 32
sum=$(write_random "$img" 32)
rm -f /tmp/random-32.bin # /tmp is small
run cp "$img" "$img2"
run "$SERVER" checksum "$img"
run "$SERVER" checksum "$img2"
start_server 10809 "d=$img,ro,crc"
PID_10809=$SERVER_PID
start_server 10811 "d=$img2,ro,crc"
PID_10811=$SERVER_PID
rm -rf "$PROXY_CACHE"

PROXY_ANY=1 start_proxy /tmp/enbd-proxy.log 10809 10811
grep -q 'proxy cache opened' /tmp/enbd-proxy.log && fail "export d opened before any client asked for it"
connect_enbd /dev/enbd0 10810 d
grep -q 'proxy cache opened' /tmp/enbd-proxy.log || fail "export d not opened on demand"
chosen=$(sed -nE 's/.*upstream chosen.*upstream=127\.0\.0\.1:([0-9]+).*/\1/p' /tmp/enbd-proxy.log | tail -n1)
case $chosen in
10809) other=10811 victim=$PID_10809 ;;
10811) other=10809 victim=$PID_10811 ;;
*) fail "the proxy logged no chosen upstream" ;;
esac
echo "chosen upstream: $chosen" >&2

# Block 0 through the chosen upstream, then it dies.
run dd if=/dev/enbd0 of=/dev/null bs=1M count=16 iflag=direct status=none
kill "$victim"
wait "$victim" 2>/dev/null
# Block 1 comes from the other; the whole image reads right.
expect_eq "$(md5_of /dev/enbd0 32)" "$sum" "md5 after the chosen upstream died"
# The move is logged; the failed fetch that caused it is logged too, unless
# a probe round (every 2 s at first) found the dead upstream first.
grep -E "upstream chosen .*upstream=127\.0\.0\.1:$other" /tmp/enbd-proxy.log ||
	fail "the proxy did not move to upstream $other"
grep -E "fetch of bytes .* failed.*trying the next upstream" /tmp/enbd-proxy.log >&2 ||
	echo "(the probe found upstream $chosen dead before a fetch did)" >&2

# Both dead: what is cached reads, nothing else is to be had.
survivor=$([ "$other" = 10809 ] && echo "$PID_10809" || echo "$PID_10811")
kill "$survivor"
wait "$survivor" 2>/dev/null
expect_eq "$(md5_of /dev/enbd0 32)" "$sum" "md5 of the cached image with no upstream"
run "$CLIENT" disconnect /dev/enbd0
stop_proxy
rm -rf "$img" "$img.crc" "$img2" "$img2.crc" "$PROXY_CACHE"
