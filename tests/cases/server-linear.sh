# a linear export over components of different sizes: data written through /dev/enbd0 reads back, and each component holds exactly its part
# timeout: 240
# Components of 20 MiB, 12 MiB + 64 KiB and 9 MiB, end to end: 41 MiB +
# 64 KiB, every byte used. The first is a block device (a loop device).
files=(/tmp/lin-a.img /tmp/lin-b.img /tmp/lin-c.img)
sizes=($((20 << 20)) $(((12 << 20) + 65536)) $((9 << 20)))
size=$((sizes[0] + sizes[1] + sizes[2]))
for i in 0 1 2; do run truncate -s "${sizes[$i]}" "${files[$i]}"; done
loop=$(losetup --find --show "${files[0]}") || fail "losetup failed"
trap 'losetup -d "$loop"' EXIT
comps=("$loop" "${files[1]}" "${files[2]}")
load_enbd
start_server 10809 "l=linear:${comps[0]},${comps[1]},${comps[2]},desc=three disks"
connect_enbd /dev/enbd0 10809 l --channels 2
expect_eq "$(blockdev --getsize64 /dev/enbd0)" "$size" "export size (the sum of the components)"

head -c "$size" /dev/urandom >/tmp/lin-ref.bin
run dd if=/tmp/lin-ref.bin of=/dev/enbd0 bs=64K oflag=direct conv=notrunc status=none
# Zeroes across the first boundary; then 8 KiB writes across each
# boundary, with O_SYNC (the first overwrites some of the zeroes).
run blkdiscard -z -o $((sizes[0] - 65536)) -l $((2 * 65536)) /dev/enbd0
run dd if=/dev/zero of=/tmp/lin-ref.bin bs=65536 seek=$((sizes[0] / 65536 - 1)) count=2 conv=notrunc status=none
for b in "${sizes[0]}" $((sizes[0] + sizes[1])); do
	head -c 8192 /dev/urandom >/tmp/lin-patch.bin
	run dd if=/tmp/lin-patch.bin of=/dev/enbd0 bs=8192 seek=$((b - 4096)) oflag=seek_bytes,direct,sync conv=notrunc status=none
	run dd if=/tmp/lin-patch.bin of=/tmp/lin-ref.bin bs=8192 seek=$((b - 4096)) oflag=seek_bytes conv=notrunc status=none
done
sum=$(md5sum </tmp/lin-ref.bin | cut -d' ' -f1)
echo 3 >/proc/sys/vm/drop_caches
expect_eq "$(dd if=/dev/enbd0 bs=64K iflag=direct status=none | md5sum | cut -d' ' -f1)" "$sum" "md5 of /dev/enbd0"
run "$CLIENT" disconnect /dev/enbd0

# The layout on disk: each component is its slice of the image, whole.
start=0
for i in 0 1 2; do
	expect_eq "$(stat -L -c %s "${files[$i]}")" "${sizes[$i]}" "size of ${files[$i]}"
	cmp -n "${sizes[$i]}" -i "$start:0" /tmp/lin-ref.bin "${comps[$i]}" ||
		fail "${comps[$i]} does not hold bytes $start.. of the image"
	start=$((start + sizes[i]))
done
# The boundary pieces by hand: the last 4 KiB of the first component is the
# 4 KiB before the boundary, the second's first 4 KiB the 4 KiB after it.
expect_eq "$(dd if="${comps[0]}" bs=4096 skip=$((sizes[0] / 4096 - 1)) count=1 status=none | md5sum)" \
	"$(dd if=/tmp/lin-ref.bin bs=4096 skip=$((sizes[0] / 4096 - 1)) count=1 status=none | md5sum)" "last 4 KiB of ${comps[0]}"
expect_eq "$(dd if="${comps[1]}" bs=4096 count=1 status=none | md5sum)" \
	"$(dd if=/tmp/lin-ref.bin bs=4096 skip=$((sizes[0] / 4096)) count=1 status=none | md5sum)" "first 4 KiB of ${comps[1]}"
