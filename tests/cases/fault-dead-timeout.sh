# the server is gone for good: after dead_timeout I/O fails with EIO in bounded time; eject, then rmmod works
# timeout: 300
load_enbd request_timeout=3 dead_timeout=6
make_backing /tmp/disk.img 256
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2 --retry-max 1
rm -f /tmp/dd.rc /tmp/dd.err
( dd if=/dev/urandom of=/dev/enbd0 bs=64k count=3000 oflag=direct 2>/tmp/dd.err; echo $? >/tmp/dd.rc ) &
sleep 3
run kill -9 "$SERVER_PID"
start=$SECONDS
wait_for 30 test -f /tmp/dd.rc || fail "I/O still blocked 30 s after the server died"
took=$((SECONDS - start))
echo "I/O failed $took s after the server died (dead_timeout 6 s)"
[ "$(cat /tmp/dd.rc)" != 0 ] || fail "dd succeeded"
[ "$took" -ge 5 ] && [ "$took" -le 10 ] || fail "failure after $took s, not about dead_timeout (6 s)"
expect_eq "$(proc_field enbd0 state)" dead "state"
run "$CLIENT" eject /dev/enbd0
wait_for 10 eval '! helper_running' || fail "helper still running after eject"
run rmmod enbd
