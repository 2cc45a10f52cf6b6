#!/bin/bash -eu
# OSS-Fuzz / ClusterFuzzLite style build of the libFuzzer targets: builds
# every target with cargo-fuzz (optimized, debug assertions on, the
# sanitizer OSS-Fuzz asks for in $SANITIZER, default address, and no
# comparison tracing: docs/fuzzing.md, "Fourth pass") and copies the
# binaries to $OUT, with the committed corpus as $OUT/<target>_seed_corpus.zip
# when zip is available.
#   OUT=/tmp/fuzz-out fuzz/build.sh && /tmp/fuzz-out/memslots -max_total_time=60
#   OUT=/tmp/fuzz-out SANITIZER=none fuzz/build.sh
#   OUT=/tmp/fuzz-out SANITIZER=coverage fuzz/build.sh   (the engine's coverage job)
# cargo-fuzz needs nightly flags; on a stable toolchain RUSTC_BOOTSTRAP=1
# allows them (as here).
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory the fuzzer binaries go to}"
export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"
# OSS-Fuzz / ClusterFuzzLite name the build in $SANITIZER. cargo-fuzz
# knows address, leak, memory and thread; Rust has no UBSan (its own checks,
# debug assertions and overflow checks, are on in every build), and a
# coverage build is an uninstrumented-for-sanitizers build with LLVM's
# source-based coverage, which the engine's coverage job reads.
sanitizer=${SANITIZER:-address}
case "$sanitizer" in
    address|leak|memory|thread|none) ;;
    undefined) sanitizer=none ;;
    coverage)
        sanitizer=none
        export RUSTFLAGS="${RUSTFLAGS:-} -C instrument-coverage"
        ;;
    *)
        echo "fuzz/build.sh: SANITIZER=$sanitizer is not one this build knows (address, leak, memory, thread, undefined, coverage, none)" >&2
        exit 2
        ;;
esac
cargo fuzz build -O --debug-assertions --no-trace-compares --sanitizer "$sanitizer"
target_dir=fuzz/target/x86_64-unknown-linux-gnu/release
mkdir -p "$OUT"
for t in $(cargo fuzz list); do
    cp "$target_dir/$t" "$OUT/"
    if [ -d "fuzz/corpus/$t" ] && command -v zip >/dev/null; then
        rm -f "$OUT/${t}_seed_corpus.zip"
        (cd "fuzz/corpus/$t" && zip -q -r "$OUT/${t}_seed_corpus.zip" .)
    fi
done
