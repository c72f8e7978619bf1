# three read-only replicas, two channels each, under verified random reads: the active one is killed, then the next one stalls (100% loss): 0 errors, every block right, no read longer than request_timeout + 1 s
# timeout: 600
load_enbd request_timeout=5
head -c 64M /dev/urandom >/tmp/replica.img
delay=([1]=2 [2]=10 [3]=20)
for i in 1 2 3; do
	setup_replica "$i" "${delay[$i]}"
	# Each server locks its writable image: one per server.
	make_backing "/tmp/rw$i.img" 16
	start_replica "$i" disk=/tmp/replica.img,ro "rw=/tmp/rw$i.img"
done
# Writable exports on several servers only with --shared-backend.
must_fail "writable.*--shared-backend" "$CLIENT" connect /dev/enbd0 10.99.11.2 10.99.12.2 --export rw --foreground
expect_eq "$(proc_field enbd0 state)" unconfigured "state after the refused connect"
must_fail "given twice" "$CLIENT" connect /dev/enbd0 10.99.11.2 10.99.11.2:10809 --export disk --foreground
# The default --probe-max (60 s): the rounds back off while nothing
# changes, and the lost channels must start a round at once. Two channels
# to each server: a request that times out on one must not wait a second
# request_timeout on its sibling to the same stalled server.
run "$CLIENT" connect /dev/enbd0 10.99.11.2 10.99.12.2 10.99.13.2 --export disk \
	--channels 6 --retry-max 1 --log /tmp/enbd-client-enbd0.log
factor=${ENBD_TIME_FACTOR:-1}
wait_for 20 channels_are enbd0 6 || fail "6 channels expected, have $(proc_field enbd0 channels)"
expect_eq "$(server_field enbd0 0 channels)" 2 "channels to server 0"
wait_for 30 sh -c 'grep "^enbd0 server " /proc/nbdinfo | grep -q "id=0 .*role=active"' ||
	fail "server 0 (2 ms) was not chosen: $(grep '^enbd0 server' /proc/nbdinfo)"
rm -f /tmp/rv.stop /tmp/rv.rc
(
	python3 "$ENBD_ROOT/tests/tools/readverify.py" /dev/enbd0 /tmp/replica.img --seconds 5 \
		--threads 8 --until /tmp/rv.stop >/tmp/rv.out 2>&1
	echo $? >/tmp/rv.rc
) &
# Rounds run 2, 4, 8 and 16 s apart while nothing changes: three rounds
# after the one that chose server 0, the next is 16 s away.
p0=$(server_field enbd0 0 probes)
wait_for $((60 * factor)) sh -c "[ \$(grep '^enbd0 server id=0 ' /proc/nbdinfo | tr ' ' '\\n' | sed -n 's/^probes=//p') -ge $((p0 + 3)) ]" ||
	fail "server 0 was not probed 3 more times within 60 s: $(grep '^enbd0 server' /proc/nbdinfo)"
expect_eq "$(active_server enbd0)" 0 "chosen server before the kill"
r0=$(tag_field enbd0 stats resubmits)
run kill -9 "${REPLICA_PID[1]}"
t0=$SECONDS
# One probe (at most 5 s) after the channel loss, not the next scheduled round.
wait_for $((10 * factor)) sh -c 'grep "^enbd0 server " /proc/nbdinfo | grep -q "id=0 .*state=down.*role=standby"' ||
	fail "server 0 was not shown down within 10 s of its death: $(grep '^enbd0 server' /proc/nbdinfo)"
expect_eq "$(active_server enbd0)" 1 "chosen server after server 0 died"
echo "server 0 shown down, server 1 chosen, $((SECONDS - t0)) s after the kill"
grep '^enbd0' /proc/nbdinfo
r1=$(tag_field enbd0 stats resubmits)
echo "resubmitted when server 0 died: $((r1 - r0))"
[ $((r1 - r0)) -gt 0 ] || fail "nothing was in flight on server 0 when it died"
sleep 5
touch /tmp/rv.stop
wait_for $((60 * factor)) test -f /tmp/rv.rc || { dump_stall; fail "readverify did not stop"; }
bound=$((6000 + (factor - 1) * 1000))
# Every block right, no read error, no read longer than request_timeout + 1 s.
check_reads() {
	cat "$1"
	[ "$(cat "$2")" = 0 ] || fail "readverify found errors or wrong data"
	local longest
	longest=$(sed -n 's/.*longest read \([0-9]*\) ms.*/\1/p' "$1")
	echo "longest read $longest ms (bound: request_timeout + 1 s = $bound ms)"
	[ "$longest" -le "$bound" ] || fail "a read took $longest ms, more than request_timeout + 1 s"
}
check_reads /tmp/rv.out /tmp/rv.rc
grep '^enbd0' /proc/nbdinfo

# Server 1 stops answering without closing anything, under one reader: one
# of its two channels holds the read that times out, the other is idle and
# must not take it for a second request_timeout.
rm -f /tmp/rv.stop /tmp/rv.rc
(
	python3 "$ENBD_ROOT/tests/tools/readverify.py" /dev/enbd0 /tmp/replica.img --seconds 5 \
		--threads 1 --until /tmp/rv.stop >/tmp/rv.out 2>&1
	echo $? >/tmp/rv.rc
) &
sleep 3
run ip netns exec r2 tc qdisc change dev vr2s root netem loss 100%
wait_for 60 sh -c 'grep "^enbd0 server " /proc/nbdinfo | grep -q "id=2 .*role=active"' ||
	fail "the I/O did not move to server 2 after server 1 stalled: $(grep '^enbd0 server' /proc/nbdinfo)"
sleep 5
touch /tmp/rv.stop
wait_for $((60 * factor)) test -f /tmp/rv.rc || { dump_stall; fail "readverify did not stop"; }
check_reads /tmp/rv.out /tmp/rv.rc
grep '^enbd0' /proc/nbdinfo
expect_eq "$(tag_field enbd0 stats errors)" 0 "I/O errors"
expect_eq "$(server_field enbd0 0 state)" down "state of the killed server"
run "$CLIENT" disconnect /dev/enbd0
