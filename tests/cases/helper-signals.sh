# SIGTERM to the helper disconnects cleanly with the data on the server; SIGUSR2 ejects, failing a request stuck in flight
# timeout: 180
load_enbd keepalive_interval=0 request_timeout=60 dead_timeout=0
make_backing /tmp/disk.img 64
start_server 10809 disk=/tmp/disk.img
state_is() { [ "$(proc_field enbd0 state)" = "$1" ]; }
helper_gone() { ! helper_running; }

connect_enbd /dev/enbd0 10809 disk --channels 2
sum=$(write_random /dev/enbd0 16)
run kill -TERM "$(cat /run/enbd/enbd0.pid)"
wait_for 20 state_is unconfigured || fail "SIGTERM did not disconnect the device"
wait_for 10 helper_gone || fail "helper still runs after SIGTERM"
expect_eq "$(md5_of /tmp/disk.img 16)" "$sum" "server file after SIGTERM"

connect_enbd /dev/enbd0 10809 disk
# A stopped server answers nothing: the read stays in flight (no keep-alives,
# a 60 s request timeout, no dead timeout).
run kill -STOP "$SERVER_PID"
rm -f /tmp/dd.rc
( dd if=/dev/enbd0 of=/dev/null bs=4k count=1 skip=100 iflag=direct 2>/tmp/dd.err; echo $? >/tmp/dd.rc ) &
sleep 3
[ ! -f /tmp/dd.rc ] || fail "the read finished although the server is stopped"
run kill -USR2 "$(cat /run/enbd/enbd0.pid)"
wait_for 20 test -f /tmp/dd.rc || fail "the read is still blocked after SIGUSR2"
[ "$(cat /tmp/dd.rc)" != 0 ] || fail "the read succeeded after the eject"
cat /tmp/dd.err
wait_for 20 state_is unconfigured || fail "device not unconfigured after SIGUSR2"
wait_for 10 helper_gone || fail "helper still runs after SIGUSR2"
run kill -CONT "$SERVER_PID"
