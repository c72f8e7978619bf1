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
	wait_for 10 test "$(blockdev --getsize64 "$dev")" != 0 || fail "$dev has no capacity after connect"
}
