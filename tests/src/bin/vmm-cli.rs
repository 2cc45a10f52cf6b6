//! The `vmm` command line, built inside the test package so integration tests
//! can run it (`CARGO_BIN_EXE_vmm-cli`); identical to `vmm/src/main.rs`.

fn main() {
    std::process::exit(vmm::cli::main_with_args(std::env::args_os()));
}
