#!/usr/bin/env bash
# What a scenario memory step (op + consistency check) costs against the
# bare MemoryManager op measured in the same run, at 10 and 30,000 slots
# (vmm/examples/bench_steps.rs): mean and median per op, the step/bare
# ratio and a verdict against the goals (<= 1 ms per step at 10 slots,
# <= 2 ms at 30,000). Release build; needs /dev/kvm. Results:
# docs/benchmarks.md.
#
#   scripts/bench-steps.sh [ITERATIONS]      (default 1000 plug+unplug pairs per N)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p vmm --example bench_steps
exec "${CARGO_TARGET_DIR:-target}/release/examples/bench_steps" "$@"
