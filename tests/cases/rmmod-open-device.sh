# rmmod is refused while a device is open, and works once it is closed
# timeout: 60
load_enbd nr_devices=2
exec 3</dev/enbd0
must_fail "in use" rmmod enbd
grep -q '^enbd ' /proc/modules || fail "module gone while open"
# The open device still answers ioctls and the file still reads.
"$CLIENT" status enbd0 >/dev/null || fail "status while open"
exec 3<&-
# Repeatedly: open and close in the background while rmmod races it.
for round in 1 2 3; do
	( for _ in $(seq 50); do true </dev/enbd1 2>/dev/null; done ) &
	pid=$!
	rmmod enbd 2>/dev/null && { wait $pid; load_enbd nr_devices=2; continue; }
	wait $pid
done
unload_enbd
[ ! -e /dev/enbd0 ] || fail "/dev/enbd0 remains"
