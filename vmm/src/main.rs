//! The `vmm` command line; everything lives in the library (`vmm::cli`).

fn main() {
    std::process::exit(vmm::cli::main_with_args(std::env::args_os()));
}
