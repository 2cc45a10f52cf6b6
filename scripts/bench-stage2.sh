#!/usr/bin/env bash
# Stage-2 table costs, ratios in one run (vmm/examples/bench_stage2.rs):
# a table walk of a mapped address against the slot-map lookup of the same
# address (memory.load().translate), with 4 KiB and 2 MiB leaves; and the
# unmap of 1 GiB mapped with 2 MiB leaves against 4 KiB leaves. Release build;
# needs /dev/kvm and THP. Results: docs/bench-stage2.md.
#
#   scripts/bench-stage2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p vmm --example bench_stage2
exec "${CARGO_TARGET_DIR:-target}/release/examples/bench_stage2" "$@"
