#!/usr/bin/env bash
# Throughput of the coverage-guided (libFuzzer) tier: the memslots target
# built without a sanitizer and, as every build of it here, without
# comparison tracing (`cargo fuzz build -O -s none --no-trace-compares`;
# docs/fuzzing.md, "Fourth pass", says why), run for SECONDS
# (default 30) on a copy of the committed corpus, against the goal of
# 10,000 executions/s. In the same run, before it, the same binary with
# VMM_FUZZ_DECODE_ONLY=1 (every input only decoded: the rate libFuzzer's own
# work allows this binary on this host, a ceiling) for as long; prints
# both, ours / ceiling, the steps each input ran (median and mean, from the
# target's VMM_FUZZ_STEPS histogram) and steps/s, and a verdict. The corpus
# copies and the target's TMPDIR live on tmpfs (/dev/shm) when there is one:
# libFuzzer writes every new or reduced input to the corpus directory, and
# every `file` plug creates (and drops) an unnamed file in TMPDIR.
#
#   scripts/bench-fuzz-libfuzzer.sh [SECONDS]
#   BASELINE=/path/to/other/memslots scripts/bench-fuzz-libfuzzer.sh 30
#   BASELINE=... BASELINE_CORPUS=/tmp/old-corpus scripts/bench-fuzz-libfuzzer.sh 30
#
# BASELINE adds a run of another build of the target (say, of an older
# tree) on the same corpus, between the ceiling and ours, and prints ours /
# baseline; BASELINE_CORPUS gives it its own corpus (default the
# committed one; a build of an older input format wants the corpus as it
# was then: `git archive OLD fuzz/corpus/memslots`). Extra libFuzzer flags: FUZZ_FLAGS (e.g. "-max_len=2700");
# the `cargo fuzz build` flags: FUZZ_BUILD_FLAGS (default
# "--no-trace-compares"; empty builds with comparison tracing; a change of
# them rebuilds every crate, so give such a build its own FUZZ_TARGET_DIR,
# default fuzz/target).
# Exit 1 if our run found something (what it said is printed, the input is
# in fuzz/artifacts/memslots/) or did not clear its oracle's coverage
# counters (unless VMM_FUZZ_ORACLE_COVERAGE=1 asked it to keep them), 2 for
# bad arguments. Results: docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
case $seconds in
'' | *[!0-9]* | 0)
    echo "bench-fuzz-libfuzzer.sh: SECONDS must be a positive whole number, got '$seconds'" >&2
    exit 2
    ;;
esac
if [ -n "${BASELINE:-}" ] && [ ! -x "$BASELINE" ]; then
    echo "bench-fuzz-libfuzzer.sh: BASELINE '$BASELINE' is not an executable" >&2
    exit 2
fi
export RUSTC_BOOTSTRAP=${RUSTC_BOOTSTRAP:-1}
target_dir=${FUZZ_TARGET_DIR:-fuzz/target}
# shellcheck disable=SC2086 # FUZZ_BUILD_FLAGS is a list of flags
cargo fuzz build -O -s none --target-dir "$target_dir" ${FUZZ_BUILD_FLAGS---no-trace-compares} memslots
bin=$target_dir/x86_64-unknown-linux-gnu/release/memslots
base=/dev/shm
[ -d "$base" ] && [ -w "$base" ] || base=${TMPDIR:-/tmp}
work=$(mktemp -d "$base/bench-fuzz-libfuzzer.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The target's unnamed files (`file` plugs) go to TMPDIR: the same tmpfs.
mkdir "$work/tmp"
# shellcheck disable=SC2086 # FUZZ_FLAGS is a list of flags
run() { # NAME BINARY CORPUS [ENV=VALUE...]
    local name=$1 binary=$2 corpus=$3
    shift 3
    cp -r "$corpus" "$work/$name"
    local rc=0
    env TMPDIR="$work/tmp" "$@" "$binary" "$work/$name" -max_total_time="$seconds" -print_final_stats=1 \
        -artifact_prefix="$artifacts/" ${FUZZ_FLAGS:-} >"$work/$name.log" 2>&1 || rc=$?
    echo "$rc" >"$work/$name.rc"
}
# A finding's input goes where `cargo fuzz run` puts them (ignored by git).
artifacts=fuzz/artifacts/memslots
mkdir -p "$artifacts"
run ceiling "$bin" fuzz/corpus/memslots VMM_FUZZ_DECODE_ONLY=1
# A baseline build of this target counts its steps too (an older one
# ignores the variable).
[ -n "${BASELINE:-}" ] && run baseline "$BASELINE" "${BASELINE_CORPUS:-fuzz/corpus/memslots}" \
    VMM_FUZZ_STEPS="$work/steps-baseline"
run ours "$bin" fuzz/corpus/memslots VMM_FUZZ_STEPS="$work/steps"
python3 - "$work" "${BASELINE:+baseline}" <<'PY'
import os, re, statistics, sys
work, with_baseline = sys.argv[1], sys.argv[2] == "baseline"
GOAL = 10_000

def stats(name):
    log = open(f"{work}/{name}.log", errors="replace").read()
    rc = int(open(f"{work}/{name}.rc").read())
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    rate = re.search(r"stat::average_exec_per_sec:\s*(\d+)", log)
    crashed = rc != 0 or "==ERROR" in log or "panicked" in log
    return (int(runs.group(1)) if runs else 0), (int(rate.group(1)) if rate else 0), crashed, log

ceiling = stats("ceiling")
ours = stats("ours")

def steps(name, rate):
    hist = []
    if os.path.exists(f"{work}/{name}"):
        for line in open(f"{work}/{name}"):
            steps, inputs = map(int, line.split())
            hist += [steps] * inputs
    if not hist:
        return ""
    mean = statistics.mean(hist)
    return (f"  steps/input median {statistics.median(hist):g} mean {mean:.2f} "
            f"({len(hist)} inputs counted)  {rate * mean:,.0f} steps/s")

print(f"ceiling (decode only) {ceiling[0]:>9} runs {ceiling[1]:>7} exec/s")
if with_baseline:
    baseline = stats("baseline")
    print(f"baseline              {baseline[0]:>9} runs {baseline[1]:>7} exec/s"
          + steps("steps-baseline", baseline[1]))
print(f"ours                  {ours[0]:>9} runs {ours[1]:>7} exec/s" + steps("steps", ours[1]))
# The target clears its oracle's coverage counters after every input
# (fuzz/fuzz_targets/oracle.rs) and says how many at startup; without that
# line, or with none cleared, this run measured another configuration.
cleared = re.search(r"INFO: oracle coverage: (\d+) counters in (\d+) runs cleared", ours[3])
if cleared and int(cleared.group(1)) > 0:
    print(f"oracle counters cleared after every input: {int(cleared.group(1)):,} "
          f"in {cleared.group(2)} runs")
elif os.environ.get("VMM_FUZZ_ORACLE_COVERAGE") != "1":
    print("ERROR: our run did not clear the oracle's coverage counters (see its log)")
    sys.exit(1)
print(f"ours / ceiling: {ours[1] / max(ceiling[1], 1):.3f}")
if with_baseline:
    print(f"ours / baseline: {ours[1] / max(baseline[1], 1):.3f}")
if ours[2]:
    said = [l for l in ours[3].splitlines()
            if re.search(r"panicked at|finding at step|deadly signal|Test unit written", l)]
    print("FINDING (or crash) in our run:\n" + "\n".join(said[:10]))
verdict = "ok" if ours[1] >= GOAL and not ours[2] else "MISSED"
print(f"goal {GOAL} exec/s: {verdict}")
sys.exit(1 if ours[2] else 0)
PY
