#!/usr/bin/env bash
# Makes the TLS test fixtures: a CA and a server certificate it signed, for
# localhost and 127.0.0.1, valid for 100 years. Test-only keys: never use them
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
rm -f server.csr ca.srl ca.key
