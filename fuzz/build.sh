#!/bin/bash -eu
# OSS-Fuzz / ClusterFuzzLite style build of the libFuzzer targets: builds
# every target with cargo-fuzz (optimized, debug assertions on, the
# sanitizer OSS-Fuzz asks for in $SANITIZER, default address) and copies the
# binaries to $OUT, with the committed corpus as $OUT/<target>_seed_corpus.zip
# when zip is available.
#   OUT=/tmp/fuzz-out fuzz/build.sh && /tmp/fuzz-out/memslots -max_total_time=60
#   OUT=/tmp/fuzz-out SANITIZER=none fuzz/build.sh
# cargo-fuzz needs nightly flags; on a stable toolchain RUSTC_BOOTSTRAP=1
# allows them (as here).
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory the fuzzer binaries go to}"
export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"
sanitizer=${SANITIZER:-address}
cargo fuzz build -O --debug-assertions --sanitizer "$sanitizer"
target_dir=fuzz/target/x86_64-unknown-linux-gnu/release
mkdir -p "$OUT"
for t in $(cargo fuzz list); do
    cp "$target_dir/$t" "$OUT/"
    if [ -d "fuzz/corpus/$t" ] && command -v zip >/dev/null; then
        rm -f "$OUT/${t}_seed_corpus.zip"
        (cd "fuzz/corpus/$t" && zip -q -r "$OUT/${t}_seed_corpus.zip" .)
    fi
done
