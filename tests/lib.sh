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

# Channel-up messages the kernel logged since the case began.
channels_started() {
	dmesg | tail -n +"$((CASE_DMESG + 1))" | grep -c 'enbd0: channel [0-9]* up'
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
	(
		fio --name=verify --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 \
			--rw=randwrite --bs=64k --size=256M --io_size="${total}M" --randrepeat=0 \
			--verify=crc32c --verify_backlog=64 --verify_fatal=1 --do_verify=1 \
			--output-format=json --output="$FIO_JSON" >/tmp/fio.out 2>&1
		echo $? >/tmp/fio.rc
	) &
	FIO_PID=$!
	DMESG_MARK=$(dmesg | wc -l)
}

# Waits for fio, fails on any error, and prints the longest completion
# latency ("stall") it saw, in ms.
fio_verify_finish() {
	local limit=${1:-300}
	wait_for "$limit" test -f /tmp/fio.rc || fail "fio did not finish within ${limit}s"
	wait "$FIO_PID" 2>/dev/null
	cat /tmp/fio.out
	[ "$(cat /tmp/fio.rc)" = 0 ] || fail "fio failed (rc $(cat /tmp/fio.rc))"
	python3 - "$FIO_JSON" <<'PY' || fail "fio reported errors"
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
errs = j.get("error", 0) + j.get("total_err", 0)
stall = max(j["read"]["clat_ns"]["max"], j["write"]["clat_ns"]["max"]) / 1e6
mb = (j["read"]["io_bytes"] + j["write"]["io_bytes"]) / 2**20
print(f"fio: {mb:.0f} MiB read+written, {errs} errors, longest stall {stall:.0f} ms")
sys.exit(1 if errs else 0)
PY
	if dmesg | tail -n +"$((DMESG_MARK + 1))" | grep -E 'I/O error|Buffer I/O'; then
		fail "the kernel logged I/O errors"
	fi
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
