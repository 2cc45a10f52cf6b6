//! The harness's command line: `vmm bench` and `vmm fuzz`, the binary
//! `vmm-harness`.
//!
//! The measurement harness and the fuzzer are as much code again as the
//! launcher, with their plotting, histograms and progress bars. A launch
//! would pay for all of it (every page of relocated data written by the
//! dynamic loader, code spread over twice the pages), so they live in their
//! own binary. `vmm bench ...` and `vmm fuzz ...` look the same to a user:
//! the launcher replaces itself with `vmm-harness` from its own directory
//! ([`exec`]), which parses the flags under the name `vmm`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use super::HarnessArgs;

/// The harness binary's file name, looked up beside the launcher.
pub const HARNESS_BIN: &str = "vmm-harness";

/// `vmm bench` and `vmm fuzz`, as `vmm-harness` parses them.
#[derive(Debug, Parser)]
#[command(name = "vmm", bin_name = "vmm", version, about, long_about = None)]
pub struct HarnessCli {
    /// What to do.
    #[command(subcommand)]
    pub command: HarnessCmd,
}

/// The harness's subcommands (flags built only when invoked, as for
/// [`super::Cmd`]).
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum HarnessCmd {
    /// Measure what the guest sees (`vmm bench faults`).
    Bench(BenchArgs),
    /// Fuzz memory hotplug against a model; findings become shrunk scenario files.
    Fuzz(crate::fuzz::campaign::FuzzArgs),
}

/// `vmm bench` subcommands. (The `about` repeats [`HarnessCmd::Bench`]'s: a
/// deferred subcommand's help takes the struct's.)
#[derive(Debug, Args)]
#[command(about = "Measure what the guest sees (`vmm bench faults`)")]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub which: BenchCmd,
}

/// Benchmarks (flags built only when invoked, as for [`HarnessCmd`]).
#[derive(Debug, Subcommand)]
#[command(defer = true)]
// Parsed once per process and matched at once: the size difference between
// the flag sets costs nothing, and boxing would obscure the clap derive.
#[allow(clippy::large_enum_variant)]
pub enum BenchCmd {
    /// Guest page-fault latency per access: percentiles, JSON, a plot, raw-KVM and host baselines.
    Faults(crate::bench::FaultsArgs),
    /// Memslot ops at 509 to 32,764 slots under a running guest (KVM's memslot_perf_test) vs raw ioctls.
    Memslots(crate::bench::memslots::MemslotsArgs),
    /// Dirty-page tracking per mode (bitmap, manual, ring): vCPU pass, collect and clear times vs a raw program (KVM's dirty_log_perf_test).
    Dirty(crate::bench::dirty::DirtyArgs),
}

/// The argument list a harness subcommand runs with: the program name,
/// `subcommand`, then its arguments as given.
pub fn argv(subcommand: &str, args: HarnessArgs) -> Vec<OsString> {
    let mut argv = vec![OsString::from("vmm"), OsString::from(subcommand)];
    argv.extend(args.args);
    argv
}

/// Runs `vmm bench` or `vmm fuzz` in this process (`args` as [`argv`]
/// builds them); returns the exit status.
pub fn main_with_args(args: Vec<OsString>) -> i32 {
    let cli = match HarnessCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match cli.command {
        HarnessCmd::Bench(BenchArgs {
            which: BenchCmd::Faults(a),
        }) => crate::bench::faults(&a),
        HarnessCmd::Bench(BenchArgs {
            which: BenchCmd::Memslots(a),
        }) => crate::bench::memslots::memslots(&a),
        HarnessCmd::Bench(BenchArgs {
            which: BenchCmd::Dirty(a),
        }) => crate::bench::dirty::dirty(&a),
        HarnessCmd::Fuzz(a) => crate::fuzz::campaign::main(&a),
    }
}

/// Where the launcher finds the harness: [`HARNESS_BIN`] in the launcher's
/// own directory (cargo builds and installs the two side by side).
///
/// # Errors
/// The reason the launcher's own path is unknown.
pub fn harness_path() -> Result<PathBuf, String> {
    let me = std::env::current_exe()
        .map_err(|e| format!("cannot find this program's own path to start {HARNESS_BIN}: {e}"))?;
    Ok(me.with_file_name(HARNESS_BIN))
}

/// Replaces this process with the harness binary running `args` (as
/// [`argv`] builds them). Returns only on failure, with exit status 2
/// after naming the binary it looked for.
pub fn exec(args: Vec<OsString>) -> i32 {
    let path = match harness_path() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vmm: {e}");
            return 2;
        }
    };
    let (name, rest) = args.split_first().expect("argv() starts with the name");
    let e = std::process::Command::new(&path)
        .arg0(name)
        .args(rest)
        .exec();
    eprintln!("{}", missing_harness(&path, &e));
    2
}

/// The message for a harness binary that cannot be started.
fn missing_harness(path: &Path, e: &std::io::Error) -> String {
    format!(
        "vmm: `vmm bench` and `vmm fuzz` run in {HARNESS_BIN}, expected beside vmm at {}: {e} \
         (it is built with vmm: `cargo build --release -p vmm` builds both)",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_harness_subcommand_help_keeps_the_subcommand_about() {
        // Subcommands are deferred: each one's help must still open with
        // the line the launcher's help lists for it.
        let top = super::super::Cli::try_parse_from(["vmm", "--help"])
            .unwrap_err()
            .to_string();
        for (path, about) in [
            (&["fuzz"][..], "Fuzz memory hotplug"),
            (&["bench"][..], "Measure what the guest sees"),
            (&["bench", "faults"][..], "Guest page-fault latency"),
            (&["bench", "memslots"][..], "Memslot ops"),
            (&["bench", "dirty"][..], "Dirty-page tracking"),
        ] {
            let mut args = vec!["vmm"];
            args.extend_from_slice(path);
            args.push("--help");
            let help = HarnessCli::try_parse_from(&args).unwrap_err().to_string();
            assert!(help.starts_with(about), "{path:?}: {help}");
            if let [name] = path {
                let listed = |l: &str| l.trim_start().starts_with(name) && l.contains(about);
                assert!(top.lines().any(listed), "{top}");
            }
        }
    }

    #[test]
    fn test_launcher_passes_harness_flags_on_unread() {
        // `--help`, unknown flags and values all reach the harness as given.
        let cli = super::super::Cli::try_parse_from([
            "vmm", "bench", "faults", "--help", "--size", "-1", "--bogus",
        ])
        .unwrap();
        let Some(super::super::Cmd::Bench(a)) = cli.command else {
            panic!("bench")
        };
        assert_eq!(
            argv("bench", a),
            ["vmm", "bench", "faults", "--help", "--size", "-1", "--bogus"]
        );
    }

    #[test]
    fn test_in_process_harness_refuses_bad_flags_with_exit_2() {
        let status = super::super::main_with_args(["vmm", "fuzz", "--steps", "many"]);
        assert_eq!(status, 2);
    }

    #[test]
    fn test_missing_harness_message_names_the_path_and_the_fix() {
        let e = std::io::Error::from_raw_os_error(libc::ENOENT);
        let m = missing_harness(Path::new("/opt/bin/vmm-harness"), &e);
        assert!(m.contains("/opt/bin/vmm-harness"), "{m}");
        assert!(m.contains("cargo build --release -p vmm"), "{m}");
    }
}
