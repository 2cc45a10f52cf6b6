//! Integration tests on real `/dev/kvm`; one binary, shared harness in `vmm_tests`.

mod bench_dirty;
mod bench_memslots;
mod churn;
mod cli;
mod common;
mod dirty;
mod dma;
mod faults;
mod fuzz;
mod iommu;
mod launch;
mod memslots;
mod scenarios;
mod stress;
