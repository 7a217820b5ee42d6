#!/usr/bin/env bash
# The whole test suite: installs what the tests need (haproxy, iproute2,
# nftables, bird2, chromium, gdb, python3, curl, openssl, cloud-init, prometheus for
# promtool, and cargo-deb from crates.io) when missing, then checks
# formatting, lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# linux-vip drains through an nftables rule before a planned release.
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need+=(nftables)
[ -x /usr/bin/chromium ] || need+=(chromium)
# tests/haproxy_churn.rs reads the core of any haproxy worker that dies.
command -v gdb >/dev/null 2>&1 || need+=(gdb)
# tests/readme.rs runs the README's first screen: a python3 backend, curl.
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v curl >/dev/null 2>&1 || need+=(curl)
# tests/tls.rs makes its cluster's certificates with deploy/tls/clb-certs.sh.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# tests/deploy.rs validates the cloud-init recipes with cloud-init's schema.
command -v cloud-init >/dev/null 2>&1 || need+=(cloud-init)
# tests/bgp.rs runs BIRD 2 on a lab router and on every bgp-mode balancer.
[ -x /usr/sbin/bird ] || need+=(bird2)
# tests/monitoring.rs checks and unit-tests the alert rules with promtool.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# tests/packages.rs builds the Debian packages with cargo-deb.
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --version 3.8.0 --locked

cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# tests/cluster/test_upgrade.rs runs the previous release's clbd, built from
# this repository's history: build it now, alone, not beside the cluster tests.
cargo test --test cluster -- --exact test_upgrade::the_previous_release_builds
cargo test --workspace --all-targets --no-fail-fast
