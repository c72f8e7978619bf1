# rmmod is refused while a device is open, and works once it is closed
# timeout: 60
load_enbd nr_devices=2
exec 3</dev/enbd0
must_fail "in use" rmmod enbd
grep -q '^enbd ' /proc/modules || fail "module gone while open"
# The open device still answers ioctls and the file still reads.
"$CLIENT" status enbd0 >/dev/null || fail "status while open"
exec 3<&-
# Repeatedly: open and close in the background while rmmod races it. Either
# rmmod wins (the module is gone, later opens fail) or it loses to an open
# ("in use": the module stays, and once the opener is done rmmod works).
won=0
lost=0
for round in 1 2 3 4 5; do
	( for _ in $(seq 50); do true </dev/enbd1 2>/dev/null; done ) &
	pid=$!
	rc=0
	out=$(rmmod enbd 2>&1) || rc=$?
	wait "$pid"
	if [ "$rc" = 0 ]; then
		won=$((won + 1))
		! grep -q '^enbd ' /proc/modules || fail "round $round: rmmod succeeded but enbd is still loaded"
		[ ! -e /proc/nbdinfo ] || fail "round $round: /proc/nbdinfo still there after rmmod"
	else
		lost=$((lost + 1))
		grep -qE 'in use|busy' <<<"$out" || fail "round $round: rmmod failed other than 'in use' (rc $rc): $out"
		grep -q '^enbd ' /proc/modules || fail "round $round: rmmod failed, yet enbd is gone"
		run rmmod enbd
	fi
	[ "$round" = 5 ] || load_enbd nr_devices=2
done
echo "rmmod won the race $won times, lost it (in use) $lost times"
! grep -q '^enbd ' /proc/modules || fail "enbd still loaded at the end"
[ ! -e /dev/enbd0 ] || wait_for 5 test ! -e /dev/enbd0 || fail "/dev/enbd0 remains"
