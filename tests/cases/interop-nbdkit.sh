# enbd as the client of nbdkit (file and memory plugins)
# timeout: 180
load_enbd
make_backing /tmp/k.img 64
nbdkit -i 127.0.0.1 -p 10811 file /tmp/k.img || fail "nbdkit file failed"
nbdkit -i 127.0.0.1 -p 10812 memory 64M || fail "nbdkit memory failed"
wait_port 10811
wait_port 10812
connect_enbd /dev/enbd0 10811 "" --channels 2
sum=$(write_random /dev/enbd0 32)
expect_eq "$(md5_of /dev/enbd0 32)" "$sum" "read back (file plugin)"
run blkdiscard -o 0 -l 1048576 /dev/enbd0
expect_eq "$(dd if=/dev/enbd0 bs=1M count=1 iflag=direct status=none | tr -d '\0' | wc -c)" 0 "discarded range reads zeroes"
run "$CLIENT" disconnect /dev/enbd0
expect_eq "$(dd if=/tmp/k.img bs=1M skip=1 count=31 status=none | md5sum | cut -d' ' -f1)" \
	"$(dd if=/tmp/random-32.bin bs=1M skip=1 count=31 status=none | md5sum | cut -d' ' -f1)" "file contents"
connect_enbd /dev/enbd1 10812 ""
sum=$(write_random /dev/enbd1 32)
echo 3 >/proc/sys/vm/drop_caches
expect_eq "$(md5_of /dev/enbd1 32)" "$sum" "read back (memory plugin)"
run "$CLIENT" disconnect /dev/enbd1
