# enbd-client disconnect while I/O runs: pending I/O ends, the device resets
# timeout: 180
load_enbd
make_backing /tmp/disk.img 256
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2
rm -f /tmp/dd.rc /tmp/dd.err
( dd if=/dev/urandom of=/dev/enbd0 bs=1M count=200 oflag=direct 2>/tmp/dd.err; echo $? >/tmp/dd.rc ) &
sleep 3
run timeout 60 "$CLIENT" disconnect /dev/enbd0
wait_for 30 test -f /tmp/dd.rc || fail "dd still blocked after disconnect"
expect_eq "$(proc_field enbd0 state)" unconfigured "state"
expect_eq "$(blockdev --getsize64 /dev/enbd0)" 0 "size"
kill -0 "$SERVER_PID" || fail "server died"
