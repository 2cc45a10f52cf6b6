//! `vmm-harness`: `vmm bench` and `vmm fuzz`, which the `vmm` launcher
//! hands over to this binary (see `vmm::cli::harness`). It can be run
//! directly with the same arguments: `vmm-harness bench faults ...`.

fn main() {
    std::process::exit(vmm::cli::harness::main_with_args(
        std::env::args_os().collect(),
    ));
}
