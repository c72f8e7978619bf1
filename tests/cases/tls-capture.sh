# a capture on the wire shows a written plaintext pattern without TLS, and none of it with TLS
# timeout: 300
load_enbd
make_certs
make_backing /tmp/disk.img 64
python3 -c "import sys; sys.stdout.write(('ENBD-CANARY-%08d;' % 0) * 4096)" | head -c 1048576 >/tmp/canary.bin
canary_count() {
	python3 -c "import sys; print(open(sys.argv[1],'rb').read().count(b'ENBD-CANARY-00000000'))" "$1"
}
capture_write() { # port pcap
	tcpdump -i lo -U -s 0 -w "$2" "tcp port $1" 2>/dev/null &
	local cap=$!
	sleep 2
	run dd if=/tmp/canary.bin of=/dev/enbd0 bs=1M oflag=direct conv=notrunc status=none
	run dd if=/dev/enbd0 of=/dev/null bs=1M count=1 iflag=direct status=none
	sleep 2
	kill -INT "$cap"
	wait "$cap" 2>/dev/null
}
# Without TLS the pattern must be visible: this proves the capture works.
start_server 10810 disk=/tmp/disk.img
connect_enbd /dev/enbd0 10810 disk
capture_write 10810 /tmp/plain.pcap
run "$CLIENT" disconnect /dev/enbd0
plain=$(canary_count /tmp/plain.pcap)
echo "plaintext capture: $plain canaries"
[ "$plain" -gt 100 ] || fail "the plaintext capture does not show the pattern ($plain): capture broken"
# The TLS server below serves the same image, which this one has locked.
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null
start_tls_server 10809 --export disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --tls --ca "$CERTS/ca-cert.pem"
capture_write 10809 /tmp/tls.pcap
run "$CLIENT" disconnect /dev/enbd0
[ "$(stat -c %s /tmp/tls.pcap)" -gt 1000000 ] || fail "the TLS capture is too small to have seen the write"
expect_eq "$(canary_count /tmp/tls.pcap)" 0 "canaries in the TLS capture"
