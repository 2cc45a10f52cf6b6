#!/usr/bin/env bash
# Where the coverage-guided tier's coverage counters come from: runs every
# input of CORPUS once (libFuzzer `-runs=0`) under gdb, reads the target's
# inline 8-bit counters after each input, and prints, per crate that
# compiled the code (the DWARF compile unit of each counter's PC), the
# counters the binary has and how many an input makes non-zero on average.
# libFuzzer's per-feature work after every input scales with the latter.
# A generic function (an `imbl` B-tree, `core` iterators, `crossbeam_epoch`'s
# pin) is compiled, and instrumented, in the crate that instantiates it, so
# it counts under that crate. Needs gdb, llvm-dwarfdump and setarch.
# With PERF_SECONDS=N it also fuzzes a copy of CORPUS for N seconds under
# `perf record -g` and prints, per crate, the share of the samples in the
# comparison-tracing callbacks (`__sanitizer_cov_trace_*`) whose caller that
# crate compiled (needs perf).
#
#   scripts/fuzz-counters-by-crate.sh [BINARY [CORPUS]]
#   PERF_SECONDS=12 scripts/fuzz-counters-by-crate.sh
#
# BINARY defaults to the `cargo fuzz build -O -s none --no-trace-compares
# memslots` build (built if missing), CORPUS to fuzz/corpus/memslots. The
# counters are read when the target returns, after it cleared the oracle's
# (fuzz/fuzz_targets/oracle.rs): what libFuzzer sees. VMM_FUZZ_ORACLE_COVERAGE=1
# keeps them, for every counter an input hits. Results: docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in gdb llvm-dwarfdump setarch python3; do
    command -v "$tool" >/dev/null || {
        echo "fuzz-counters-by-crate.sh: needs $tool" >&2
        exit 2
    }
done
bin=${1:-fuzz/target/x86_64-unknown-linux-gnu/release/memslots}
corpus=${2:-fuzz/corpus/memslots}
if [ -z "${1:-}" ] && [ ! -x "$bin" ]; then
    RUSTC_BOOTSTRAP=${RUSTC_BOOTSTRAP:-1} cargo fuzz build -O -s none --no-trace-compares memslots
fi
[ -x "$bin" ] || {
    echo "fuzz-counters-by-crate.sh: '$bin' is not an executable" >&2
    exit 2
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/empty"
# The counters' and PC table's addresses, as libFuzzer prints them (ASLR off,
# so the gdb run below has the same layout).
setarch -R "$bin" "$work/empty" -runs=0 >"$work/probe.log" 2>&1 </dev/null || true
cnt=$(sed -n 's/.*inline 8-bit counters): [0-9]* \[\(0x[0-9a-f]*\), \(0x[0-9a-f]*\)).*/\1 \2/p' "$work/probe.log")
pcs=$(sed -n 's/.*PC tables ([0-9]* PCs): [0-9]* \[\(0x[0-9a-f]*\),\(0x[0-9a-f]*\)).*/\1 \2/p' "$work/probe.log")
[ -n "$cnt" ] && [ -n "$pcs" ] || {
    echo "fuzz-counters-by-crate.sh: no counters or PC table in libFuzzer's output:" >&2
    cat "$work/probe.log" >&2
    exit 1
}
cat >"$work/gdb.py" <<PY
import gdb, struct
gdb.execute("set pagination off")
cnt = [int(x, 16) for x in "$cnt".split()]
pcs = [int(x, 16) for x in "$pcs".split()]
n = cnt[1] - cnt[0]
hits = [0] * n
st = {"inputs": 0, "nonzero": 0, "pcs": None, "base": None}
class Done(gdb.FinishBreakpoint):
    def stop(self):
        inf = gdb.selected_inferior()
        if st["pcs"] is None:
            raw = bytes(inf.read_memory(pcs[0], pcs[1] - pcs[0]))
            st["pcs"] = [struct.unpack_from("<Q", raw, 16 * i)[0] for i in range(n)]
            maps = open("/proc/%d/maps" % inf.pid).read().splitlines()
            st["base"] = min(int(l.split("-")[0], 16) for l in maps if l.endswith("$(realpath "$bin")"))
        for i, b in enumerate(bytes(inf.read_memory(cnt[0], n))):
            if b:
                hits[i] += 1
                st["nonzero"] += 1
        st["inputs"] += 1
        return False
    def out_of_scope(self):
        pass
class Entry(gdb.Breakpoint):
    def stop(self):
        Done(gdb.newest_frame(), internal=True)
        return False
Entry("LLVMFuzzerTestOneInput", internal=True)
gdb.execute("run")
with open("$work/hits", "w") as f:
    f.write("%d\n" % st["inputs"])
    for i in range(n):
        f.write("%x %d\n" % (st["pcs"][i] - st["base"], hits[i]))
PY
setarch -R gdb -q -batch -x "$work/gdb.py" --args "$bin" "$work/empty" "$corpus" -runs=0 \
    >"$work/gdb.log" 2>&1 </dev/null
[ -s "$work/hits" ] || {
    echo "fuzz-counters-by-crate.sh: the gdb run produced nothing:" >&2
    tail -20 "$work/gdb.log" >&2
    exit 1
}
llvm-dwarfdump --debug-aranges "$bin" >"$work/aranges"
llvm-dwarfdump --debug-info --recurse-depth=0 "$bin" 2>/dev/null |
    grep -E '^0x[0-9a-f]+: DW_TAG_compile_unit|^ +DW_AT_name' >"$work/cus"
if [ -n "${PERF_SECONDS:-}" ]; then
    cp -r "$corpus" "$work/corpus"
    mkdir "$work/tmp"
    TMPDIR="$work/tmp" perf record -q -F 2000 -g -o "$work/perf.data" "$bin" "$work/corpus" \
        -max_total_time="$PERF_SECONDS" >/dev/null 2>&1 </dev/null
    perf script -i "$work/perf.data" -F ip,sym --max-stack 2 >"$work/perf.txt" 2>/dev/null
fi
python3 - "$work" <<'PY'
import bisect, collections, os, re, sys
work = sys.argv[1]
# Compile units: the DIE offset of each, and the crate named in its name
# ("src/lib.rs/@/vmm.<hash>-cgu.0"; libFuzzer's C++ units by file).
dies, names, cur = [], {}, None
for line in open(f"{work}/cus"):
    m = re.match(r"^(0x[0-9a-f]+): DW_TAG_compile_unit", line)
    if m:
        cur = int(m.group(1), 16)
        dies.append(cur)
        continue
    m = re.search(r'DW_AT_name\s+\("(.*)"\)', line)
    if m and cur is not None and cur not in names:
        name = m.group(1)
        names[cur] = name.split("/@/")[1].split(".")[0] if "/@/" in name else name
dies.sort()
ranges, unit = [], None
for line in open(f"{work}/aranges"):
    m = re.search(r"cu_offset = (0x[0-9a-f]+)", line)
    if m:
        # The unit's header is at cu_offset; its DIE is the first after it.
        off = int(m.group(1), 16)
        unit = dies[bisect.bisect_right(dies, off)]
        continue
    m = re.match(r"\[(0x[0-9a-f]+), (0x[0-9a-f]+)\)", line)
    if m:
        ranges.append((int(m.group(1), 16), int(m.group(2), 16), unit))
ranges.sort()
starts = [r[0] for r in ranges]
def crate(pc):
    i = bisect.bisect_right(starts, pc) - 1
    if i >= 0 and ranges[i][0] <= pc < ranges[i][1]:
        return names.get(ranges[i][2], "?")
    return "?"
lines = open(f"{work}/hits").read().split()
inputs = int(lines[0])
static, hit = collections.Counter(), collections.Counter()
for pc, h in zip(lines[1::2], lines[2::2]):
    c = crate(int(pc, 16))
    static[c] += 1
    hit[c] += int(h)
total = sum(hit.values())
print(f"{inputs} inputs; counters in the binary {sum(static.values())}; "
      f"non-zero after an input, on average {total / max(inputs, 1):.1f}")
print(f"{'compiled in':<24} {'counters':>8} {'per input':>10} {'share':>7}")
for c in sorted(static, key=lambda c: (-hit[c], -static[c])):
    print(f"{c:<24} {static[c]:>8} {hit[c] / max(inputs, 1):>10.1f} "
          f"{100 * hit[c] / max(total, 1):>6.1f}%")
if os.path.exists(f"{work}/perf.txt"):
    # Each sample: its frames, innermost first, as "ADDRESS SYMBOL" lines.
    samples = [[l.strip() for l in b.strip().split("\n")]
               for b in open(f"{work}/perf.txt").read().split("\n\n") if b.strip()]
    callers = collections.Counter()
    for frames in samples:
        leaf = frames[0].split()
        if len(leaf) > 1 and leaf[1].startswith("__sanitizer_cov_trace") and len(frames) > 1:
            callers[crate(int(frames[1].split()[0], 16))] += 1
    n = sum(callers.values())
    print(f"\ncomparison callbacks: {100 * n / max(len(samples), 1):.1f}% of {len(samples)} samples; by the caller's crate:")
    for c, v in callers.most_common():
        print(f"{c:<24} {100 * v / max(n, 1):>6.1f}%")
PY
