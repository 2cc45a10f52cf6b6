//! Builds the guest programs from source with the toolchain as shipped: the
//! host target, freestanding (`no_std`, no start files, no libc), statically
//! linked at fixed addresses by our linker scripts. No extra target is needed.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn build_guest(name: &str, out_dir: &Path) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest");
    let src = dir.join(format!("{name}.rs"));
    let script = dir.join(format!("{name}.ld"));
    let out = out_dir.join(format!("{name}.elf"));
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = env::var("TARGET").expect("cargo sets TARGET");
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            name,
        ])
        .args(["--target", &target])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "debuginfo=0",
            // The precompiled `core` brings its own debug info (600 KB of the
            // 620 KB image), which every launch would copy and parse.
            "-C",
            "strip=debuginfo",
        ])
        .args(["-C", "relocation-model=static", "-C", "code-model=small"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static", "-C", "link-arg=-no-pie"])
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("running rustc for the guest");
    assert!(status.success(), "building guest program {name} failed");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", script.display());
}

fn main() {
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    assert_eq!(
        env::var("CARGO_CFG_TARGET_ARCH").as_deref(),
        Ok("x86_64"),
        "guest programs are x86-64 code: build on an x86-64 host"
    );
    build_guest("firmware", &out_dir);
    build_guest("runtime", &out_dir);
    println!("cargo:rerun-if-changed=src/protocol.rs");
    println!("cargo:rerun-if-changed=build.rs");
}
