#!/usr/bin/env bash
# Proof that `vmm fuzz` finds bugs: builds vmm with the `mutants` feature
# (deliberately planted bugs, vmm/src/mutants.rs) and runs the fuzzer
# against each, from a fixed seed: first the simulated-KVM tier (up to
# SIM_TIME, default 60s; about one step in FAIL_EVERY, default 5, has a
# memslot change fail and must roll back like the model, and a device thread
# holds a guard across every op), then, if that tier cannot see the bug, real KVM (up
# to REAL_TIME, default 120s). Prints a table: mutant, tier, seconds to the
# finding, steps before and after shrinking.
#
#   scripts/fuzz-mutants.sh [MUTANT ...]        (default: every mutant)
#
# Exits 1 if a mutant is not found, or its shrunk reproducer has more than
# 15 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}/mutants
cargo build --release -q -p vmm --features mutants --target-dir "$target"
vmm=$target/release/vmm
seed=${SEED:-1}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [ $# -eq 0 ]; then
    set -- $(grep -oE '^        "[a-z0-9-]+",$' vmm/src/mutants.rs | tr -d '", ')
fi
printf '%-24s %-5s %9s %7s %7s\n' mutant tier seconds steps shrunk
status=0
for m in "$@"; do
    found=
    for tier in sim real; do
        limit=${SIM_TIME:-60s}
        extra=(--fail-every "${FAIL_EVERY:-5}" --guard-reader)
        if [ "$tier" = real ]; then
            limit=${REAL_TIME:-120s}
            extra=()
        fi
        json=$out/$m-$tier.json
        VMM_MUTANT=$m "$vmm" fuzz --backend "$tier" --seed "$seed" --time "$limit" \
            "${extra[@]}" --json --out "$out/$m-$tier" >"$json" 2>/dev/null || true
        row=$(python3 - "$json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception:
    sys.exit(0)
f = r.get("findings") or []
if f:
    print(f'{r["seconds"]:9.1f} {f[0]["steps"]:7d} {f[0]["shrunk_steps"]:7d}')
PY
)
        if [ -n "$row" ]; then
            printf '%-24s %-5s %s\n' "$m" "$tier" "$row"
            shrunk=$(echo "$row" | awk '{print $3}')
            [ "$shrunk" -le 15 ] || status=1
            found=1
            break
        fi
    done
    if [ -z "$found" ]; then
        printf '%-24s %-5s %9s\n' "$m" "-" "not found"
        status=1
    fi
done
exit $status
