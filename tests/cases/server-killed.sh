# killing the server with no reconnection possible: I/O waits dead_timeout, then ends with EIO; no hang, no oops
# timeout: 180
load_enbd dead_timeout=4
make_backing /tmp/disk.img 256
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2
rm -f /tmp/dd.rc /tmp/dd.err
( dd if=/dev/urandom of=/dev/enbd0 bs=1M count=200 oflag=direct 2>/tmp/dd.err; echo $? >/tmp/dd.rc ) &
ddpid=$!
sleep 3
kill -9 "$SERVER_PID"
start=$SECONDS
wait_for 30 test -f /tmp/dd.rc || fail "dd still blocked 30 s after the server died"
wait $ddpid
took=$((SECONDS - start))
echo "dd ended $took s after the kill with rc $(cat /tmp/dd.rc)"
[ "$(cat /tmp/dd.rc)" != 0 ] || fail "dd succeeded although the server died"
[ "$took" -ge 3 ] || fail "I/O failed after $took s, before dead_timeout (4 s)"
[ "$took" -le 8 ] || fail "I/O failed after $took s, long after dead_timeout (4 s)"
expect_eq "$(proc_field enbd0 channels)" 0 "channels after server death"
expect_eq "$(proc_field enbd0 state)" dead "state after dead_timeout"
# New I/O fails at once instead of hanging.
must_fail "" timeout 10 dd if=/dev/enbd0 of=/dev/null bs=4096 count=1 iflag=direct
run "$CLIENT" disconnect /dev/enbd0
