# wrong CA, expired certificate, missing client certificate and plaintext-to-require are each refused clearly
# timeout: 300
load_enbd
make_certs
make_backing /tmp/disk.img 16
start_tls_server 10809 --export disk=/tmp/disk.img
must_fail "invalid peer certificate.*UnknownIssuer" "$CLIENT" connect /dev/enbd0 127.0.0.1:10809 --export disk --tls --ca "$CERTS/other-ca-cert.pem"
must_fail "the server requires TLS" "$CLIENT" connect /dev/enbd0 127.0.0.1:10809 --export disk
must_fail "invalid peer certificate" "$CLIENT" connect /dev/enbd0 127.0.0.1:10809 --export disk --tls --ca "$CERTS/ca-cert.pem" --tls-hostname wrong.example
must_fail "cannot read certificates" "$CLIENT" connect /dev/enbd0 127.0.0.1:10809 --export disk --tls --ca /nonexistent.pem
kill "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null
"$SERVER" --listen 127.0.0.1:10811 --tls-cert "$CERTS/expired-cert.pem" --tls-key "$CERTS/server-key.pem" \
	--export disk=/tmp/disk.img >/tmp/expired.log 2>&1 &
expired=$!
wait_port 10811
must_fail "invalid peer certificate: certificate expired" "$CLIENT" connect /dev/enbd0 127.0.0.1:10811 --export disk --tls --ca "$CERTS/ca-cert.pem"
# The next server serves the same image, which this one has locked.
kill "$expired"
wait "$expired" 2>/dev/null
start_tls_server 10812 --tls-client-ca "$CERTS/ca-cert.pem" --export disk=/tmp/disk.img
must_fail "client certificate.*CertificateRequired" "$CLIENT" connect /dev/enbd0 127.0.0.1:10812 --export disk --tls --ca "$CERTS/ca-cert.pem"
# with the client certificate, the same server accepts us
run "$CLIENT" connect /dev/enbd0 127.0.0.1:10812 --export disk --tls --ca "$CERTS/ca-cert.pem" --cert "$CERTS/client-cert.pem" --key "$CERTS/client-key.pem"
expect_eq "$(proc_field enbd0 state)" connected "state with a client certificate"
run "$CLIENT" disconnect /dev/enbd0
must_fail "needs --tls-cert" "$SERVER" --tls require --export disk=/tmp/disk.img --listen 127.0.0.1:10899
expect_eq "$(proc_field enbd0 state)" unconfigured "state after refusals and disconnect"
