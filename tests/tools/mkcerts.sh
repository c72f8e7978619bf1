#!/usr/bin/env bash
# Makes a throw-away PKI for the TLS tests in directory $1:
#   ca-cert.pem ca-key.pem          the test CA
#   server-cert.pem server-key.pem  for localhost, 127.0.0.1 and 10.99.0.2
#   client-cert.pem client-key.pem  for mutual TLS
#   expired-cert.pem                server certificate that expired in 2020
#   other-ca-cert.pem               an unrelated CA (to test a wrong --ca)
# Also the GnuTLS layout nbdkit and qemu-nbd read (ca-cert.pem,
# server-cert.pem, server-key.pem in one directory) is this directory.
set -euo pipefail
d=$1
mkdir -p "$d"
cd "$d"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout ca-key.pem -out ca-cert.pem -days 30 -subj /CN=enbd-test-ca 2>/dev/null
openssl req -x509 "${ec[@]}" -keyout other-ca-key.pem -out other-ca-cert.pem -days 30 -subj /CN=unrelated-ca 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:10.99.0.2\nextendedKeyUsage=serverAuth\n' >server.ext
printf 'extendedKeyUsage=clientAuth\n' >client.ext
openssl req "${ec[@]}" -keyout server-key.pem -out server.csr -subj /CN=localhost 2>/dev/null
openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
	-out server-cert.pem -days 30 -extfile server.ext 2>/dev/null
openssl req "${ec[@]}" -keyout client-key.pem -out client.csr -subj /CN=enbd-client 2>/dev/null
openssl x509 -req -in client.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
	-out client-cert.pem -days 30 -extfile client.ext 2>/dev/null
# A certificate valid only in January 2020, signed by the same CA.
: >index.txt
echo 1000 >serial
cat >ca.cnf <<CNF
[ ca ]
default_ca = test
[ test ]
dir = .
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
[ any ]
commonName = supplied
CNF
openssl ca -batch -config ca.cnf -cert ca-cert.pem -keyfile ca-key.pem -in server.csr \
	-out expired-cert.pem -startdate 20200101000000Z -enddate 20200201000000Z -extfile server.ext 2>/dev/null
chmod 600 ./*-key.pem
