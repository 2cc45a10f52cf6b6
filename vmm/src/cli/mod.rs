//! The command line. Every flag is parsed and validated here, before any VM
//! exists; a bad value is rejected with a message naming the flag and the
//! accepted form (clap exits with status 2).
//!
//! Sizes and durations are parsed by [`crate::units`], shared with scenario
//! files and `vmm bench`.
//!
//! Two binaries share this command line. `vmm` holds `vmm run` and hands
//! `vmm bench` and `vmm fuzz` to `vmm-harness`, the measurement and fuzzing
//! harness installed beside it ([`harness`]): a launch then loads, relocates
//! and faults in only the launcher's code (the harness is as large again,
//! with its plotting, histograms and progress bars). [`main_with_args`] runs
//! every subcommand in one process, for embedding and tests.

pub mod harness;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use guest_image::protocol::layout;

use crate::boot::elf::ElfImage;
use crate::mm::addr::{Gpa, GpaRange};
use crate::mm::backing::BackingKind;
use crate::mm::pin_account::PinLimit;
use crate::plan::BuiltinGuest;
use crate::run::{self, GuestSource, RunConfig, Verbosity};
use crate::scenario::Scenario;
use crate::units::{parse_duration, parse_mem};

/// The run's timeout when neither `--timeout` nor the scenario sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Parses `--guest`: a built-in name, or the path of an ELF image that loads.
pub fn parse_guest(s: &str) -> Result<GuestSource, String> {
    if let Ok(b) = s.parse::<BuiltinGuest>() {
        return Ok(GuestSource::Builtin(b));
    }
    let path = PathBuf::from(s);
    let bytes = read_image(&path).map_err(|e| {
        format!(
            "{s:?} is not a built-in guest ({}) and cannot be used as an image file: {e}",
            BuiltinGuest::names()
        )
    })?;
    let window = GpaRange::from_bounds(Gpa(layout::IMAGE_START), Gpa(layout::IMAGE_END))
        .expect("layout is ordered");
    ElfImage::parse(&bytes, window).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(GuestSource::Image {
        path,
        bytes: Arc::from(bytes),
    })
}

/// The largest guest image file accepted: an ELF whose segments fit the
/// image window (3 MiB) cannot need more than the window plus its headers;
/// 4 MiB leaves room for section tables and symbols.
pub const MAX_IMAGE_FILE: u64 = 4 << 20;

/// Reads an image file: a regular file of at most [`MAX_IMAGE_FILE`] bytes,
/// checked before reading and bounded while reading (a file that grows
/// meanwhile is cut at the limit and then refused), so `/dev/zero`, a FIFO or
/// a huge sparse file fail at once with bounded memory.
fn read_image(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let too_large =
        |n: u64| format!("{n} bytes, larger than the {MAX_IMAGE_FILE}-byte limit for guest images");
    if meta.len() > MAX_IMAGE_FILE {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_IMAGE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_IMAGE_FILE {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Parses `--scenario`: a scenario file that loads and validates.
pub fn parse_scenario(s: &str) -> Result<Arc<Scenario>, String> {
    Scenario::load(std::path::Path::new(s))
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let bytes = parse_mem(s)?;
    u32::try_from(bytes).map_err(|_| format!("{bytes} bytes is more than a dirty ring can hold"))
}

fn parse_pin_limit(s: &str) -> Result<PinLimit, String> {
    s.parse()
        .map_err(|e: crate::mm::pin_account::PinAccountError| e.to_string())
}

fn parse_backing(s: &str) -> Result<BackingKind, String> {
    s.parse()
        .map_err(|e: crate::mm::backing::BackingError| e.to_string())
}

/// A small KVM VMM for tiny test guests, built around a stage-2 guest memory manager.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

/// Subcommands. Each one's flags are built only when it is invoked
/// (`defer`): clap would otherwise build every flag of every subcommand at
/// each launch, allocations and code that `vmm run` does not need.
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum Cmd {
    /// Launch a test guest and report its result (the exit status is the guest's verdict).
    Run(RunArgs),
    /// Measure what the guest sees (`vmm bench faults`).
    Bench(HarnessArgs),
    /// Fuzz memory hotplug against a model; findings become shrunk scenario files.
    Fuzz(HarnessArgs),
}

/// The flags of a harness subcommand (`vmm bench`, `vmm fuzz`), passed on
/// unread: the harness's own command line ([`harness::HarnessCli`]) parses
/// them, `--help` included.
#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct HarnessArgs {
    /// The harness subcommand's arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<OsString>,
}

/// `vmm run` flags. (The `about` repeats [`Cmd::Run`]'s: a deferred
/// subcommand's help takes the struct's.)
#[derive(Debug, Args)]
#[command(
    about = "Launch a test guest and report its result (the exit status is the guest's verdict)"
)]
pub struct RunArgs {
    /// Guest RAM size, placed at guest-physical 1 GiB (e.g. 256M, 2G).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_mem)]
    pub mem: u64,
    /// Number of vCPUs (1 to 64): one runs on the main thread, several each
    /// on its own thread.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=layout::MAX_VCPUS))]
    pub vcpus: u64,
    /// Host memory behind guest RAM: anon, shared, memfd, thp, hugetlb or file=PATH.
    #[arg(long, value_name = "KIND", default_value = "anon", value_parser = parse_backing)]
    pub backing: BackingKind,
    /// Guest program: a built-in name (default, hello, page-fault, bad-insn, spin, verify-mismatch) or an ELF image path.
    #[arg(long, value_name = "NAME|PATH", default_value = "default", value_parser = parse_guest)]
    pub guest: GuestSource,
    /// Stop the guest and fail after this long (e.g. 30s, 500ms, 2m; default:
    /// the scenario's `timeout`, else 60s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Seed of the memory pattern the default guest writes and verifies.
    #[arg(long, value_name = "N", default_value_t = 0x005E_ED0F_CAFE)]
    pub seed: u64,
    /// Run a scenario file (a TOML timeline of memory ops, guest commands and
    /// expectations; see scenarios/README.md). Its mem, vcpus and backing, if
    /// set, override the flags.
    #[arg(long, value_name = "FILE", value_parser = parse_scenario)]
    pub scenario: Option<Arc<Scenario>>,
    /// Limit of pinned guest memory for device DMA: a size (256M), `NNNp`
    /// pages, or `unlimited` (default: the RLIMIT_MEMLOCK soft limit).
    #[arg(long, value_name = "SIZE", value_parser = parse_pin_limit)]
    pub pin_limit: Option<PinLimit>,
    /// Map device DMA through VFIO (needs a VFIO container and a device bound
    /// to vfio-pci; fails with the reason where there is none).
    #[arg(long)]
    pub vfio: bool,
    /// Dirty-page logging: bitmap (KVM_GET_DIRTY_LOG), manual (manual protect,
    /// initially set, KVM_CLEAR_DIRTY_LOG by range) or ring (per-vCPU dirty
    /// rings); a mode the host lacks is refused with the reason.
    #[arg(long, value_name = "MODE", default_value = "bitmap")]
    pub dirty_log: crate::mm::manager::DirtyLogMode,
    /// Bytes of each vCPU's dirty ring with `--dirty-log ring` (64K default;
    /// a power of two from 4K up to what KVM offers, 1M here).
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_ring_size)]
    pub dirty_ring_size: u32,
    /// What a memslot move or delete invalidates in KVM's page tables: slot
    /// (only that slot's translations) or all (every translation of the VM,
    /// KVM's default-VM quirk). A host that cannot do `slot` falls back to
    /// `all`, with the reason under -v.
    #[arg(long, value_name = "ZAP", value_enum, default_value_t = crate::kvm::zap::MemslotZap::Slot)]
    pub memslot_zap: crate::kvm::zap::MemslotZap,
    /// Print a JSON report on stdout at the end (console output moves to stderr).
    #[arg(long)]
    pub json: bool,
    /// More output: per-command progress (repeatable).
    #[arg(short, long, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors on the console.
    #[arg(short, long)]
    pub quiet: bool,
}

impl RunArgs {
    /// The run configuration these flags describe.
    pub fn to_config(&self) -> RunConfig {
        let scenario = self.scenario.as_deref();
        RunConfig {
            mem_size: scenario.and_then(|s| s.mem).map_or(self.mem, |n| n.0),
            vcpus: scenario.and_then(|s| s.vcpus).unwrap_or(self.vcpus),
            backing: scenario.and_then(|s| s.backing.as_deref()).map_or_else(
                || self.backing.clone(),
                |b| b.parse().expect("validated when the scenario was loaded"),
            ),
            scenario: self.scenario.clone(),
            pin_limit: scenario
                .and_then(|s| s.pin_limit.as_deref())
                .map_or(self.pin_limit, |l| {
                    Some(l.parse().expect("validated when the scenario was loaded"))
                }),
            dirty_ring_bytes: self.dirty_ring_size,
            // Nothing reads them when no report is printed.
            kvm_stats: self.json || !self.quiet,
            memslot_zap: self.memslot_zap,
            dirty_log: scenario
                .and_then(|s| s.dirty_log.as_deref())
                .map_or(self.dirty_log, |m| {
                    m.parse().expect("validated when the scenario was loaded")
                }),
            guest: self.guest.clone(),
            timeout: self
                .timeout
                .or_else(|| {
                    scenario
                        .and_then(|s| s.timeout.as_ref())
                        .map(|t| t.duration())
                })
                .unwrap_or(DEFAULT_TIMEOUT),
            seed: self.seed,
            verbosity: if self.quiet {
                Verbosity::Quiet
            } else if self.verbose > 0 {
                Verbosity::Verbose
            } else {
                Verbosity::Normal
            },
        }
    }
}

/// Runs the CLI with `args` (including the program name) in this process,
/// every subcommand included; returns the exit status.
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    main_handing_off(args, harness::main_with_args)
}

/// Runs the CLI with `args`: `vmm run` here, while `vmm bench` and
/// `vmm fuzz` go to `harness` with the whole argument list (the program
/// name, the subcommand and its arguments). The `vmm` binary passes
/// [`harness::exec`]; passing [`harness::main_with_args`] runs them here.
pub fn main_handing_off<I, T>(args: I, harness: fn(Vec<OsString>) -> i32) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let args = match cli.command {
        Some(Cmd::Run(a)) => a,
        Some(Cmd::Bench(a)) => return harness(harness::argv("bench", a)),
        Some(Cmd::Fuzz(a)) => return harness(harness::argv("fuzz", a)),
        None => {
            eprintln!("vmm: no command given; try `vmm run` (a default guest) or `vmm --help`");
            return 2;
        }
    };
    if args.vfio {
        if let Err(e) = crate::devices::vfio::probe(std::path::Path::new("/dev/vfio")) {
            eprintln!("vmm: {e}");
            return 2;
        }
    }
    let config = args.to_config();
    if config.dirty_log != crate::mm::manager::DirtyLogMode::Bitmap {
        // A mode the host lacks is a bad flag: refused before any VM exists.
        if let Err(e) = crate::kvm::memslots::check_mode(config.dirty_log, config.dirty_ring_bytes)
        {
            eprintln!("vmm: {e}");
            return 2;
        }
    }
    if let BackingKind::File(path) = &config.backing {
        // Bad file arguments are bad flags: refused before any VM exists.
        if let Err(e) = crate::mm::backing::open_backing_file(path, config.mem_size) {
            eprintln!("vmm: --backing: {e}");
            return 2;
        }
    }
    let console: Box<dyn Write + Send> = if args.json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    match run::run_with(&config, console, run::Teardown::ProcessExits) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("vmm: cannot encode the report: {e}"),
                }
            }
            match &report.error {
                None => 0,
                Some(e) => {
                    eprintln!("vmm: {e}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_guest_missing_path_names_builtins() {
        let e = parse_guest("/nonexistent/guest.elf").unwrap_err();
        assert!(e.contains("default, hello"), "{e}");
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn test_cli_defaults_need_no_arguments() {
        let cli = Cli::try_parse_from(["vmm", "run"]).unwrap();
        let Some(Cmd::Run(a)) = cli.command else {
            panic!("run")
        };
        assert_eq!((a.mem, a.vcpus), (256 << 20, 2));
    }

    #[test]
    fn test_cli_reads_kvm_stats_only_for_a_printed_report() {
        for (flags, wanted) in [
            (&[][..], true),
            (&["--json"][..], true),
            (&["-q", "--json"][..], true),
            (&["-q"][..], false),
        ] {
            let mut args = vec!["vmm", "run"];
            args.extend_from_slice(flags);
            let Some(Cmd::Run(a)) = Cli::try_parse_from(&args).unwrap().command else {
                panic!("run")
            };
            assert_eq!(a.to_config().kvm_stats, wanted, "{flags:?}");
        }
    }

    #[test]
    fn test_cli_vcpus_out_of_range_is_rejected() {
        for bad in ["0", "100000"] {
            let e = Cli::try_parse_from(["vmm", "run", "--vcpus", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--vcpus") && e.contains("1..=64"), "{e}");
        }
    }
}
