# mutual TLS (rustls handshake, session in kernel TLS) under verified I/O; /proc shows tls=ktls
# timeout: 420
load_enbd
make_certs
make_backing /tmp/disk.img 256
start_tls_server 10809 --tls-client-ca "$CERTS/ca-cert.pem" --export disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2 --tls --ca "$CERTS/ca-cert.pem" \
	--cert "$CERTS/client-cert.pem" --key "$CERTS/client-key.pem"
grep '^enbd0 channel' /proc/nbdinfo
expect_eq "$(grep -c '^enbd0 channel .*tls=ktls' /proc/nbdinfo)" 2 "channels with kernel TLS"
fio_verify_start /dev/enbd0 256
fio_verify_finish
run "$CLIENT" disconnect /dev/enbd0
dev_sum=$(md5_of /tmp/disk.img 256)
[ -n "$dev_sum" ] || fail "no checksum"
