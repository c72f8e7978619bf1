# enbd-client disconnect while a direct write runs: the write fails with EIO or ENOSPC, nothing hangs, the device resets
# timeout: 180
load_enbd
make_backing /tmp/disk.img 640
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2
rm -f /tmp/dd.rc /tmp/dd.err
# 600 MiB of 1 MiB direct writes take far longer than the seconds before the
# disconnect (tens of MB/s in the TCG guest), so the disconnect meets them.
( dd if=/dev/urandom of=/dev/enbd0 bs=1M count=600 oflag=direct 2>/tmp/dd.err; echo $? >/tmp/dd.rc ) &
sleep 2
# Proof that I/O is under way when the disconnect starts: enbd0 holds a
# request and dd has not finished.
wait_for 20 io_in_flight enbd0 || fail "no request queued or in flight on enbd0"
[ ! -f /tmp/dd.rc ] || fail "dd ended before the disconnect: $(cat /tmp/dd.err)"
grep '^enbd0 ' /proc/nbdinfo
run timeout 60 "$CLIENT" disconnect /dev/enbd0
wait_for 30 test -f /tmp/dd.rc || fail "dd still blocked after disconnect"
cat /tmp/dd.err
# The device went away under a write with hundreds of MiB to go: dd must fail,
# with the error of a device that is gone (EIO for requests ended by the
# disconnect or sent to a closing device, ENOSPC or ENXIO/ENODEV for writes
# after it left capacity 0), and only after it had written something.
[ "$(cat /tmp/dd.rc)" != 0 ] || fail "dd succeeded although enbd0 was disconnected under it"
grep -qE 'Input/output error|No space left on device|No such device' /tmp/dd.err ||
	fail "dd failed, but not with EIO, ENOSPC or ENXIO/ENODEV"
written=$(sed -n 's/^\([0-9]*\)+[0-9]* records out$/\1/p' /tmp/dd.err)
echo "dd wrote ${written:-?} MiB of 600 before the disconnect ended it"
if [ "${written:-0}" -le 0 ] || [ "$written" -ge 600 ]; then fail "dd wrote ${written:-no} MiB of 600"; fi
expect_eq "$(proc_field enbd0 state)" unconfigured "state"
expect_eq "$(blockdev --getsize64 /dev/enbd0)" 0 "size"
kill -0 "$SERVER_PID" || fail "server died"
