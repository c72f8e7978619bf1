# enbd-server --config: SIGHUP swaps the exports (b added, a removed) while the client connected to a goes on reading and writing it; bad configs are logged and change nothing
# timeout: 150
load_enbd
LOG=/tmp/enbd-server-10809.log
CONF=/tmp/enbd-server.toml
make_backing /tmp/a.img 64
make_backing /tmp/b.img 32
# Relative paths are taken from the file's directory.
cat >"$CONF" <<'TOML'
listen = ["127.0.0.1:10809"]
[[export]]
name = "a"
path = "a.img"
TOML
"$SERVER" --config "$CONF" >"$LOG" 2>&1 &
SERVER_PID=$!
wait_port 10809
connect_enbd /dev/enbd0 10809 a --channels 2
sum=$(write_random /dev/enbd0 16)

# Reloaded: how many times the log says so.
reloads() { grep -c "configuration reloaded" "$LOG"; }
failures() { grep -c "reload failed" "$LOG"; }
exports_are() {
	local got
	got=$(nbdinfo --list nbd://127.0.0.1:10809 | sed -n 's/^export="\(.*\)":$/\1/p' | tr '\n' ' ')
	expect_eq "$got" "$1" "exports listed"
}
exports_are "a "

cat >"$CONF" <<'TOML'
listen = ["127.0.0.1:10809"]
[[export]]
name = "b"
path = "/tmp/b.img"
TOML
run kill -HUP "$SERVER_PID"
wait_for 10 sh -c "[ \$(grep -c 'configuration reloaded' $LOG) = 1 ]" || fail "no reload logged"
grep 'configuration reloaded' "$LOG" | grep -q 'added=\["b"\] removed=\["a"\]' || fail "the reload's log line lacks what changed"
exports_are "b "
must_fail "" nbdinfo nbd://127.0.0.1:10809/a
expect_eq "$(nbdinfo --size nbd://127.0.0.1:10809/b)" 33554432 "size of b"

# The connection to a was not dropped: it reads and writes a still.
echo 3 >/proc/sys/vm/drop_caches
expect_eq "$(md5_of /dev/enbd0 16)" "$sum" "a read back after the reload"
head -c 8M /dev/urandom >/tmp/more.bin
run dd if=/tmp/more.bin of=/dev/enbd0 bs=1M seek=32 oflag=direct conv=notrunc status=none
more=$(md5sum </tmp/more.bin | cut -d' ' -f1)
expect_eq "$(dd if=/dev/enbd0 bs=1M skip=32 count=8 iflag=direct status=none | md5sum | cut -d' ' -f1)" "$more" "a written after the reload"
expect_eq "$(proc_field enbd0 channels)" 2 "channels after the reload"
case_log | grep -E 'enbd0: channel [0-9]+ dropped' && fail "a channel was dropped by the reload"

# Bad configs: a syntax error, a missing image, an export given twice. Each
# is logged with the file named, and b stays.
n=0
for bad in 'listen = [' \
	'[[export]]
name = "c"
path = "/tmp/missing.img"' \
	'[[export]]
name = "b"
path = "/tmp/b.img"
[[export]]
name = "b"
path = "/tmp/a.img"'; do
	printf '%s\n' "$bad" >"$CONF"
	n=$((n + 1))
	run kill -HUP "$SERVER_PID"
	wait_for 10 sh -c "[ \$(grep -c 'reload failed' $LOG) = $n ]" || fail "bad config $n: no failure logged"
	exports_are "b "
done
grep 'reload failed' "$LOG" | grep -q "config file $CONF: TOML parse error at line" || fail "the syntax error is not located"
grep -q "reload failed.*cannot open /tmp/missing.img" "$LOG" || fail "the missing image is not named"
grep -q "reload failed.*export 'b' given twice" "$LOG" || fail "the duplicate is not named"
expect_eq "$(reloads)" 1 "reloads after the bad configs"
kill -0 "$SERVER_PID" || fail "the server died"

run "$CLIENT" disconnect /dev/enbd0
expect_eq "$(md5_of /tmp/a.img 16)" "$sum" "a.img after the reload"
expect_eq "$(dd if=/tmp/a.img bs=1M skip=32 count=8 status=none | md5sum | cut -d' ' -f1)" "$more" "a.img written after the reload"
