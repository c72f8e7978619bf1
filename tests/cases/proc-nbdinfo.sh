# /proc/nbdinfo lists every device with state and counters; read-only
# timeout: 60
load_enbd nr_devices=3
cat /proc/nbdinfo
expect_eq "$(stat -c %a /proc/nbdinfo)" 444 "mode of /proc/nbdinfo"
must_fail "" sh -c 'echo x > /proc/nbdinfo'
expect_eq "$(grep -c '^enbd[0-9]* state=' /proc/nbdinfo)" 3 "device lines"
expect_eq "$(grep -c '^enbd[0-9]* stats ' /proc/nbdinfo)" 3 "stats lines"
for i in 0 1 2; do
	line=$(grep "^enbd$i state=" /proc/nbdinfo)
	for key in state size blksize flags server export channels inflight; do
		grep -q " $key=" <<<"$line" || fail "enbd$i lacks $key: $line"
	done
	expect_eq "$(proc_field enbd$i size)" 0 "enbd$i size"
	expect_eq "$(proc_field enbd$i server)" - "enbd$i server"
done
# A zero-size device gets no I/O from the block layer, so nothing is counted.
dd if=/dev/enbd1 of=/dev/null bs=512 count=1 iflag=direct 2>/dev/null
stats=$(grep '^enbd1 stats' /proc/nbdinfo)
echo "$stats"
for key in requests reads writes errors resubmits late_replies token_rejects; do
	expect_eq "$(tag_field enbd1 stats $key)" 0 "enbd1 stats $key"
done
# The human-readable view comes from the same file.
run "$CLIENT" status
"$CLIENT" status enbd2 | grep -q '^/dev/enbd2: unconfigured' || fail "status enbd2"
must_fail "no device enbd7" "$CLIENT" status enbd7
unload_enbd
must_fail "is enbd.ko loaded" "$CLIENT" status
