#!/usr/bin/env bash
# Guest page-fault latency: every backing side by side, with a
# re-fault pass after MADV_DONTNEED, the raw-KVM and host-only baselines,
# then userfaultfd handler placement and guest page size. Release build.
# Writes the JSON reports, SVG plots and histograms (HDR .hgrm, log2) to
# $OUT (default target/bench-faults).
#
#   scripts/bench-faults.sh [SIZE]      (default 64M)
#   SCALING_VCPUS=N                     top of the uffd scaling sweep (default 2: this host's CPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-64M}
target=${CARGO_TARGET_DIR:-target}
out=${OUT:-$target/bench-faults}
mkdir -p "$out"
cargo build --release -q -p vmm --bins --examples
vmm=$target/release/vmm

run() { # name, flags...
    local name=$1
    shift
    echo "== vmm bench faults $* --json --plot $out/$name.svg"
    "$vmm" bench faults "$@" -q --json --plot "$out/$name.svg" \
        --histograms "$out/hist-$name" >"$out/$name.json"
}

# 1. Every backing, first touch and re-fault, baselines (writes: reads of
#    anonymous memory map the shared zero page and measure something else).
#    hugetlb only where huge pages are reserved: a backing the host cannot
#    provide fails the bench (exit 1), as it fails `vmm run`.
backings=anon,shared,memfd,thp,prefault,file,uffd-zero,uffd-copy,uffd-minor,uffd-wp
if [ "$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)" -gt 0 ]; then
    backings=$backings,hugetlb
else
    echo "(hugetlb left out: no free huge pages; reserve them in /proc/sys/vm/nr_hugepages)"
fi
run backings --size "$size" --access write --refault --rounds 3 --compare "$backings" 2>&1
# 2. userfaultfd handler on the vCPU's CPU or another one (reads, so
#    uffd-copy's content is verified by the guest).
for where in same other; do
    run "uffd-$where" --size 16M --access read --uffd-cpu "$where" --compare uffd-zero,uffd-copy 2>&1
done
# 2b. userfaultfd in full: every mode with reads (copy and minor content
#     verified by the guest; wp reads must not fault) and writes, each with
#     its raw baseline (a minimal handler); handler threads, one uffd per
#     vCPU, an injected delay; then pages/s against vCPU count.
uffd=uffd-zero,uffd-copy,uffd-minor,uffd-wp
for access in read write; do
    run "uffd-modes-$access" --size 16M --access "$access" --rounds 3 --compare "$uffd" 2>&1
done
run uffd-2vcpus-per-vcpu --size 16M --vcpus 2 --uffd-per-vcpu --compare "$uffd" 2>&1
run uffd-2vcpus-shared-2handlers --size 16M --vcpus 2 --share shared --uffd-handlers 2 --compare uffd-zero,uffd-minor 2>&1
run uffd-delay-100us --size 4M --handler-delay 100us --compare uffd-copy,uffd-minor 2>&1
run uffd-scaling --size 16M --access write --scaling --rounds 3 --vcpus "${SCALING_VCPUS:-2}" --uffd-per-vcpu --uffd-cpu same --compare uffd-minor,uffd-copy 2>&1
# 3. Guest page-table page size over the range (1G is refused on hosts whose
#    KVM CPUID lacks pdpe1gb, as this one).
for page in 4K 2M; do
    run "guest-$page" --size "$size" --guest-page "$page" --compare anon,thp --no-baselines 2>&1
done
"$vmm" bench faults --size 2M --guest-page 1G 2>&1 || true
# 4. Patterns and vCPUs.
run random --size 16M --pattern random --compare anon,prefault 2>&1
run two-vcpus-shared --size "$size" --vcpus 2 --share shared --compare anon,thp --no-baselines 2>&1
echo "JSON and plots in $out"
