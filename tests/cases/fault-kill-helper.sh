# kill -9 of the helper under verified I/O: the guardian restarts it, it re-attaches with the token and still reconnects
# timeout: 420
load_enbd request_timeout=5 dead_timeout=120
make_backing /tmp/disk.img 256
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2 --retry-max 1
[ "$(stat -c %a /run/enbd/enbd0.state)" = 600 ] || fail "state file is not root-only"
old=$(cat /run/enbd/enbd0.pid)
fio_verify_start /dev/enbd0
sleep 6
run kill -9 "$old"
wait_for 10 sh -c "test -f /run/enbd/enbd0.pid && test \"\$(cat /run/enbd/enbd0.pid)\" != $old" || fail "helper not restarted"
new=$(cat /run/enbd/enbd0.pid)
echo "helper $old killed, guardian started $new"
kill -0 "$new" || fail "new helper not running"
# The new helper must be able to replace a channel: reset one.
sleep 2
ports=($(channel_ports 10809))
kill_conn 10809 "${ports[0]}"
wait_for 30 channels_are enbd0 2 || fail "restarted helper did not reconnect"
# request_timeout 5 s + 1 s: the reset channel's requests go to the other at once.
fio_verify_finish 300 6000
[ "$(channels_started)" -ge 3 ] || fail "the restarted helper replaced no channel"
run "$CLIENT" disconnect /dev/enbd0
wait_for 10 eval '! helper_running' || fail "helper or guardian still running after disconnect"
