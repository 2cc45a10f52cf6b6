#!/usr/bin/env bash
# Fuzzer throughput on real KVM with every per-step invariant on (the
# model's outcome for every step, the incremental consistency check after
# every memory op, guest verifies and the final sweep): the default config
# (up to ~100 slots) and the same timelines with 30,000 one-page slots
# plugged first (--prefill 30000), each for DURATION (default 60s) from the
# same seed, one after the other in this run. Prints steps/s of each, the
# 30,000-slot rate as a fraction of the default one, and a verdict against
# the goals (>= 500 and >= 100 steps/s). Release build; needs /dev/kvm.
# Results: docs/fuzzing.md.
#
#   scripts/bench-fuzz.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
time=${1:-60s}
cargo build --release -q -p vmm
vmm=${CARGO_TARGET_DIR:-target}/release/vmm
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() { # NAME GOAL FLAGS...
    local name=$1 goal=$2
    shift 2
    "$vmm" fuzz --seed "${SEED:-1}" --time "$time" --json --out "$out/$name" "$@" \
        >"$out/$name.json" 2>/dev/null || true
    python3 - "$out/$name.json" "$name" "$goal" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
name, goal = sys.argv[2], float(sys.argv[3])
rate = r["steps_per_sec"]
ok = "ok" if rate >= goal and not r["findings"] else "MISSED"
print(f"{name:<12} {r['steps']:>8} steps in {r['runs']:>4} VMs {r['seconds']:7.1f} s "
      f"{rate:9.1f} steps/s  goal {goal:5.0f}  {ok}  findings {len(r['findings'])}")
open(sys.argv[1] + ".rate", "w").write(str(rate))
PY
}
run default 500
run slots-30000 100 --prefill 30000 --chunk 3000
python3 -c "
a = float(open('$out/default.json.rate').read()); b = float(open('$out/slots-30000.json.rate').read())
print(f'30,000 slots / default: {b / a:.3f}')"
