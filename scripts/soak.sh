#!/usr/bin/env bash
# Soak run of the guard stress test on real KVM: 2 vCPUs fill/verify patterns,
# 2 host threads read/write through slot guards (one through DeviceMemory's
# translation cache), a writer unplugs/replugs, moves and protects ranges.
# Usage: scripts/soak.sh [seconds]   (default 600; CI runs the same test for 10 s)
# Any torn or stale data, KVM error or host SIGSEGV fails it.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
export VMM_STRESS_SECS="$secs" VMM_REQUIRE_KVM=1
exec cargo test --release -p vmm-tests --test integration -- \
    stress::test_stress_guards_vcpus_and_host_threads_survive_continuous_ops --exact --nocapture
