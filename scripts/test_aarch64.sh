#!/usr/bin/env bash
# Runs the kernel unit tests and the decoder parity tests as aarch64 binaries under qemu-user,
# so that the NEON kernels are checked against their scalar references on an x86-64 machine.
# Not part of CI (it needs the rustup target, fetched from static.rust-lang.org).
#
#   bash scripts/test_aarch64.sh            # lib tests + tests/parity.rs, gguf.rs, multimodal.rs
#
# The binaries are linked statically: qemu-user 7.2 hangs in thread start-up of dynamically
# linked Rust binaries against Debian 12's aarch64 glibc.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    apt-get install -y -q qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi
rustup target add aarch64-unknown-linux-gnu

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc

cargo test --release --target aarch64-unknown-linux-gnu --lib --test parity --test gguf --test multimodal --test speech
