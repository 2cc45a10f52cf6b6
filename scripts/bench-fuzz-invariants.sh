#!/usr/bin/env bash
# Cost of the fuzzer's per-step invariants: runs two vmm binaries (BASE,
# e.g. a release build of the tree before a change, and NEW), and NEW with
# --probe-every 0 (no KVM probes), one after the other from the same seed,
# ROUNDS times, on the sim tier (seed 900) and on real KVM (seed 1). Prints
# each run's steps/s by wall time and by CPU time (user + system of the
# process: on a host other builds load, a run's wall time also counts the
# time it waited for a CPU), and NEW/BASE of both. Results: docs/fuzzing.md.
#
#   scripts/bench-fuzz-invariants.sh BASE_VMM NEW_VMM [DURATION] [ROUNDS]
set -euo pipefail
base=$1 new=$2 time=${3:-10s} rounds=${4:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
rate() { # VMM NAME FLAGS... -> "wall-rate cpu-rate findings"
    local vmm=$1 name=$2
    shift 2
    /usr/bin/time -f "%U %S" -o "$out/$name.time" \
        "$vmm" fuzz --time "$time" --json --out "$out/$name" "$@" >"$out/$name.json" 2>/dev/null || true
    python3 -c "
import json; r = json.load(open('$out/$name.json'))
u, s = map(float, open('$out/$name.time').read().split()[-2:])
print(f\"{r['steps_per_sec']:.0f} {r['steps'] / max(u + s, 1e-9):.0f} {len(r['findings'])}\")"
}
printf '%-5s %5s %16s %16s %16s %14s %8s\n' tier round 'base wall/cpu' 'new wall/cpu' 'noprobe wall/cpu' 'new/base w/c' findings
for tier in sim real; do
    flags=(--backend "$tier")
    [ "$tier" = sim ] && flags+=(--seed 900) || flags+=(--seed 1)
    for r in $(seq 1 "$rounds"); do
        read -r bw bc bf < <(rate "$base" base "${flags[@]}")
        read -r nw nc nf < <(rate "$new" new "${flags[@]}")
        read -r zw zc zf < <(rate "$new" noprobe "${flags[@]}" --probe-every 0)
        printf '%-5s %5s %16s %16s %16s %14s %8s\n' "$tier" "$r" "$bw/$bc" "$nw/$nc" "$zw/$zc" \
            "$(python3 -c "print(f'{$nw / $bw:.2f}/{$nc / $bc:.2f}')")" "$bf/$nf/$zf"
    done
done
