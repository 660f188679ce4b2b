#!/bin/sh
# Test credentials for TLS (NBD: test/export/nbd-tls.test.ts; the control API:
# test/service/service-tls.test.ts, reloads: test/export/nbd-tls-access.test.ts and
# test/service/service-reload.test.ts), in the folder layouts qemu's
# tls-creds-x509 and libnbd's tls-certificates read. Made once and committed (valid 100 years);
# run again to replace them. Never use them for anything but tests.
set -eu
cd "$(dirname "$0")"
rm -rf server client stranger revoked server-crl renewed old-crl other-crl san && mkdir server client stranger revoked server-crl renewed old-crl other-crl san
t=$(mktemp -d) && trap 'rm -rf "$t"' EXIT
ca() { # name subject
  openssl req -x509 -newkey rsa:2048 -nodes -days 36500 -subj "/CN=$2" -keyout "$t/$1.key" -out "$t/$1.pem" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}
leaf() { # ca out-key out-cert subject extensions
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$4" -keyout "$2" -out "$t/req.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" "$5" > "$t/ext"
  openssl x509 -req -in "$t/req.csr" -CA "$t/$1.pem" -CAkey "$t/$1.key" -CAcreateserial -days 36500 -extfile "$t/ext" -out "$3" 2>/dev/null
}
ca ca 'offload test CA'
ca other 'another CA'
leaf ca server/server-key.pem server/server-cert.pem localhost 'extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1'
# The same server's certificate renewed (a new key, the same CA and names): what a reload picks up.
leaf ca renewed/server-key.pem renewed/server-cert.pem localhost 'extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1'
leaf ca client/client-key.pem client/client-cert.pem alice 'extendedKeyUsage=clientAuth'
leaf other stranger/client-key.pem stranger/client-cert.pem mallory 'extendedKeyUsage=clientAuth'
leaf ca revoked/client-key.pem revoked/client-cert.pem eve 'extendedKeyUsage=clientAuth'
# A client certificate named only by its subject alternative names (no common name), as SPIFFE and cert-manager issue them.
openssl req -newkey rsa:2048 -nodes -subj "/O=offload test" -keyout san/client-key.pem -out "$t/req.csr" 2>/dev/null
printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=clientAuth" "subjectAltName=URI:spiffe://offload.test/kvm9,DNS:kvm9.example" > "$t/ext"
openssl x509 -req -in "$t/req.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial -days 36500 -extfile "$t/ext" -out san/client-cert.pem 2>/dev/null
cp "$t/ca.pem" san/ca-cert.pem
cp "$t/ca.pem" server/ca-cert.pem && cp "$t/ca.pem" renewed/ca-cert.pem && cp "$t/ca.pem" client/ca-cert.pem && cp "$t/ca.pem" stranger/ca-cert.pem && cp "$t/ca.pem" revoked/ca-cert.pem
# A server folder whose ca-crl.pem revokes eve's certificate (and only hers).
cp server/* server-crl/
touch "$t/index.txt"
printf '%s\n' '[ca]' 'default_ca=d' '[d]' "database=$t/index.txt" 'default_md=sha256' "crlnumber=$t/crlnumber" > "$t/ca.cnf"
echo 01 > "$t/crlnumber"
# The same CA's list as it was before eve was revoked (issued in 2020): a reload must not take it
# back in place of the newer one. And a list of another CA.
openssl ca -config "$t/ca.cnf" -keyfile "$t/ca.key" -cert "$t/ca.pem" -gencrl -crl_lastupdate 20200101000000Z -crldays 36500 -out old-crl/ca-crl.pem 2>/dev/null
openssl ca -config "$t/ca.cnf" -keyfile "$t/ca.key" -cert "$t/ca.pem" -revoke revoked/client-cert.pem 2>/dev/null
openssl ca -config "$t/ca.cnf" -keyfile "$t/ca.key" -cert "$t/ca.pem" -gencrl -crldays 36500 -out server-crl/ca-crl.pem 2>/dev/null
: > "$t/other-index.txt"
sed "s#$t/index.txt#$t/other-index.txt#" "$t/ca.cnf" > "$t/other.cnf"
openssl ca -config "$t/other.cnf" -keyfile "$t/other.key" -cert "$t/other.pem" -gencrl -crldays 36500 -out other-crl/ca-crl.pem 2>/dev/null
cp "$t/other.pem" other-crl/ca-cert.pem # a CA rotated: the other CA with its own list
