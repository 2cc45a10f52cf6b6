#!/usr/bin/env bash
# Static checks to run before committing: formatting, clippy (deny warnings,
# also under the loom and shuttle cfgs so model-only code stays clean), and
# the API docs with rustdoc warnings denied (broken or ambiguous links).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTFLAGS="--cfg vmm_loom" CARGO_TARGET_DIR=target/loom cargo clippy -p vmm --lib --tests -- -D warnings
RUSTFLAGS="--cfg vmm_shuttle" CARGO_TARGET_DIR=target/shuttle cargo clippy -p vmm --lib --tests -- -D warnings
cargo clippy -p vmm --all-targets --features mutants --target-dir target/mutants-debug -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
