#!/usr/bin/env bash
# A long `vmm fuzz` campaign sharded by seed: one `vmm fuzz` per seed of A..B,
# `--jobs J` at a time, each with its own JSON report and reproducer directory.
#
# Usage: scripts/fuzz.sh --seeds A..B [--jobs J] [--out DIR] [-- vmm fuzz flags]
#   scripts/fuzz.sh --seeds 1..100 -- --backend sim --steps 20000
#   scripts/fuzz.sh --seeds 1..8 --jobs 2 -- --time 10m
# Prints one line per seed and a summary; exits 1 if any seed found something.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="" jobs=1 out="fuzz-campaign"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seeds) seeds="$2"; shift 2 ;;
        --jobs) jobs="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --) shift; break ;;
        *) echo "fuzz.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
if [[ ! "$seeds" =~ ^([0-9]+)\.\.([0-9]+)$ ]]; then
    echo "fuzz.sh: --seeds A..B is required (e.g. --seeds 1..100)" >&2
    exit 2
fi
first="${BASH_REMATCH[1]}" last="${BASH_REMATCH[2]}"
if (( first > last )); then
    echo "fuzz.sh: --seeds $seeds runs no seed: the first is past the last" >&2
    exit 2
fi
cargo build --release -p vmm -q
bin=target/release/vmm
mkdir -p "$out"
run_seed() {
    local seed="$1"; shift
    local dir="$out/seed-$seed"
    mkdir -p "$dir"
    if "$bin" fuzz --seed "$seed" --json --out "$dir" "$@" >"$dir/report.json" 2>"$dir/log.txt"; then
        echo "seed $seed: clean ($(grep -o '"steps_per_sec": [0-9.]*' "$dir/report.json" | cut -d' ' -f2) steps/s)"
    else
        echo "seed $seed: FINDING or error, see $dir/log.txt"
        return 1
    fi
}
export -f run_seed
export out bin
status=0
seq "$first" "$last" | xargs -P "$jobs" -I{} bash -c 'run_seed "$@"' _ {} "$@" || status=1
found=$( (grep -l '"findings": \[$' "$out"/seed-*/report.json 2>/dev/null || true) | wc -l)
echo "seeds $first..$last: $found with findings; reports under $out/"
exit "$status"
