# Helpers for the caching proxy's cases (tests/cases/proxy-*.sh), sourced
# after lib.sh. The proxy serves export d on 127.0.0.1:10810 from the cache
# directory $PROXY_CACHE.
# shellcheck shell=bash

PROXY_CACHE=/tmp/proxy-cache

# Starts the proxy, logging to $1, with the upstreams given as further
# arguments (ports on 127.0.0.1). It proxies export d, or with
# PROXY_ANY=1 any name a client asks for (--proxy-any).
start_proxy() {
	local log=$1 args=()
	shift
	for p in "$@"; do args+=(--proxy "127.0.0.1:$p"); done
	if [ "${PROXY_ANY:-0}" = 1 ]; then args+=(--proxy-any); else args+=(--proxy-export d); fi
	"$SERVER" --listen 127.0.0.1:10810 "${args[@]}" --proxy-timeout 2 \
		--cache-dir "$PROXY_CACHE" >"$log" 2>&1 &
	PROXY_PID=$!
	wait_port 10810
}

# An upstream enbd-server on 127.0.0.1:10809 serving export d: image $1,
# $2 MiB of random data, with its checksum sidecar (so it serves d.crc
# too). Sets UPSTREAM_SUM (the image's md5) and UPSTREAM_PID.
start_checked_upstream() {
	make_backing "$1" "$2"
	UPSTREAM_SUM=$(write_random "$1" "$2")
	rm -f "/tmp/random-$2.bin" # /tmp is small
	run "$SERVER" checksum "$1"
	start_server 10809 "d=$1,ro,crc"
	UPSTREAM_PID=$SERVER_PID
}

stop_proxy() {
	kill "$PROXY_PID"
	wait "$PROXY_PID" 2>/dev/null
}

# Field $2 of the last counter line in proxy log $1, the line the proxy logs
# at each client disconnect: "proxy d: N bytes from upstream, M bytes from
# cache, C corrupt cache chunk(s) refetched, B bad upstream block(s), ...".
# $2 is upstream (N), cache (M), corrupt (C) or bad (B).
counter() {
	local line
	line=$(grep -E 'proxy d: [0-9]+ bytes from upstream' "$1" | tail -n1)
	[ -n "$line" ] || fail "no counter line in $1"
	case $2 in
	upstream) sed -E 's/.*proxy d: ([0-9]+) bytes from upstream.*/\1/' <<<"$line" ;;
	cache) sed -E 's/.*, ([0-9]+) bytes from cache.*/\1/' <<<"$line" ;;
	corrupt) sed -E 's/.*, ([0-9]+) corrupt cache chunk.*/\1/' <<<"$line" ;;
	bad) sed -E 's/.*, ([0-9]+) bad upstream block.*/\1/' <<<"$line" ;;
	*) fail "counter: unknown field $2" ;;
	esac
}

# Connects /dev/enbd0 to the proxy, checks the md5 of its first $2 MiB
# against $3, disconnects, and waits for the proxy's counter line of that
# session in its log $1. $4 names the read in messages.
read_through_proxy() {
	local log=$1 mib=$2 want=$3 what=$4 before
	connect_enbd /dev/enbd0 10810 d
	expect_eq "$(md5_of /dev/enbd0 "$mib")" "$want" "md5 of the $what read through the proxy"
	before=$(grep -c 'bytes from upstream' "$log")
	run "$CLIENT" disconnect /dev/enbd0
	wait_for 20 sh -c "[ \$(grep -c 'bytes from upstream' '$log') -gt $before ]" ||
		fail "the proxy logged no counters after the $what read"
}

# XORs the byte at offset $2 of file $1 with 0x40.
flip_byte() {
	local b
	b=$(dd if="$1" bs=1 skip="$2" count=1 status=none | od -An -tu1 | tr -d ' ')
	# shellcheck disable=SC2059 # the format is the byte, as an octal escape
	printf "\\$(printf %03o $((b ^ 0x40)))" | dd of="$1" bs=1 seek="$2" count=1 conv=notrunc status=none ||
		fail "cannot flip byte $2 of $1"
}
