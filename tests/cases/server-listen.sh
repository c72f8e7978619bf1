# enbd-server on two --listen addresses (127.0.0.1 and [::1]) serves a client on each; the default listens dual-stack on [::]:10809, naming and counting IPv4 clients by their IPv4 address
# timeout: 120
load_enbd
[ -e /proc/net/if_inet6 ] || fail "the guest has no IPv6"
ip link set lo up
make_backing /tmp/disk.img 64
LOG=/tmp/enbd-server-10809.log
"$SERVER" --export disk=/tmp/disk.img --listen 127.0.0.1:10809 --listen '[::1]:10810' >"$LOG" 2>&1 &
SERVER_PID=$!
wait_port 10809
wait_port 10810
grep -q 'listening on=127.0.0.1:10809' "$LOG" || fail "no IPv4 listener logged"
grep -q 'listening on=\[::1\]:10810' "$LOG" || fail "no IPv6 listener logged"
# Each address only: an explicit IPv6 address is IPv6-only.
must_fail "" nbdinfo --size 'nbd://[::1]:10809'
must_fail "" nbdinfo --size nbd://127.0.0.1:10810
connect_enbd /dev/enbd0 10809 disk
run "$CLIENT" connect /dev/enbd1 '[::1]:10810' --export disk --log /tmp/enbd-client-enbd1.log
wait_for 10 sh -c 'test $(blockdev --getsize64 /dev/enbd1) != 0' || fail "/dev/enbd1 has no capacity"
sum=$(write_random /dev/enbd0 16)
expect_eq "$(md5_of /dev/enbd1 16)" "$sum" "written over IPv4, read over IPv6"
grep -q 'serving peer=\[::1\]:[0-9]* ' "$LOG" || fail "no IPv6 client logged"
run "$CLIENT" disconnect /dev/enbd1
run "$CLIENT" disconnect /dev/enbd0
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null

# The default: [::]:10809 taking IPv4 clients too, one connection per
# client address here.
"$SERVER" --export disk=/tmp/disk.img --max-connections-per-client 1 >"$LOG" 2>&1 &
SERVER_PID=$!
wait_port 10809
grep -q 'listening on=\[::\]:10809' "$LOG" || fail "the default is not [::]:10809"
connect_enbd /dev/enbd0 10809 disk
expect_eq "$(md5_of /dev/enbd0 16)" "$sum" "read over IPv4 on the dual-stack socket"
# The IPv4 client is 127.0.0.1, not ::ffff:127.0.0.1, and has its one
# connection: a second from 127.0.0.1 is refused, one from ::1 is not.
grep -q 'serving peer=127.0.0.1:[0-9]* ' "$LOG" || fail "the IPv4 client is not named by its IPv4 address"
must_fail "" nbdinfo --size nbd://127.0.0.1:10809
grep -q 'refused: 127.0.0.1 already has 1 connections' "$LOG" || fail "the refusal does not name 127.0.0.1"
expect_eq "$(nbdinfo --size 'nbd://[::1]:10809')" 67108864 "size over IPv6 on the dual-stack socket"
run "$CLIENT" disconnect /dev/enbd0
