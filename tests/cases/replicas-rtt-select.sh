# three read-only replicas at 5, 20 and 40 ms: the 5 ms one carries at least 80% of the bytes; 60 ms more on it moves the I/O to the 20 ms one within two probe rounds, and it stays there
# timeout: 600
# Bytes are counted twice: by enbd (/proc/nbdinfo, per server) and by each
# replica host's network stack (its veth's TX counter), which the shares
# are computed from. The switch is timed in probe rounds: the number of
# probes of the slowed server between the change and the switch, read from
# the same /proc/nbdinfo snapshot that first shows the switch.
load_enbd request_timeout=10
head -c 64M /dev/urandom >/tmp/replica.img
img_sum=$(md5sum </tmp/replica.img | cut -d' ' -f1)
delay=([1]=5 [2]=20 [3]=40)
for i in 1 2 3; do
	setup_replica "$i" "${delay[$i]}"
	start_replica "$i" disk=/tmp/replica.img,ro
done
run "$CLIENT" connect /dev/enbd0 10.99.11.2 10.99.12.2 10.99.13.2 --export disk \
	--probe-max 4 --log /tmp/enbd-client-enbd0.log
# The first rounds may misjudge on a busy guest (the debug kernel's);
# the averages settle on the 5 ms server.
t0=$SECONDS
wait_for $((30 * ${ENBD_TIME_FACTOR:-1})) sh -c 'grep "^enbd0 server " /proc/nbdinfo | grep -q "id=0 .*role=active"' ||
	fail "the 5 ms server was not chosen: $(grep '^enbd0 server' /proc/nbdinfo)"
echo "the 5 ms server carries the I/O $((SECONDS - t0)) s after connect"
grep '^enbd0' /proc/nbdinfo
expect_eq "$(proc_field enbd0 channels)" 3 "channels (one per server)"
expect_eq "$(grep '^enbd0 channel ' /proc/nbdinfo | grep -c 'role=standby')" 2 "standby channels"

# Share of the bytes each replica host sent during a QD8 random read.
shares() {
	local i
	for i in 1 2 3; do echo "$(($(replica_tx "$i") - ${tx0[$i]}))"; done | python3 -c '
import sys
b = [int(x) for x in sys.stdin.read().split()]
t = sum(b) or 1
print(" ".join(str(round(100 * x / t)) for x in b))'
}
declare -A tx0
for i in 1 2 3; do tx0[$i]=$(replica_tx "$i"); done
run python3 "$ENBD_ROOT/tests/tools/readverify.py" /dev/enbd0 /tmp/replica.img --seconds 20 --threads 8
read -r s1 s2 s3 <<<"$(shares)"
echo "bytes sent by the replicas at 5/20/40 ms: $s1% $s2% $s3%"
grep '^enbd0 server' /proc/nbdinfo
[ "$s1" -ge 80 ] || fail "the 5 ms replica sent $s1% of the bytes, not at least 80%"

# 60 ms more on the chosen server.
p0=$(server_field enbd0 0 probes)
replica_delay 1 65
t0=$SECONDS
snap=""
until [ $((SECONDS - t0)) -ge $((60 * ${ENBD_TIME_FACTOR:-1})) ]; do
	snap=$(grep '^enbd0 server ' /proc/nbdinfo)
	grep -q '^enbd0 server id=1 .* role=active' <<<"$snap" && break
	sleep 0.2
done
echo "$snap"
grep -q '^enbd0 server id=1 .* role=active' <<<"$snap" ||
	fail "the I/O did not move to the 20 ms server within $((60 * ${ENBD_TIME_FACTOR:-1})) s"
p1=$(grep '^enbd0 server id=0 ' <<<"$snap" | tr ' ' '\n' | sed -n 's/^probes=//p')
echo "switched after $((SECONDS - t0)) s and $((p1 - p0)) probe round(s) of the slowed server"
# Two rounds after the change, plus the one that may have been under way
# (its probe of server 0 possibly taken before the delay). On the debug
# kernel every probe's RTT carries tens of ms of the guest's own slowness
# (the 5 ms server measures 30-40 ms there), which blurs the 60 ms step:
# there the switch gets ENBD_TIME_FACTOR times the rounds (measured: 4).
max_rounds=$((3 * ${ENBD_TIME_FACTOR:-1}))
[ $((p1 - p0)) -le "$max_rounds" ] ||
	fail "the switch took $((p1 - p0)) probe rounds, more than $max_rounds (two, plus one under way, on the default kernel)"

# It stays there, and the I/O follows.
for i in 1 2 3; do tx0[$i]=$(replica_tx "$i"); done
run python3 "$ENBD_ROOT/tests/tools/readverify.py" /dev/enbd0 /tmp/replica.img --seconds 15 --threads 8
read -r s1 s2 s3 <<<"$(shares)"
echo "after the switch: $s1% $s2% $s3%"
expect_eq "$(active_server enbd0)" 1 "chosen server 15 s after the switch"
[ "$s2" -ge 80 ] || fail "the 20 ms replica sent $s2% of the bytes after the switch, not at least 80%"
grep -q 'I/O moves to 10.99.12.2' /tmp/enbd-client-enbd0.log || fail "the helper did not log the switch"
expect_eq "$(md5_of /dev/enbd0 64)" "$img_sum" "md5 of the device"
expect_eq "$(tag_field enbd0 stats errors)" 0 "I/O errors"
run "$CLIENT" disconnect /dev/enbd0
