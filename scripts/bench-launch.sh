#!/usr/bin/env bash
# Launch cost: `vmm run --guest hello` against the raw minimal launcher
# (vmm/examples/raw_launch.rs) running the same trivial guest, both as fresh
# processes, interleaved, RUNS times each. Prints the medians and the ratio
# vmm/raw (goal: <= 1.25).
#
#   scripts/bench-launch.sh [RUNS]      (default 15)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-15}
cargo build --release -q -p vmm --bins --examples
vmm=target/release/vmm
raw=target/release/examples/raw_launch

python3 - "$runs" "$vmm" "$raw" <<'PY'
import statistics, subprocess, sys, time
runs, vmm, raw = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cmds = {
    "vmm run": [vmm, "run", "--guest", "hello", "--mem", "2M", "--vcpus", "1", "-q"],
    "raw": [raw],
}
times = {k: [] for k in cmds}
for name, cmd in cmds.items():  # warm up page cache and KVM module state
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
for _ in range(runs):
    for name, cmd in cmds.items():
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times[name].append((time.perf_counter() - t) * 1e3)
med = {k: statistics.median(v) for k, v in times.items()}
for k, v in times.items():
    print(f"{k:8s} median {med[k]:7.2f} ms  min {min(v):7.2f}  max {max(v):7.2f}  ({len(v)} runs)")
ratio = med["vmm run"] / med["raw"]
print(f"ratio vmm/raw (medians): {ratio:.2f}  (goal <= 1.25)")
PY
