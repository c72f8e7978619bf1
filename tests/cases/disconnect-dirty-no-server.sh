# disconnect with dirty page cache and the server gone returns an error naming eject in bounded time; eject then always works
# timeout: 180
# 8 MiB go into the page cache (no sync, the device held open so that dd's
# close does not write them back), then the server dies. disconnect cannot
# write them back: it must give up within request_timeout + 10 s, exit
# non-zero and point at eject; eject must then work within 10 s and leave
# the device unconfigured (guest-run then checks that rmmod works).
load_enbd request_timeout=3
make_backing /tmp/disk.img 64
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2 --retry-max 1
# shellcheck disable=SC2217 # the redirection is the point: it keeps the device open
sleep 600 </dev/enbd0 &
HOLDER=$!
head -c 8M /dev/urandom >/tmp/dirty.bin
run dd if=/tmp/dirty.bin of=/dev/enbd0 bs=1M count=8 status=none
grep -E '^(Dirty|Writeback):' /proc/meminfo
run kill -9 "$SERVER_PID"
ss -K state established "( dport = :10809 )" >/dev/null 2>&1
wait_for 10 channels_are enbd0 0 || fail "channels still up after the server died: $(grep '^enbd0 ' /proc/nbdinfo)"
[ "$(head -c 8M /tmp/disk.img | md5sum)" != "$(md5sum </tmp/dirty.bin)" ] ||
	fail "premise: the data reached the server before it died, nothing is dirty"
grep '^enbd0 ' /proc/nbdinfo

run_bounded 60 "$CLIENT" disconnect /dev/enbd0 >/tmp/disconnect.out 2>&1 ||
	fail "disconnect still blocked after 60 s"
cat /tmp/disconnect.out
echo "disconnect returned rc $BOUNDED_RC after ${BOUNDED_MS} ms (request_timeout 3 s)"
[ "$BOUNDED_RC" != 0 ] || fail "disconnect succeeded although the cached writes could not be written"
grep -qi 'eject' /tmp/disconnect.out || fail "disconnect's error does not mention eject"
[ "$BOUNDED_MS" -le 13000 ] || fail "disconnect took ${BOUNDED_MS} ms, more than request_timeout + 10 s"

run_bounded 10 "$CLIENT" eject /dev/enbd0 || fail "eject still blocked after 10 s"
echo "eject returned rc $BOUNDED_RC after ${BOUNDED_MS} ms"
[ "$BOUNDED_RC" = 0 ] || fail "eject failed (rc $BOUNDED_RC)"
wait_for 10 eval '[ "$(proc_field enbd0 state)" = unconfigured ]' ||
	fail "state is $(proc_field enbd0 state) after eject, not unconfigured"
expect_eq "$(blockdev --getsize64 /dev/enbd0)" 0 "size after eject"
# The last close of the device must not hang on the lost dirty pages.
kill "$HOLDER"
wait_for 10 sh -c "! ps -o stat= -p $HOLDER | grep -qv Z" || fail "closing the device hung after eject"
wait "$HOLDER" 2>/dev/null
wait_for 10 eval '! helper_running' || fail "helper still running after eject"
grep '^enbd0' /proc/nbdinfo
