#!/usr/bin/env bash
# Slot-op latency: plug and unplug of a 2 MiB range through the
# memory manager with 10, 1,000 and 30,000 slots already registered, beside
# the raw mmap + KVM_SET_USER_MEMORY_REGION cost measured in the same run
# (vmm/examples/bench_slots.rs). Prints medians, p90s, a breakdown, the ratios
# and a verdict against the goals (30,000-slot op <= 2x the 10-slot op and
# <= 1.5x raw). Needs /dev/kvm. Results: docs/bench-slots.md.
#
#   scripts/bench-slots.sh [ITERATIONS]      (default 2000 warm cycles per N)
#
# BENCH_SLOTS_CPU=K pins the benchmark to CPU K (default 0; "none": unpinned).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p vmm --example bench_slots
exec "${CARGO_TARGET_DIR:-target}/release/examples/bench_slots" "$@"
