//! Coverage-guided fuzzing of the memory manager on the simulated KVM: the
//! input decodes (with `arbitrary`) into scenario steps and points where a
//! memslot change fails; `vmm::fuzz::bytes::run` runs them in lockstep with
//! the model and checks the invariants after every step. A finding panics,
//! which libFuzzer records with the input. `cargo test -p vmm` replays the
//! committed corpus (`fuzz/corpus/memslots`) through the same function.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(finding) = vmm::fuzz::bytes::run(data) {
        panic!("{finding}");
    }
});
