# Helpers for test cases; sourced by tests/guest-run inside the VM.
# shellcheck shell=bash

ENBD_ROOT=${ENBD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
KO=$ENBD_ROOT/drivers/block/enbd/enbd.ko
BIN=$ENBD_ROOT/userspace/target/release
CLIENT=$BIN/enbd-client
SERVER=$BIN/enbd-server
export PATH=$BIN:$PATH

# Fails the case with a message.
fail() {
	echo "FAIL: $*" >&2
	exit 1
}

# Runs a command that must succeed, showing it.
run() {
	echo "+ $*" >&2
	"$@" || fail "command failed ($?): $*"
}

# Runs a command that must fail; optional pattern must appear in its output.
must_fail() {
	local pat=$1
	shift
	local out rc=0
	echo "+ (must fail) $*" >&2
	out=$("$@" 2>&1) || rc=$?
	echo "$out" >&2
	[ "$rc" != 0 ] || fail "expected failure: $*"
	[ -z "$pat" ] || grep -qE -- "$pat" <<<"$out" || fail "output of '$*' lacks /$pat/"
}

expect_eq() {
	[ "$1" = "$2" ] || fail "${3:-value}: expected '$2', got '$1'"
}

# Loads enbd.ko with optional parameters.
load_enbd() {
	run insmod "$KO" "$@"
	udevadm settle 2>/dev/null || true
}

unload_enbd() {
	if grep -q '^enbd ' /proc/modules; then
		run rmmod enbd
	fi
}

# One field of /proc/nbdinfo: proc_field enbd0 state
proc_field() {
	local dev=$1 key=$2
	grep "^$dev " /proc/nbdinfo | tr ' ' '\n' | sed -n "s/^$key=//p" | head -n1
}

# One field of a tagged /proc/nbdinfo line: tag_field enbd0 stats errors
tag_field() {
	local dev=$1 tag=$2 key=$3
	grep "^$dev $tag " /proc/nbdinfo | tr ' ' '\n' | sed -n "s/^$key=//p" | head -n1
}

# Whether /dev/$1 has exactly $2 working channels (for wait_for, which
# re-runs it: never pass it a $(...) that would be expanded only once).
channels_are() {
	[ "$(proc_field "$1" channels)" = "$2" ]
}

# The kernel log's newest sequence number: case_log SEQ prints what follows it.
kmsg_seq() {
	python3 "$ENBD_ROOT/tests/tools/kmsg.py" seq
}

# The kernel messages logged since the case began (or since sequence number
# $1), as dmesg prints them. By sequence number (tests/tools/kmsg.py), so it
# stays exact when the ring buffer wraps; tests/guest-run sets CASE_SEQ.
case_log() {
	python3 "$ENBD_ROOT/tests/tools/kmsg.py" since "${1:-${CASE_SEQ:--1}}"
}

# Channel-up messages the kernel logged since the case began.
channels_started() {
	case_log | grep -c 'enbd0: channel [0-9]* up'
}

# Whether a live (not zombie) enbd-client runs. The test VM's init does not
# reap orphans, so exited daemons linger as zombies there.
helper_running() {
	ps -C enbd-client -o stat= | grep -qv '^Z'
}

# Waits up to $1 seconds for a command to succeed.
wait_for() {
	local t=$1
	shift
	local end=$((SECONDS + t))
	until "$@"; do
		[ $SECONDS -lt $end ] || return 1
		sleep 0.2
	done
}

# Waits until something listens on TCP port $1 (up to 20 s).
wait_port() {
	wait_for 20 sh -c "ss -Hltn 'sport = :$1' | grep -q LISTEN" || fail "nothing listens on port $1"
}

# Starts enbd-server on 127.0.0.1:$1 with the given --export specs.
start_server() {
	local port=$1
	shift
	local args=()
	for e in "$@"; do args+=(--export "$e"); done
	"$SERVER" --listen "127.0.0.1:$port" "${args[@]}" >"/tmp/enbd-server-$port.log" 2>&1 &
	SERVER_PID=$!
	wait_port "$port"
}

# Makes a backing file of $2 MiB at $1 (sparse, on the guest's tmpfs).
make_backing() {
	rm -f "$1"
	truncate -s "$2M" "$1"
}

# The md5 of the first $2 MiB of $1.
md5_of() {
	dd if="$1" bs=1M count="$2" iflag=direct status=none 2>/dev/null | md5sum | cut -d' ' -f1
}

# Writes $2 MiB of random data to device or file $1 at offset 0 and prints its md5.
write_random() {
	local dst=$1 mib=$2 src=/tmp/random-$2.bin
	[ -f "$src" ] || head -c "$((mib << 20))" /dev/urandom >"$src"
	dd if="$src" of="$dst" bs=1M oflag=direct conv=notrunc status=none || fail "write to $dst failed"
	md5sum <"$src" | cut -d' ' -f1
}

# Connects /dev/enbdN to 127.0.0.1:PORT export NAME, extra args after.
connect_enbd() {
	local dev=$1 port=$2 export=$3
	shift 3
	run "$CLIENT" connect "$dev" "127.0.0.1:$port" --export "$export" --log "/tmp/enbd-client-${dev##*/}.log" "$@"
	wait_for 10 sh -c "test \$(blockdev --getsize64 $dev) != 0" || fail "$dev has no capacity after connect"
}

# Puts a server host in network namespace "srv" behind a veth pair:
# 10.99.0.1 (veth-c, this namespace) <-> 10.99.0.2 (veth-s, in srv).
setup_netns() {
	run ip netns add srv
	run ip link add veth-c type veth peer name veth-s
	run ip link set veth-s netns srv
	run ip addr add 10.99.0.1/24 dev veth-c
	run ip link set veth-c up
	run ip netns exec srv ip addr add 10.99.0.2/24 dev veth-s
	run ip netns exec srv ip link set veth-s up
	run ip netns exec srv ip link set lo up
}

# Starts enbd-server inside netns srv on 10.99.0.2:$1.
start_server_ns() {
	local port=$1
	shift
	local args=()
	for e in "$@"; do args+=(--export "$e"); done
	ip netns exec srv "$SERVER" --listen "10.99.0.2:$port" "${args[@]}" >"/tmp/enbd-server-$port.log" 2>&1 &
	SERVER_PID=$!
	wait_for 20 sh -c "ip netns exec srv ss -Hltn 'sport = :$port' | grep -q LISTEN" || fail "server in netns not listening"
}

# Starts fio in the background: random writes of 64 KiB over the first
# 256 MiB of $1, each block read back and checked (crc32c) while the run
# goes on, $2 MiB of writes in all (default 768). Mixed reads and writes.
FIO_JSON=/tmp/fio-verify.json
fio_verify_start() {
	local dev=$1 total=${2:-768}
	rm -f "$FIO_JSON" /tmp/fio.rc
	FIO_SEQ=$(kmsg_seq)
	(
		fio --name=verify --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 \
			--rw=randwrite --bs=64k --size=256M --io_size="${total}M" --randrepeat=0 \
			--verify=crc32c --verify_backlog=64 --verify_fatal=1 --do_verify=1 \
			--output-format=json --output="$FIO_JSON" >/tmp/fio.out 2>&1
		echo $? >/tmp/fio.rc
	) &
	FIO_PID=$!
}

# What a stalled data path looks like from here, for the case's log: the
# devices, the sockets, and where the helpers' and servers' threads wait.
dump_stall() {
	echo "--- stall: /proc/nbdinfo, sockets, threads"
	grep -v ' state=unconfigured\| requests=0 ' /proc/nbdinfo
	ss -tnpi
	ss -xnp | grep enbd
	local p t
	for p in $(pgrep -f 'enbd-(client|server)'); do
		echo "pid $p: $(tr '\0' ' ' <"/proc/$p/cmdline" | cut -c1-120)"
		for t in /proc/"$p"/task/*; do echo "  ${t##*/} $(cat "$t/comm") $(cat "$t/wchan")"; done
		command -v gdb >/dev/null &&
			timeout 60 gdb -p "$p" -batch -ex 'thread apply all bt 12' 2>&1 | grep -E '^(Thread|#)' | cut -c1-160
	done
}

# Waits up to $1 seconds for the fio of fio_verify_start(_at) to end (a
# stall is dumped, then fails the case), shows its output and fails if fio
# failed.
fio_wait_done() {
	wait_for "$1" test -f /tmp/fio.rc || { dump_stall; fail "fio did not finish within ${1}s"; }
	wait "$FIO_PID" 2>/dev/null
	cat /tmp/fio.out
	[ "$(cat /tmp/fio.rc)" = 0 ] || fail "fio failed (rc $(cat /tmp/fio.rc))"
}

# Prints what fio did ($FIO_JSON) and its longest stall; exits 3 on fio
# errors, 4 if the stall exceeds bound $1 ms (none if empty) plus ($2 - 1) s,
# $2 being the time factor.
fio_json_report() {
	python3 - "$FIO_JSON" "$1" "$2" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
errs = j.get("error", 0) + j.get("total_err", 0)
stall = max(j["read"]["clat_ns"]["max"], j["write"]["clat_ns"]["max"]) / 1e6
mb = (j["read"]["io_bytes"] + j["write"]["io_bytes"]) / 2**20
bound = int(sys.argv[2]) + (int(sys.argv[3]) - 1) * 1000 if sys.argv[2] else None
print(f"fio: {mb:.0f} MiB read+written, {errs} errors, longest stall {stall:.0f} ms"
      + (f" (bound {bound} ms)" if bound is not None else ""))
sys.exit(3 if errs else 4 if bound is not None and stall > bound else 0)
PY
}

# Waits up to $1 seconds for fio, times ENBD_TIME_FACTOR, and fails on any
# error it reports or a longest stall over $2 ms (when given).
fio_verify_result() {
	local factor=${ENBD_TIME_FACTOR:-1} rc=0
	fio_wait_done "$(($1 * factor))"
	fio_json_report "$2" "$factor" || rc=$?
	# What the devices saw (aged requests show as spoiled, resubmits, late
	# replies), for the post-mortem of a failure.
	[ "$rc" = 0 ] || grep -v ' state=unconfigured\| requests=0 ' /proc/nbdinfo
	[ "$rc" != 3 ] || fail "fio reported errors"
	[ "$rc" != 4 ] || fail "the longest stall exceeds the case's bound"
	[ "$rc" = 0 ] || fail "could not read fio's results ($FIO_JSON)"
}

# Waits up to $1 seconds (default 300) for fio and fails on any error. Prints
# the longest completion latency ("stall") fio saw, in ms, and fails if it
# exceeds $2 ms when given: the bound a case promises (request_timeout + 1 s,
# say). With ENBD_TIME_FACTOR (the debug kernel: a slower guest), the wait is
# multiplied by it and the bound gets (factor - 1) s more slack: timeouts run
# on the guest's clock, but everything around them is slower.
fio_verify_finish() {
	fio_verify_result "${1:-300}" "${2:-}"
	local klog
	klog=$(case_log "${FIO_SEQ:-}")
	unset FIO_SEQ
	if grep -E 'I/O error|Buffer I/O' <<<"$klog"; then
		fail "the kernel logged I/O errors"
	fi
}

# Fails the case if the fio of fio_verify_start has already ended: the fault
# ($1 says which) must meet I/O under way, or the case proves nothing.
fio_still_running() {
	[ ! -f /tmp/fio.rc ] || fail "fio ended before $1: give it more I/O"
}

# Whether device $1 (enbd0) holds requests: queued or in flight (for wait_for).
io_in_flight() {
	local q i
	q=$(proc_field "$1" queued)
	i=$(proc_field "$1" inflight)
	[ $((${q:-0} + ${i:-0})) -gt 0 ]
}

# The local ports of established connections to port $1.
channel_ports() {
	ss -Htn state established "( dport = :$1 )" | awk '{print $3}' | sed 's/.*://' | sort -n
}

# Kills one TCP connection to port $1, by local port $2.
kill_conn() {
	run ss -K state established "( dport = :$1 and sport = :$2 )"
}

# A throw-away PKI in $CERTS (see tools/mkcerts.sh).
CERTS=/tmp/certs
make_certs() {
	rm -rf "$CERTS"
	run bash "$ENBD_ROOT/tests/tools/mkcerts.sh" "$CERTS"
}

# Starts enbd-server on 127.0.0.1:$1 requiring TLS; more server arguments
# (such as --export specs) follow.
start_tls_server() {
	local port=$1
	shift
	"$SERVER" --listen "127.0.0.1:$port" --tls require --tls-cert "$CERTS/server-cert.pem" \
		--tls-key "$CERTS/server-key.pem" "$@" >"/tmp/enbd-server-$port.log" 2>&1 &
	SERVER_PID=$!
	wait_port "$port"
}

# --- Fault-case helpers: the rogue NBD server (tools/rogue-server.py), ---
# --- channel roles, timings, fio on a region. ---

ROGUE=$ENBD_ROOT/tests/tools/rogue-server.py
ROGUE_PIDS=()

# Starts rogue-server.py on 127.0.0.1:$1 serving file $2 as export "disk";
# more rogue-server options follow (--hold-write, --poison, --block-sizes,
# --no-multi-conn, --trickle, --export). Its log is $ROGUE_LOG
# (/tmp/rogue-PORT.log), its pid $ROGUE_PID. Every rogue server is stopped
# when the case exits (an EXIT trap: a case that sets its own must call
# stop_rogues in it).
start_rogue() {
	local port=$1 file=$2
	shift 2
	ROGUE_LOG=/tmp/rogue-$port.log
	rm -f "$ROGUE_LOG"
	python3 "$ROGUE" --file "$file" --listen "127.0.0.1:$port" --log "$ROGUE_LOG" "$@" 2>>"$ROGUE_LOG" &
	ROGUE_PID=$!
	ROGUE_PIDS+=("$ROGUE_PID")
	trap stop_rogues EXIT
	wait_port "$port"
}

# Stops one rogue server (default $ROGUE_PID): SIGTERM, SIGKILL after 5 s.
stop_rogue() {
	local pid=${1:-$ROGUE_PID}
	kill "$pid" 2>/dev/null || return 0
	for _ in $(seq 25); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.2
	done
	kill -9 "$pid" 2>/dev/null
	wait "$pid" 2>/dev/null
	return 0
}

stop_rogues() {
	local pid
	for pid in "${ROGUE_PIDS[@]}"; do stop_rogue "$pid"; done
}

# Waits up to $2 seconds (default 20) for a line matching $1 (grep -E) in $ROGUE_LOG.
rogue_log_wait() {
	wait_for "${2:-20}" grep -qE -- "$1" "$ROGUE_LOG"
}

# Milliseconds on a monotonic-enough clock, for measuring stalls.
now_ms() {
	echo $(($(date +%s%N) / 1000000))
}


# The channel lines of /proc/nbdinfo for device $1 (enbd0).
channel_lines() {
	grep "^$1 channel " /proc/nbdinfo
}

# One field of channel id $2 of device $1: chan_field enbd0 1 requests
chan_field() {
	channel_lines "$1" | grep " id=$2 " | tr ' ' '\n' | sed -n "s/^$3=//p" | head -n1
}

# The ids of device $1's channels with role $2 (active|reserve), one a line.
channels_with_role() {
	channel_lines "$1" | grep " role=$2\( \|$\)" | tr ' ' '\n' | sed -n 's/^id=//p'
}

# Whether device $1 has exactly $2 active and $3 reserve channels, all up
# (for wait_for).
roles_are() {
	local lines
	lines=$(channel_lines "$1")
	[ "$(grep -c ' role=active' <<<"$lines")" = "$2" ] &&
		[ "$(grep -c ' role=reserve' <<<"$lines")" = "$3" ] &&
		[ "$(grep -c ' state=up' <<<"$lines")" = "$(($2 + $3))" ]
}

# "LOCALPORT BYTES" for each established connection to port $1, BYTES being
# what it sent and received (ss bytes_acked + bytes_received), busiest first.
conn_bytes() {
	ss -Htni state established "( dport = :$1 )" | awk '
		/^[^ \t]/ { port = $3; sub(/.*:/, "", port); bytes[port] = 0; next }
		{
			for (i = 1; i <= NF; i++)
				if ($i ~ /^bytes_(acked|received):/) { split($i, a, ":"); bytes[port] += a[2] }
		}
		END { for (p in bytes) print p, bytes[p] }' | sort -k2,2nr
}

# The local port of the connection to port $1 that moved the most bytes.
busiest_port() {
	conn_bytes "$1" | head -n1 | cut -d' ' -f1
}

# The local port of a connection to port $1 that carries requests now: the
# one with the most bytes queued at either end (requests the server has not
# read yet, replies enbd has not read yet). Fails if every connection is
# empty at this instant: with demand multiplexing some channels sit idle,
# and resetting an idle one moves nothing. Both ends count because which
# one lags depends on the guest: on the slower debug kernel the server's
# side holds the queue.
loaded_port() {
	local p
	p=$(ss -Htn state established "( dport = :$1 or sport = :$1 )" |
		awk -v srv="$1" '$1 + $2 > 0 {
			l = $3; r = $4; sub(/.*:/, "", l); sub(/.*:/, "", r)
			print $1 + $2, (r == srv ? l : r)
		}' |
		sort -k1,1nr | head -n1 | cut -d' ' -f2)
	[ -n "$p" ] && echo "$p"
}

# Keeps reads in flight on every channel of device $1 (random 4 KiB reads,
# 32 deep) until read_load_stop: fio's verified writes alone leave channels
# idle most of the time, and a fault case must hit requests in flight.
read_load_start() {
	fio --name=load --filename="$1" --direct=1 --ioengine=libaio --iodepth=32 --rw=randread \
		--bs=4k --time_based --runtime=3600 --output=/tmp/fio-load.out >/dev/null 2>&1 &
	LOAD_PID=$!
}

read_load_stop() {
	kill "$LOAD_PID" 2>/dev/null
	wait "$LOAD_PID" 2>/dev/null
}

# Like loaded_port, polling for up to $2 seconds until a connection carries
# requests.
wait_loaded_port() {
	local end=$((SECONDS + $2 * ${ENBD_TIME_FACTOR:-1}))
	until loaded_port "$1"; do
		[ $SECONDS -lt $end ] || return 1
		sleep 0.05
	done
}

# Like fio_verify_start, on the $3 MiB from $2 MiB into device $1 ($4 MiB of
# writes in all, default twice the region); finish with fio_verify_finish
# or fio_verify_finish_except.
fio_verify_start_at() {
	local dev=$1 off=$2 size=$3 total=${4:-$(($3 * 2))}
	rm -f "$FIO_JSON" /tmp/fio.rc
	(
		fio --name=verify --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 \
			--rw=randwrite --bs=64k --offset="${off}M" --size="${size}M" --io_size="${total}M" \
			--randrepeat=0 --verify=crc32c --verify_backlog=64 --verify_fatal=1 --do_verify=1 \
			--output-format=json --output="$FIO_JSON" >/tmp/fio.out 2>&1
		echo $? >/tmp/fio.rc
	) &
	FIO_PID=$!
	FIO_SEQ=$(kmsg_seq)
}

# Like fio_verify_finish (the longest stall bounded by $3 ms, the wait by $4
# s), but kernel I/O errors are allowed for sectors $1 to $2 (512-byte units)
# of enbd devices, where the case provoked them.
fio_verify_finish_except() {
	local first=$1 last=$2
	fio_verify_result "${4:-300}" "$3"
	local bad
	bad=$(case_log "$FIO_SEQ" | grep -E 'I/O error|Buffer I/O' |
		awk -v lo="$first" -v hi="$last" '{
			s = -1
			for (i = 1; i < NF; i++) if ($i == "sector" || $i == "sector:") { s = $(i + 1); sub(/,$/, "", s) }
			if (s == -1 || s + 0 < lo || s + 0 > hi) print
		}')
	[ -z "$bad" ] || fail "the kernel logged I/O errors outside sectors $first-$last: $bad"
}



# Runs a command in the background and waits up to $1 seconds for it (a
# process stuck in uninterruptible I/O ignores timeout(1)). Sets BOUNDED_RC
# to its exit status and BOUNDED_MS to how long it ran; returns 1 (with
# BOUNDED_RC empty) if it is still running after $1 seconds.
run_bounded() {
	local limit=$1 f=/tmp/bounded-$$-$RANDOM.rc t0
	shift
	echo "+ $* (at most ${limit}s)" >&2
	t0=$(now_ms)
	(
		"$@"
		echo "$? $(now_ms)" >"$f"
	) &
	BOUNDED_PID=$!
	BOUNDED_RC=
	if ! wait_for "$limit" test -s "$f"; then
		BOUNDED_MS=$(($(now_ms) - t0))
		return 1
	fi
	read -r BOUNDED_RC BOUNDED_MS <"$f"
	BOUNDED_MS=$((BOUNDED_MS - t0))
	rm -f "$f"
	wait "$BOUNDED_PID" 2>/dev/null
	return 0
}

# Puts server host $1 (1..8) in network namespace r$1 behind a veth pair:
# 10.99.1$1.1 (vr$1c, here) <-> 10.99.1$1.2 (vr$1s, in r$1), $2 ms of
# delay on the server's side (the round trip gains $2 ms).
setup_replica() {
	local i=$1 ms=$2
	run ip netns add "r$i"
	run ip link add "vr${i}c" type veth peer name "vr${i}s"
	run ip link set "vr${i}s" netns "r$i"
	run ip addr add "10.99.1$i.1/24" dev "vr${i}c"
	run ip link set "vr${i}c" up
	run ip netns exec "r$i" ip addr add "10.99.1$i.2/24" dev "vr${i}s"
	run ip netns exec "r$i" ip link set "vr${i}s" up
	run ip netns exec "r$i" ip link set lo up
	run ip netns exec "r$i" tc qdisc add dev "vr${i}s" root netem delay "${ms}ms"
}

# Changes replica $1's delay to $2 ms.
replica_delay() {
	run ip netns exec "r$1" tc qdisc change dev "vr${1}s" root netem delay "${2}ms"
}

# Starts enbd-server for replica $1 on 10.99.1$1.2:10809 with export specs
# $2...; its pid goes to REPLICA_PID[$1].
declare -A REPLICA_PID
start_replica() {
	local i=$1
	shift
	local args=()
	for e in "$@"; do args+=(--export "$e"); done
	ip netns exec "r$i" "$SERVER" --listen "10.99.1$i.2:10809" "${args[@]}" >"/tmp/enbd-server-r$i.log" 2>&1 &
	REPLICA_PID[$i]=$!
	wait_for 20 sh -c "ip netns exec r$i ss -Hltn 'sport = :10809' | grep -q LISTEN" || fail "replica $i not listening"
}

# Bytes replica $1's host has sent (its veth's TX counter): counted by the
# network stack, independent of enbd's own accounting.
replica_tx() {
	ip netns exec "r$1" cat "/sys/class/net/vr${1}s/statistics/tx_bytes"
}

# The id of $1's server line with role=active, or nothing.
active_server() {
	grep "^$1 server " /proc/nbdinfo | grep ' role=active' | tr ' ' '\n' | sed -n 's/^id=//p' | head -n1
}

# A field of server $2's line of device $1: server_field enbd0 1 probes
server_field() {
	grep "^$1 server id=$2 " /proc/nbdinfo | tr ' ' '\n' | sed -n "s/^$3=//p" | head -n1
}
