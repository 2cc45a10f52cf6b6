#!/usr/bin/env bash
# Dirty-page tracking per mode (bitmap, manual with initially-set, ring),
# KVM's dirty_log_perf_test method, through the memory manager beside a raw
# program doing the same ioctls and guest writes in the same run: per
# iteration the vCPU pass, collect and clear times (goal ours/raw <= 1.1 per
# phase), ring against bitmap collect for a small write set, and the enable
# time over memory sizes (manual's initially-set should stay flat).
# Needs /dev/kvm. Results and method: docs/bench-dirty.md.
#
#   scripts/bench-dirty.sh [SIZE] [extra flags...]   (guest memory per vCPU, default 1G)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1G}
shift || true
cargo build --release -q -p vmm
vmm="${CARGO_TARGET_DIR:-target}/release/vmm"
run() {
    "$vmm" bench dirty "$@"
}
# A small write set (5%): where the ring should collect at or below the bitmap.
run --size "$size" --write-percent 5 --iterations 5 \
    --enable-scan 64M,256M,1G --plot "${CARGO_TARGET_DIR:-target}/bench-dirty.svg" "$@"
# Every page written, 4 slots, THP backing (the ring holds at most 65,536 entries per vCPU: bitmap and manual only).
run --modes bitmap,manual --size "$size" --write-percent 100 --slots 4 \
    --backing thp --iterations 5 "$@"
