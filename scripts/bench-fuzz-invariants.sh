#!/usr/bin/env bash
# Cost of the fuzzer's per-step invariants: runs two vmm binaries (BASE,
# e.g. a release build of the tree before a change, and NEW) alternately
# from the same seed, on the sim tier and on real KVM, and prints each
# one's steps/s and NEW/BASE. Both runs of a pair share the host's load, so
# compare the ratios. Also NEW with --probe-every 0 (no KVM probes).
# Results: docs/fuzzing.md.
#
#   scripts/bench-fuzz-invariants.sh BASE_VMM NEW_VMM [DURATION] [ROUNDS]
set -euo pipefail
base=$1 new=$2 time=${3:-10s} rounds=${4:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
rate() { # VMM NAME FLAGS...
    local vmm=$1 name=$2
    shift 2
    "$vmm" fuzz --time "$time" --json --out "$out/$name" "$@" >"$out/$name.json" 2>/dev/null || true
    python3 -c "
import json; r = json.load(open('$out/$name.json'))
print(f\"{r['steps_per_sec']:.1f} {len(r['findings'])}\")"
}
printf '%-5s %-6s %10s %10s %10s %8s %8s\n' tier round base new new-noprobe new/base findings
for tier in sim real; do
    flags=(--backend "$tier")
    [ "$tier" = sim ] && flags+=(--seed 900) || flags+=(--seed 1)
    for r in $(seq 1 "$rounds"); do
        read -r b bf < <(rate "$base" base "${flags[@]}")
        read -r n nf < <(rate "$new" new "${flags[@]}")
        read -r z zf < <(rate "$new" noprobe "${flags[@]}" --probe-every 0)
        printf '%-5s %-6s %10s %10s %10s %8s %8s\n' "$tier" "$r" "$b" "$n" "$z" \
            "$(python3 -c "print(f'{$n / $b:.3f}')")" "$bf/$nf/$zf"
    done
done
