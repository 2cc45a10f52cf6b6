#!/bin/bash -eu
# OSS-Fuzz style build of the libFuzzer targets: builds every target with
# cargo-fuzz (sanitizer and coverage flags) and copies the binaries to $OUT.
# Locally: OUT=/tmp/fuzz-out fuzz/build.sh, then /tmp/fuzz-out/memslots.
# cargo-fuzz needs nightly flags; on a stable toolchain RUSTC_BOOTSTRAP=1
# allows them (as here).
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory the fuzzer binaries go to}"
export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"
cargo fuzz build -O --debug-assertions
target_dir=fuzz/target/x86_64-unknown-linux-gnu/release
mkdir -p "$OUT"
for t in $(cargo fuzz list); do
    cp "$target_dir/$t" "$OUT/"
done
