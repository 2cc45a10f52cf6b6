#!/usr/bin/env bash
# The whole test suite: the API docs (rustdoc warnings denied), unit,
# property, doc and integration tests (real KVM), then the loom and shuttle
# model checks of the lock-free parts of `mm` and of ops against pins.
#
# KVM tests skip with a printed reason when /dev/kvm is missing, unless
# VMM_REQUIRE_KVM=1 (CI sets it), which turns a missing /dev/kvm into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo doc (rustdoc warnings denied: broken or ambiguous links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

echo "== cargo test --workspace"
cargo test --workspace --all-targets
cargo test --workspace --doc

echo "== loom models (RUSTFLAGS=--cfg vmm_loom, release)"
RUSTFLAGS="--cfg vmm_loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p vmm --lib --release -- loom

echo "== shuttle models (RUSTFLAGS=--cfg vmm_shuttle, release; fixed PCT seed)"
RUSTFLAGS="--cfg vmm_shuttle" CARGO_TARGET_DIR=target/shuttle \
  cargo test -p vmm --lib --release -- shuttle
