//! Integration tests on real `/dev/kvm`; one binary, shared harness in `vmm_tests`.

mod cli;
mod faults;
mod launch;
mod memslots;
