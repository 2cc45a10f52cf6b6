//! `vmm`, the launcher: `vmm run` here; `vmm bench` and `vmm fuzz` are
//! handed to `vmm-harness` beside it (see `vmm::cli::harness`).

fn main() {
    std::process::exit(vmm::cli::main_handing_off(
        std::env::args_os(),
        vmm::cli::harness::exec,
    ));
}
