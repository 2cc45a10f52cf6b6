#!/usr/bin/env bash
# Memslot ops at 509, 8,194 and 32,764 memslots under a running guest, KVM's
# memslot_perf_test method (map, unmap, unmap in 2 MiB chunks, move of an
# active and of an inactive slot, guest read/write through many slots),
# through the memory manager beside a raw loop of the same ioctls in the
# same run (goal ours/raw <= 1.2), then the modification-stress mode (a slot
# added and deleted in a loop while the vCPUs dirty memory). Needs /dev/kvm.
# Results and method: docs/bench-memslots.md.
#
#   scripts/bench-memslots.sh [TIME] [extra flags...]   (TIME per implementation and round, default 1s)
set -euo pipefail
cd "$(dirname "$0")/.."
time_per=${1:-1s}
shift || true
cargo build --release -q -p vmm
vmm="${CARGO_TARGET_DIR:-target}/release/vmm"
"$vmm" bench memslots --slots 509,8194,32764 --time "$time_per" --rounds 2 "$@"
"$vmm" bench memslots --stress --time 3s "$@"
