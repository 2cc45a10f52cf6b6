#!/bin/sh
# Prefault, faults under churn and working-set replay (docs/fault-latency.md):
# every figure is a ratio against a baseline measured in the same invocation.
#   scripts/bench-churn.sh            # 1 GiB prefill, 256 MiB churn and replay
#   PREFILL_SIZE=4G scripts/bench-churn.sh   # the kernel's own 4 GiB comparison
set -eu
cd "$(dirname "$0")/.."
cargo build --release -p vmm
vmm=target/release/vmm
out=target/bench-churn
mkdir -p "$out"
prefill=${PREFILL_SIZE:-1G}
size=${SIZE:-256M}

echo "== host prefill: MADV_POPULATE_WRITE vs touch, then the guest pass ($prefill, 3 rounds)"
$vmm bench faults --size "$prefill" --compare anon,prefault,populate --rounds 3 \
    --no-baselines -q --json >"$out/prefill.json"

echo "== faults under churn ($size): which op caused which outlier"
$vmm bench faults --size "$size" --churn plug,protect,dontneed,collapse,dirty-log \
    --refault --no-baselines -q --json >"$out/churn.json"

echo "== working set: record ($size), replay with each prefetch against none (4 rounds, alternating order)"
$vmm bench faults --size "$size" --record "$out/workset.jsonl" --no-baselines -q >/dev/null
$vmm bench faults --size "$size" --backing uffd-copy --access read --rounds 4 \
    --replay "$out/workset.jsonl" --prefetch copy --no-baselines -q --json >"$out/replay-copy.json"
$vmm bench faults --size "$size" --rounds 4 \
    --replay "$out/workset.jsonl" --prefetch populate --no-baselines -q --json >"$out/replay-populate.json"
$vmm bench faults --size "$size" --rounds 4 \
    --replay "$out/workset.jsonl" --prefetch none --no-baselines -q --json >"$out/replay-none.json"
echo "JSON in $out/"
