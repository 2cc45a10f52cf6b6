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

echo "== loom models (RUSTFLAGS=--cfg vmm_loom, release)"
RUSTFLAGS="--cfg vmm_loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p vmm --lib --release -- loom

echo "== shuttle models (RUSTFLAGS=--cfg vmm_shuttle, release; fixed PCT seed)"
RUSTFLAGS="--cfg vmm_shuttle" CARGO_TARGET_DIR=target/shuttle \
  cargo test -p vmm --lib --release -- shuttle
