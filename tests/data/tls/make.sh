#!/usr/bin/env bash
# Makes the TLS test fixtures: a CA, a server certificate it signed for
# localhost and 127.0.0.1, and a client certificate (mutual TLS to a remote),
# valid for 100 years. Test-only keys: never use them
# anywhere else. Run from this directory: ./make.sh
set -euo pipefail
cd "$(dirname "$0")"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 36500 \
  -subj "/CN=Ferry test CA" -keyout ca.key -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=localhost" -keyout server.key -out server.csr
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 36500 \
  -out server.pem -extfile <(printf '%s\n' \
    "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    "basicConstraints=critical,CA:FALSE" \
    "extendedKeyUsage=serverAuth")
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=ferry-test-client" -keyout client.key -out client.csr
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 36500 \
  -out client.pem -extfile <(printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "extendedKeyUsage=clientAuth")
rm -f server.csr client.csr ca.srl ca.key
