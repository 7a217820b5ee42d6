#!/usr/bin/env bash
# Makes the certificates a clb cluster serves its two ports with: one CA and,
# for every node, a certificate naming the addresses peers and clients reach
# it by (peers check each other's against the CA; so do clients given
# CLB_CA). Run once, on the operator's machine, with openssl:
#
#   bash deploy/tls/clb-certs.sh DIR NAME=ADDR[,ADDR...] ...
#   bash deploy/tls/clb-certs.sh pki node1=10.0.1.10 node2=10.0.2.10 node3=10.0.3.10
#
# Writes DIR/ca.crt and DIR/ca.key (made once: run it again to add nodes or
# renew their certificates under the same CA), DIR/NAME.crt and DIR/NAME.key.
# Keep ca.key off the instances. Keys are P-256, node certificates valid for
# CLB_CERT_DAYS (default 825) days, the CA for 10 years.
set -euo pipefail

usage() {
  echo "usage: clb-certs.sh DIR NAME=ADDR[,ADDR...] ... (ADDR: an IP address or DNS name)" >&2
  exit 2
}
[ $# -ge 2 ] || usage
command -v openssl >/dev/null || { echo "clb-certs.sh: openssl is not installed" >&2; exit 1; }
dir=$1
shift
days=${CLB_CERT_DAYS:-825}
[[ $days =~ ^[1-9][0-9]*$ ]] || { echo "clb-certs.sh: CLB_CERT_DAYS must be a number of days" >&2; exit 2; }

# Check every argument before writing anything.
for spec in "$@"; do
  name=${spec%%=*}
  addrs=${spec#*=}
  if [[ $spec != *=* || ! $name =~ ^[A-Za-z0-9._-]+$ || ! $addrs =~ ^[A-Za-z0-9.:,-]+$ ]]; then
    echo "clb-certs.sh: '$spec' is not NAME=ADDR[,ADDR...]" >&2
    usage
  fi
done

mkdir -p "$dir"
umask 077
if [ ! -e "$dir/ca.key" ]; then
  openssl req -x509 -new -noenc -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -days 3650 -subj "/CN=clb cluster CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  echo "made $dir/ca.crt and $dir/ca.key"
fi

for spec in "$@"; do
  name=${spec%%=*}
  addrs=${spec#*=}
  san=""
  for a in ${addrs//,/ }; do
    # An address with a colon, or of digits and dots only, is an IP.
    if [[ $a == *:* || $a =~ ^[0-9.]+$ ]]; then san+="IP:$a,"; else san+="DNS:$a,"; fi
  done
  ext=$(mktemp)
  printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' \
    "${san%,}" >"$ext"
  openssl req -new -noenc -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$name" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$ext" \
    -out "$dir/$name.crt" 2>/dev/null
  rm -f "$ext" "$dir/$name.csr"
  echo "made $dir/$name.crt and $dir/$name.key for ${san%,}"
done
chmod 644 "$dir"/*.crt
