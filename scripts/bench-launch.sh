#!/usr/bin/env bash
# Launch cost: `vmm run --guest hello` against the raw minimal launcher
# (vmm/examples/raw_launch.rs) running the same trivial guest, both as fresh
# processes, interleaved, RUNS times each. Prints per command the medians of
# wall time, CPU time (user + sys) and minor page faults (from wait4's
# rusage), and the ratios vmm/raw of the medians (goal: wall <= 1.25). On a
# loaded host the CPU ratio and the fault counts are steadier than wall time.
#
#   scripts/bench-launch.sh [RUNS]      (default 15)
#
# VMM=PATH RAW=PATH override the binaries (e.g. to compare another build).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-15}
if [[ -z "${VMM:-}" || -z "${RAW:-}" ]]; then
  cargo build --release -q -p vmm --bins --examples
fi
vmm=${VMM:-target/release/vmm}
raw=${RAW:-target/release/examples/raw_launch}

python3 - "$runs" "$vmm" "$raw" <<'PY'
import os, statistics, subprocess, sys, time
runs, vmm, raw = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cmds = {
    "vmm run": [vmm, "run", "--guest", "hello", "--mem", "2M", "--vcpus", "1", "-q"],
    "raw": [raw],
}

def once(cmd):
    t = time.perf_counter()
    # close_fds=False lets Python use posix_spawn (vfork): the child costs
    # no copy-on-write faults of this interpreter before exec.
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, close_fds=False)
    _, status, ru = os.wait4(p.pid, 0)
    wall = (time.perf_counter() - t) * 1e3
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd} failed with status {status}")
    return wall, (ru.ru_utime + ru.ru_stime) * 1e3, ru.ru_minflt

for cmd in cmds.values():  # warm up page cache and KVM module state
    once(cmd)
res = {k: {"wall": [], "cpu": [], "faults": []} for k in cmds}
for _ in range(runs):
    for name, cmd in cmds.items():
        wall, cpu, faults = once(cmd)
        res[name]["wall"].append(wall)
        res[name]["cpu"].append(cpu)
        res[name]["faults"].append(faults)
med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in res.items()}
for k, r in res.items():
    w = r["wall"]
    print(f"{k:8s} median {med[k]['wall']:7.2f} ms  min {min(w):7.2f}  max {max(w):7.2f}"
          f"  cpu {med[k]['cpu']:5.2f} ms  faults {med[k]['faults']:5.0f}  ({len(w)} runs)")
ratio = med["vmm run"]["wall"] / med["raw"]["wall"]
cpu = med["vmm run"]["cpu"] / med["raw"]["cpu"] if med["raw"]["cpu"] else float("nan")
print(f"cpu ratio vmm/raw (medians): {cpu:.2f}")
print(f"ratio vmm/raw (medians): {ratio:.2f}  (goal <= 1.25)")
PY
