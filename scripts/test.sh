#!/usr/bin/env bash
# The whole test suite: the API docs (rustdoc warnings denied), unit,
# property, doc and integration tests (real KVM), then the loom and shuttle
# model checks of the lock-free parts of `mm` and of ops against pins.
#
# KVM tests skip with a printed reason when /dev/kvm is missing, unless
# VMM_REQUIRE_KVM=1 (CI sets it), which turns a missing /dev/kvm into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo doc (rustdoc warnings denied: broken or ambiguous links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps

echo "== cargo test --workspace"
cargo test --workspace --all-targets
cargo test --workspace --doc

echo "== fuzz smoke: a fixed seed on real KVM for 20 s (the libFuzzer corpus replays in cargo test)"
if [ -e /dev/kvm ] || [ "${VMM_REQUIRE_KVM:-}" = 1 ]; then
    smoke=$(mktemp -d)
    target/debug/vmm fuzz --seed 1 --time 20s --out "$smoke"
    rm -rf "$smoke"
else
    echo "skipped: /dev/kvm is missing (VMM_REQUIRE_KVM=1 makes this a failure)"
fi

echo "== fuzz smoke: planted bugs (cargo feature mutants) are found and shrunk"
cargo build -q -p vmm --features mutants --target-dir target/mutants-debug
smoke=$(mktemp -d)
if VMM_MUTANT=veto-ignored target/mutants-debug/debug/vmm fuzz --backend sim --seed 1 \
    --steps 5000 --json --out "$smoke" >"$smoke/report.json"; then
    echo "the planted bug veto-ignored was not found"
    exit 1
fi
python3 - "$smoke/report.json" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))["findings"][0]
assert f["shrunk_steps"] <= 15, f
print(f"found veto-ignored after {f['steps']} steps, shrunk to {f['shrunk_steps']}")
PY
rm -rf "$smoke"
smoke=$(mktemp -d)
# A finding is exit status 1 with a finding in the report: a crash or a bad
# flag (any other status) does not count as finding the bug.
status=0
VMM_MUTANT=drain-skipped target/mutants-debug/debug/vmm fuzz --backend sim --seed 1 \
    --steps 2000 --guard-reader --json --out "$smoke" >"$smoke/report.json" || status=$?
if [ "$status" -ne 1 ] || ! grep -q '"shrunk_steps"' "$smoke/report.json"; then
    echo "the planted bug drain-skipped was not found (exit status $status)"
    exit 1
fi
rm -rf "$smoke"
for m in iommu-protect-keeps-leaves:iommu-leaves teardown-leaks-mappings:leaked-mappings; do
    smoke=$(mktemp -d)
    VMM_MUTANT=${m%%:*} target/mutants-debug/debug/vmm fuzz --backend sim --seed 1 \
        --steps 2000 --json --out "$smoke" >"$smoke/report.json" || true
    grep -q "\"invariant:${m##*:}\"" "$smoke/report.json" ||
        { echo "the planted bug ${m%%:*} was not found by invariant ${m##*:}"; exit 1; }
    rm -rf "$smoke"
done

echo "== libFuzzer target: built by fuzz/build.sh, the corpus run through it, a planted bug found"
# The coverage-guided tier as a campaign runs it: cargo-fuzz on the stable
# toolchain (fuzz/build.sh sets RUSTC_BOOTSTRAP=1), the OSS-Fuzz layout in
# $OUT, the committed corpus through the instrumented target once (every
# input must run clean, and the target must say it clears its oracle's
# coverage counters), then the target built with the planted bugs must find
# one while loading that corpus. LF_SANITIZER=none builds both without
# AddressSanitizer (default address, fuzz/build.sh's and the engine's
# default build).
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
sanitizer=${LF_SANITIZER:-address}
case $sanitizer in
address | none) ;;
*)
    echo "LF_SANITIZER=$sanitizer: address or none"
    exit 2
    ;;
esac
lf=$(mktemp -d)
OUT=$lf/out SANITIZER=$sanitizer fuzz/build.sh
corpus_files=$(find fuzz/corpus/memslots -type f | wc -l)
if [ "$corpus_files" -eq 0 ]; then
    echo "fuzz/corpus/memslots holds no input"
    exit 1
fi
# libFuzzer may add to or reduce the corpus it is given: a copy.
cp -r fuzz/corpus/memslots "$lf/corpus"
status=0
"$lf/out/memslots" -runs=0 "$lf/corpus" >"$lf/corpus.log" 2>&1 || status=$?
python3 - "$lf/corpus.log" "$status" "$corpus_files" <<'PY'
import re, sys
log, status, files = open(sys.argv[1], errors="replace").read(), int(sys.argv[2]), int(sys.argv[3])
def fail(why):
    said = [l for l in log.splitlines() if re.search(r"panicked at|finding at step|==ERROR|deadly signal|WARNING: oracle", l)]
    print(f"the corpus through the libFuzzer target: {why}\n" + "\n".join(said[:10] or log.splitlines()[-10:]))
    sys.exit(1)
if status != 0:
    fail(f"exit status {status}")
cleared = re.search(r"INFO: oracle coverage: (\d+) counters in (\d+) runs cleared", log)
if not cleared or int(cleared.group(1)) == 0:
    fail("the target did not say it cleared its oracle's coverage counters")
found = re.search(r"INFO:\s+(\d+) files found", log)
done = re.search(r"Done (\d+) runs", log)
if not found or int(found.group(1)) != files:
    fail(f"libFuzzer did not find the corpus's {files} inputs")
if not done or int(done.group(1)) < files:
    fail(f"ran {done.group(1) if done else 'no'} inputs of {files}")
print(f"the libFuzzer target ran the {files} corpus inputs clean ({done.group(1)} runs), "
      f"clearing {int(cleared.group(1)):,} oracle counters in {cleared.group(2)} runs after each")
PY
# The same build with the planted bugs (its own dependencies are shared
# with the build above). `unplug-keeps-last-page` leaves the last page of
# every unplug plugged: the slots invariant catches it at the first input
# that unplugs, at corpus load (scripts/fuzz-mutants.sh, docs/fuzzing.md).
RUSTC_BOOTSTRAP=1 cargo fuzz build -O --debug-assertions --no-trace-compares \
    --sanitizer "$sanitizer" --features mutants memslots
mutant_target=fuzz/target/x86_64-unknown-linux-gnu/release/memslots
cp -r fuzz/corpus/memslots "$lf/corpus-mutant"
mkdir "$lf/found"
status=0
VMM_MUTANT=unplug-keeps-last-page "$mutant_target" -runs=0 -error_exitcode=77 \
    -artifact_prefix="$lf/found/" "$lf/corpus-mutant" >"$lf/mutant.log" 2>&1 || status=$?
crash=$(find "$lf/found" -name 'crash-*' | head -1)
# Found is: libFuzzer's crash status, the slots invariant named in the
# panic, the input saved, and that input clean without the mutant.
if [ "$status" -ne 77 ] || [ -z "$crash" ] ||
    ! grep -q 'panicked at' "$lf/mutant.log" || ! grep -q 'invariant slots broken' "$lf/mutant.log"; then
    echo "the planted bug unplug-keeps-last-page was not found by the libFuzzer target (exit status $status):"
    grep -m3 'panicked at\|==ERROR\|deadly signal' "$lf/mutant.log" || tail -5 "$lf/mutant.log"
    exit 1
fi
if ! "$mutant_target" -runs=1 "$crash" >"$lf/clean.log" 2>&1; then
    echo "the input that found unplug-keeps-last-page fails without the mutant too:"
    grep -m3 'panicked at' "$lf/clean.log" || tail -5 "$lf/clean.log"
    exit 1
fi
echo "found unplug-keeps-last-page: $(grep -m1 -o 'finding at step.*' "$lf/mutant.log" | cut -c1-160)"
rm -rf "$lf"

echo "== loom models (RUSTFLAGS=--cfg vmm_loom, release)"
RUSTFLAGS="--cfg vmm_loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p vmm --lib --release -- loom

echo "== shuttle models (RUSTFLAGS=--cfg vmm_shuttle, release; fixed PCT seed)"
RUSTFLAGS="--cfg vmm_shuttle" CARGO_TARGET_DIR=target/shuttle \
  cargo test -p vmm --lib --release -- shuttle
