# killing the server during I/O ends the I/O with errors in bounded time, no hang, no oops
# timeout: 180
load_enbd
make_backing /tmp/disk.img 256
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2
( dd if=/dev/urandom of=/dev/enbd0 bs=1M count=200 oflag=direct 2>/tmp/dd.err; echo $? >/tmp/dd.rc ) &
ddpid=$!
sleep 3
kill -9 "$SERVER_PID"
start=$SECONDS
wait_for 30 test -f /tmp/dd.rc || fail "dd still blocked 30 s after the server died"
wait $ddpid
echo "dd ended $((SECONDS - start)) s after the kill with rc $(cat /tmp/dd.rc)"
[ "$(cat /tmp/dd.rc)" != 0 ] || fail "dd succeeded although the server died"
expect_eq "$(proc_field enbd0 channels)" 0 "channels after server death"
expect_eq "$(proc_field enbd0 state)" waiting "state after server death"
# New I/O fails at once instead of hanging.
must_fail "" timeout 10 dd if=/dev/enbd0 of=/dev/null bs=4096 count=1 iflag=direct
run "$CLIENT" disconnect /dev/enbd0
