# mutual TLS (rustls handshake, session in kernel TLS) under verified I/O; /proc shows tls=ktls
# timeout: 420
load_enbd
make_certs
make_backing /tmp/disk.img 64
start_tls_server 10809 --tls-client-ca "$CERTS/ca-cert.pem" --export disk=/tmp/disk.img
connect_enbd /dev/enbd0 10809 disk --channels 2 --tls --ca "$CERTS/ca-cert.pem" \
	--cert "$CERTS/client-cert.pem" --key "$CERTS/client-key.pem"
grep '^enbd0 channel' /proc/nbdinfo
expect_eq "$(grep -c '^enbd0 channel .*tls=ktls' /proc/nbdinfo)" 2 "channels with kernel TLS"
# The whole 64 MiB device, written and verified once: TLS runs at a few
# MB/s under TCG.
fio_verify_start_at /dev/enbd0 0 64 64
# No fault here: no request may even age (request_timeout, 30 s by default).
fio_verify_finish 300 30000
# Known data over TLS: what was written, what the device reads back and what
# the server stored must be the same bytes.
empty=$(md5sum </dev/null | cut -d' ' -f1)
sum=$(write_random /dev/enbd0 32)
expect_eq "$(md5_of /dev/enbd0 32)" "$sum" "data read back over TLS"
dev_sum=$(md5_of /dev/enbd0 64)
[ "$dev_sum" != "$empty" ] || fail "could not read /dev/enbd0 back"
run "$CLIENT" disconnect /dev/enbd0
expect_eq "$(md5_of /tmp/disk.img 32)" "$sum" "server file: the data written over TLS"
expect_eq "$(md5_of /tmp/disk.img 64)" "$dev_sum" "server file vs the whole device read back over TLS"
