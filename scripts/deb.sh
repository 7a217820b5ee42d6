#!/usr/bin/env bash
# Builds the Debian packages into target/debian/:
#   clb-server_VERSION_ARCH.deb  clbd, the template, /etc/clb/clbd.toml, units
#   clb-client_VERSION_ARCH.deb  clb, clb_register, clb_unregister, clb-agent@
# Needs cargo-deb (cargo install cargo-deb --version 3.8.0 --locked).
set -euo pipefail
cd "$(dirname "$0")/.."
# Stripped: the release profile keeps line tables for backtraces, which
# would triple the packages.
# One build of every binary for both packages: cargo deb builds only the
# binaries its own package lists, so the client's would be missing.
cargo build --release --locked --bins
cargo deb --strip --no-build "$@"
cargo deb --strip --no-build --variant client "$@"
