#!/usr/bin/env bash
# Proof that `vmm fuzz` finds bugs: builds vmm with the `mutants` feature
# (deliberately planted bugs, vmm/src/mutants.rs) and runs the fuzzer
# against each, tier after tier until one finds it:
#   libfuzzer  the coverage-guided tier (cargo-fuzz, the memory manager on
#              the simulated KVM), up to LF_TIME (default 60) seconds from
#              the committed corpus; the crash input is minimized by
#              libFuzzer (-minimize_crash, up to 20 s) and both are counted
#              in steps with `vmm fuzz --convert`;
#   sim        `vmm fuzz --backend sim` from a fixed seed, up to SIM_TIME
#              (default 60s): about one step in FAIL_EVERY (default 5) has a
#              memslot change fail and must roll back like the model, and a
#              device thread holds a guard across every op;
#   real       `vmm fuzz` on real KVM, up to REAL_TIME (default 120s).
# Prints a table: mutant, tier, seconds to the finding, steps before and
# after shrinking. TIERS="sim real" (say) picks tiers; the libfuzzer tier
# needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and is skipped
# with a note without it. Knobs of the libfuzzer tier, for comparing fuzzer
# configurations: LF_SEED (libFuzzer's -seed; default: libFuzzer picks one
# from the clock), LF_FLAGS (more libFuzzer flags), LF_CORPUS (the seed
# corpus, default fuzz/corpus/memslots; an empty directory makes the fuzzer
# discover each bug from nothing), LF_BUILD_FLAGS (the `cargo fuzz build`
# flags beyond `-O -s none --features mutants`, default
# "--no-trace-compares" as every build of the target here; empty builds with
# comparison tracing) with LF_TARGET_DIR (default fuzz/target-mutants; give
# another build configuration its own).
#
#   scripts/fuzz-mutants.sh [MUTANT ...]        (default: every mutant)
#
# A libFuzzer crash counts only if its input runs clean without the mutant
# and fails with it on its own.
# Exits 1 if a mutant is not found, or its shrunk reproducer has more than
# 15 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}/mutants
cargo build --release -q -p vmm --features mutants --target-dir "$target"
vmm=$target/release/vmm
seed=${SEED:-1}
tiers=${TIERS:-libfuzzer sim real}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
lf=
if [[ " $tiers " == *" libfuzzer "* ]]; then
    if cargo fuzz --version >/dev/null 2>&1; then
        lf_target=${LF_TARGET_DIR:-fuzz/target-mutants}
        # shellcheck disable=SC2086 # LF_BUILD_FLAGS is a list of flags
        RUSTC_BOOTSTRAP=1 cargo fuzz build -O -s none ${LF_BUILD_FLAGS---no-trace-compares} --features mutants \
            --target-dir "$lf_target" memslots >/dev/null
        lf=$lf_target/x86_64-unknown-linux-gnu/release/memslots
        # Without a mutant the corpus must run clean, or every mutant would
        # look found.
        if ! "$lf" fuzz/corpus/memslots -runs=0 >"$out/clean.log" 2>&1; then
            echo "fuzz-mutants.sh: the corpus fails without a mutant:" >&2
            grep -m1 'finding\|panicked' "$out/clean.log" >&2 || tail -3 "$out/clean.log" >&2
            exit 1
        fi
    else
        echo "note: cargo-fuzz is not installed: the libfuzzer tier is skipped" >&2
    fi
fi
if [ $# -eq 0 ]; then
    set -- $(grep -oE '^        "[a-z0-9-]+",$' vmm/src/mutants.rs | tr -d '", ')
fi
steps_of() { # a libFuzzer input -> its steps as a scenario
    "$vmm" fuzz --backend sim --convert "$1" 2>/dev/null | grep -c '^\[\[step\]\]' || true
}
libfuzzer_row() { # MUTANT -> "seconds steps shrunk", or nothing
    local m=$1 corpus=$out/corpus-$1
    cp -r "${LF_CORPUS:-fuzz/corpus/memslots}" "$corpus"
    local start end crash
    start=$(date +%s%N)
    # shellcheck disable=SC2086 # LF_FLAGS is a list of flags
    VMM_MUTANT=$m timeout $((${LF_TIME:-60} + 30)) "$lf" "$corpus" \
        -max_total_time="${LF_TIME:-60}" -artifact_prefix="$out/$m-" \
        ${LF_SEED:+-seed=$LF_SEED} ${LF_FLAGS:-} >"$out/$m-lf.log" 2>&1 || true
    end=$(date +%s%N)
    crash=$(ls "$out/$m-"crash-* 2>/dev/null | head -1 || true)
    [ -n "$crash" ] || return 0
    # The finding is the mutant's only if the input runs clean without it,
    # and fails with it on its own (a new process: nothing an input before
    # it left in the reused VM).
    if "$lf" -runs=1 "$crash" >"$out/$m-check.log" 2>&1; then :; else
        echo "fuzz-mutants.sh: $m: the crash input fails without the mutant too" >&2
        return 0
    fi
    if VMM_MUTANT=$m "$lf" -runs=1 "$crash" >"$out/$m-alone.log" 2>&1; then
        echo "fuzz-mutants.sh: $m: the crash input passes on its own (it failed after other inputs)" >&2
        return 0
    fi
    VMM_MUTANT=$m timeout 60 "$lf" -minimize_crash=1 -max_total_time=20 \
        -exact_artifact_path="$out/$m-min" "$crash" >"$out/$m-min.log" 2>&1 || true
    [ -s "$out/$m-min" ] || cp "$crash" "$out/$m-min"
    printf '%9s %7d %7d\n' "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')" \
        "$(steps_of "$crash")" "$(steps_of "$out/$m-min")"
}
vmm_row() { # MUTANT TIER -> "seconds steps shrunk", or nothing
    local m=$1 tier=$2 limit=${SIM_TIME:-60s}
    local extra=(--fail-every "${FAIL_EVERY:-5}" --guard-reader)
    if [ "$tier" = real ]; then
        limit=${REAL_TIME:-120s}
        extra=()
    fi
    local json=$out/$m-$tier.json
    VMM_MUTANT=$m "$vmm" fuzz --backend "$tier" --seed "$seed" --time "$limit" \
        "${extra[@]}" --json --out "$out/$m-$tier" >"$json" 2>/dev/null || true
    python3 - "$json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception:
    sys.exit(0)
f = r.get("findings") or []
if f:
    print(f'{r["seconds"]:9.1f} {f[0]["steps"]:7d} {f[0]["shrunk_steps"]:7d}')
PY
}
printf '%-24s %-9s %9s %7s %7s\n' mutant tier seconds steps shrunk
status=0
for m in "$@"; do
    found=
    for tier in $tiers; do
        case $tier in
            libfuzzer) [ -n "$lf" ] || continue; row=$(libfuzzer_row "$m") ;;
            sim|real) row=$(vmm_row "$m" "$tier") ;;
            *) echo "fuzz-mutants.sh: unknown tier $tier (libfuzzer, sim, real)" >&2; exit 2 ;;
        esac
        if [ -n "$row" ]; then
            printf '%-24s %-9s %s\n' "$m" "$tier" "$row"
            shrunk=$(echo "$row" | awk '{print $3}')
            [ "$shrunk" -le 15 ] || status=1
            found=1
            break
        fi
    done
    if [ -z "$found" ]; then
        printf '%-24s %-9s %9s\n' "$m" "-" "not found"
        status=1
    fi
done
exit $status
