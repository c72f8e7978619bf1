# enbd-server's LIST descriptions, announced features, NBD_CMD_CACHE and FAST_ZERO, seen from libnbd, qemu-io and a raw client
# timeout: 120
make_backing /tmp/disk.img 16
head -c 1048576 /dev/urandom >/tmp/mib.bin
dd if=/tmp/mib.bin of=/tmp/disk.img conv=notrunc status=none
start_server 10809 "disk=/tmp/disk.img,desc=the test disk" "iso=/tmp/disk.img,ro,shared"
url=nbd://127.0.0.1:10809/disk
# LIST carries the descriptions.
nbdinfo --list nbd://127.0.0.1:10809 | tee /tmp/list.txt >&2
grep -q 'description: the test disk' /tmp/list.txt || fail "LIST lacks the description"
# What libnbd negotiated and sees announced.
nbdinfo "$url" | tee /tmp/info.txt >&2
for f in 'using structured packets' 'base:allocation' 'can_cache: true' 'can_fast_zero: true' \
	'can_df: true' 'can_zero: true'; do
	grep -q "$f" /tmp/info.txt || fail "nbdinfo does not show '$f'"
done
nbdinfo nbd://127.0.0.1:10809/iso | grep -q 'can_cache: true' || fail "no CACHE on a read-only export"
tool=$ENBD_ROOT/tests/tools/nbdcmd.py
# CACHE: in range it succeeds (also read-only), past the end EINVAL (22).
expect_eq "$(python3 "$tool" 127.0.0.1 10809 disk cache 0 16777216)" 0 "CACHE of the whole export"
expect_eq "$(python3 "$tool" 127.0.0.1 10809 iso cache 4096 65536)" 0 "CACHE on the read-only export"
expect_eq "$(python3 "$tool" 127.0.0.1 10809 disk cache 16773120 8192)" 22 "CACHE past the end"
# FAST_ZERO that may punch a hole is fast on any file system that punches.
expect_eq "$(python3 "$tool" 127.0.0.1 10809 disk fast-zero 0 65536)" 0 "FAST_ZERO with a hole allowed"
run qemu-io -f raw -c 'write -z -n -u 65536 65536' "$url"
run qemu-io -f raw -c 'read -P 0 0 131072' "$url"
# FAST_ZERO with NO_HOLE needs FALLOC_FL_ZERO_RANGE: tmpfs has none, so
# the server must refuse it with ENOTSUP (95) and leave the data alone;
# elsewhere it may succeed, and then the range reads as zeroes.
zr=$(python3 "$tool" 127.0.0.1 10809 disk fast-zero 131072 65536 no-hole)
echo "FAST_ZERO|NO_HOLE on $(stat -f -c %T /tmp): $zr" >&2
if [ "$(stat -f -c %T /tmp)" = tmpfs ]; then
	expect_eq "$zr" 95 "FAST_ZERO|NO_HOLE on tmpfs"
	must_fail "Operation not supported" qemu-io -f raw -c 'write -z -n 196608 65536' "$url"
	# Nothing was written: the data is still there.
	expect_eq "$(dd if=/tmp/disk.img bs=64K skip=2 count=2 status=none | md5sum)" \
		"$(dd if=/tmp/mib.bin bs=64K skip=2 count=2 status=none | md5sum)" "data after refused fast zeroes"
else
	case $zr in
	0) run qemu-io -f raw -c 'read -P 0 131072 65536' "$url" ;;
	95) ;;
	*) fail "FAST_ZERO|NO_HOLE answered $zr" ;;
	esac
fi
# The rest of the data is untouched.
expect_eq "$(dd if=/tmp/disk.img bs=256K skip=1 count=3 status=none | md5sum)" \
	"$(dd if=/tmp/mib.bin bs=256K skip=1 count=3 status=none | md5sum)" "data after the zeroed range"
kill -0 "$SERVER_PID" || fail "server died"
