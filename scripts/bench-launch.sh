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
# VMM=PATH RAW=PATH override the binaries. BASE=DIR (a target/release of
# another tree, with vmm and examples/raw_launch) adds that pair to the same
# interleaving, for a before/after in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-15}
if [[ -z "${VMM:-}" || -z "${RAW:-}" ]]; then
  cargo build --release -q -p vmm --bins --examples
fi
vmm=${VMM:-target/release/vmm}
raw=${RAW:-target/release/examples/raw_launch}

python3 - "$runs" "$vmm" "$raw" "${BASE:-}" <<'PY'
import os, statistics, subprocess, sys, time
runs, vmm, raw, base = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
launch = ["run", "--guest", "hello", "--mem", "2M", "--vcpus", "1", "-q"]
cmds = {"vmm run": [vmm] + launch, "raw": [raw]}
if base:
    cmds["base vmm"] = [os.path.join(base, "vmm")] + launch
    cmds["base raw"] = [os.path.join(base, "examples", "raw_launch")]

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
    print(f"{k:9s} median {med[k]['wall']:7.2f} ms  min {min(w):7.2f}  max {max(w):7.2f}"
          f"  cpu {med[k]['cpu']:5.2f} ms  faults {med[k]['faults']:5.0f}  ({len(w)} runs)")
def ratios(v, r, label):
    cpu = med[v]["cpu"] / med[r]["cpu"] if med[r]["cpu"] else float("nan")
    print(f"{label}cpu ratio vmm/raw (medians): {cpu:.2f}")
    print(f"{label}ratio vmm/raw (medians): {med[v]['wall'] / med[r]['wall']:.2f}  (goal <= 1.25)")
if base:
    ratios("base vmm", "base raw", "base: ")
ratios("vmm run", "raw", "")
PY
