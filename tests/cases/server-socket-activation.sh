# enbd-server under systemd-socket-activate serves the passed TCP and unix sockets (LISTEN_FDS) instead of binding --listen; LISTEN_FDS meant for another pid is ignored
# timeout: 120
load_enbd
command -v systemd-socket-activate >/dev/null || fail "systemd-socket-activate is missing"
make_backing /tmp/disk.img 64
LOG=/tmp/enbd-server-10809.log
rm -f /tmp/enbd-sa.sock
# systemd-socket-activate listens, and execs the server on the first
# connection with the sockets as descriptors 3 and 4.
systemd-socket-activate -l 127.0.0.1:10809 -l /tmp/enbd-sa.sock \
	"$SERVER" --export disk=/tmp/disk.img --listen 127.0.0.1:10899 >"$LOG" 2>&1 &
SA_PID=$!
wait_port 10809
connect_enbd /dev/enbd0 10809 disk
sum=$(write_random /dev/enbd0 16)
echo 3 >/proc/sys/vm/drop_caches
expect_eq "$(md5_of /dev/enbd0 16)" "$sum" "read back through the passed socket"
grep -q 'socket activation: 2 socket(s) from systemd' "$LOG" || fail "the passed sockets were not taken"
grep -q 'listening on=unix:/tmp/enbd-sa.sock' "$LOG" || fail "the passed unix socket is not served"
grep -q 'listen and --unix are ignored' "$LOG" || fail "the ignored --listen is not logged"
expect_eq "$(nbdinfo --size 'nbd+unix:///disk?socket=/tmp/enbd-sa.sock')" 67108864 "size over the passed unix socket"
ss -Hltn 'sport = :10899' | grep -q LISTEN && fail "the server bound --listen as well"
expect_eq "$(cat "/proc/$SA_PID/comm")" enbd-server "the activated process"
run "$CLIENT" disconnect /dev/enbd0

# Variables for another process are not ours: the server binds as usual.
LISTEN_PID=1 LISTEN_FDS=2 "$SERVER" --export disk=/tmp/disk.img,ro,shared --listen 127.0.0.1:10811 \
	>/tmp/enbd-server-10811.log 2>&1 &
SERVER_PID=$!
wait_port 10811
expect_eq "$(nbdinfo --size nbd://127.0.0.1:10811)" 67108864 "size from the server that bound itself"
grep -q 'socket activation' /tmp/enbd-server-10811.log && fail "LISTEN_FDS of pid 1 was taken"
kill "$SA_PID" "$SERVER_PID"
