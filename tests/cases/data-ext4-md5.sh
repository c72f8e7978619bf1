# ext4 on /dev/enbd0 served by enbd-server: 128 MiB of random files survive sync, cache drop and disconnect
# timeout: 600
load_enbd
make_backing /tmp/disk.img 384
start_server 10809 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk
run mkfs.ext4 -q -F /dev/enbd0
mkdir -p /tmp/mnt
run mount /dev/enbd0 /tmp/mnt
sums=()
for i in 0 1 2 3; do
	head -c 32M /dev/urandom >/tmp/chunk
	sums+=("$(md5sum </tmp/chunk | cut -d' ' -f1)")
	run cp /tmp/chunk /tmp/mnt/file$i
done
rm -f /tmp/chunk
run sync
echo 3 >/proc/sys/vm/drop_caches
for i in 0 1 2 3; do
	expect_eq "$(md5sum </tmp/mnt/file$i | cut -d' ' -f1)" "${sums[$i]}" "md5 of file$i after cache drop"
done
run umount /tmp/mnt
dev_sum=$(md5sum </dev/enbd0 | cut -d' ' -f1)
grep '^enbd0' /proc/nbdinfo
run "$CLIENT" disconnect /dev/enbd0
expect_eq "$(blockdev --getsize64 /dev/enbd0)" 0 "size after disconnect"
expect_eq "$(md5sum </tmp/disk.img | cut -d' ' -f1)" "$dev_sum" "backing file vs device contents"
# The helper noticed the disconnect and left.
wait_for 5 eval '! helper_running' || fail "helper still running"
