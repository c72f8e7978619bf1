# enbd-server killed and restarted on the same file under verified I/O: requests wait, then resume; nothing is lost
# timeout: 420
load_enbd request_timeout=5 dead_timeout=120
make_backing /tmp/disk.img 256
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2 --retry-max 1
fio_verify_start /dev/enbd0
sleep 8
t0=$(date +%s%3N)
run kill -9 "$SERVER_PID"
sleep 3
expect_eq "$(proc_field enbd0 channels)" 0 "channels while the server is down"
start_server 10809 disk=/tmp/disk.img
outage=$(($(date +%s%3N) - t0))
echo "server down for $outage ms"
wait_for 30 channels_are enbd0 2 || fail "no reconnection after the restart"
# The outage, then request_timeout (5 s) + 1 s to reconnect and resend.
fio_verify_finish 300 $((outage + 6000))
[ "$(channels_started)" -ge 4 ] || fail "no channel was reconnected"
run "$CLIENT" disconnect /dev/enbd0
