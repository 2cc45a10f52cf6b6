//! Coverage-guided fuzzing of the memory manager on the simulated KVM: the
//! input decodes (with `arbitrary`) into scenario steps and points where a
//! memslot change fails; `vmm::fuzz::bytes::run` runs them in lockstep with
//! the model and checks the invariants after every step. A finding panics,
//! which libFuzzer records with the input. `cargo test -p vmm` replays the
//! committed corpus (`fuzz/corpus/memslots`) through the same function.
//!
//! Two environment variables serve `scripts/bench-fuzz-libfuzzer.sh`:
//! `VMM_FUZZ_DECODE_ONLY=1` makes every input only decode (the rate
//! libFuzzer itself allows this binary on this host, a ceiling), and
//! `VMM_FUZZ_STEPS=FILE` writes to FILE how many inputs ran each number of
//! steps (every 1024 inputs).
//!
//! Unless `TMPDIR` is set, the target sets it to `/dev/shm` when that is
//! a writable tmpfs with room ([`files`]): `file` plugs create their
//! unnamed files there.
//!
//! The coverage libFuzzer steers by is the code under test's: after every
//! input the counters of the code that judges it (the model, the simulated
//! VM's steps, checks and reset, the decoder, the scenario invariants and
//! the manager's consistency check) are cleared before libFuzzer reads them
//! ([`oracle`]). `VMM_FUZZ_ORACLE_COVERAGE=1` keeps them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: files::on_tmpfs(),
    |data: &[u8]| {
        if bench::decode_only() {
            std::hint::black_box(vmm::fuzz::bytes::decode(data));
            return;
        }
        match vmm::fuzz::bytes::run(data) {
            Ok(steps) => {
                oracle::clear();
                bench::count(steps);
            }
            Err(finding) => panic!("{finding}"),
        }
    }
);

mod elf;
mod oracle;

/// Where the unnamed files of `file` plugs go.
mod files {
    use std::ffi::{CStr, OsStr};
    use std::mem::MaybeUninit;
    use std::os::unix::ffi::OsStrExt;

    /// Shared memory's tmpfs.
    const TMPFS: &CStr = c"/dev/shm";
    /// Free space it must have: an input pins at most 16 MiB and DMA a
    /// few pages more; the rest of a file is never populated. (A
    /// container's default of 64 MB can be shared with others.)
    const MIN_FREE: u64 = 256 << 20;

    /// Points `TMPDIR` at tmpfs unless the user set it. A `file` plug
    /// creates an unnamed file in `TMPDIR` and pins and DMA populate its
    /// pages: on a disk file system (ext4 `/tmp` here) each populated page
    /// is page cache filled by readahead and dropped again at the unplug,
    /// so such inputs cost 9 to 16 times as much as on tmpfs, while the
    /// memory manager sees the same shared file mapping either way.
    /// libFuzzer's own temporary files (`-fork`'s work directory, `-merge`'s
    /// control file) follow `TMPDIR` too. Left as it is when `/dev/shm`
    /// is not a tmpfs this process may write with `MIN_FREE` available.
    pub fn on_tmpfs() {
        if std::env::var_os("TMPDIR").is_some() {
            return;
        }
        match usable() {
            Ok(()) => {
                // Runs from LLVMFuzzerInitialize, before libFuzzer starts
                // its other threads: no thread reads the environment
                // meanwhile.
                std::env::set_var("TMPDIR", OsStr::from_bytes(TMPFS.to_bytes()));
                eprintln!("INFO: unnamed files of `file` plugs in {TMPFS:?} (TMPDIR was unset)");
            }
            Err(why) => {
                let tmp = std::env::temp_dir();
                eprintln!("INFO: unnamed files of `file` plugs in {tmp:?}: {TMPFS:?} {why}");
            }
        }
    }

    fn usable() -> Result<(), String> {
        let mut fs = MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: a NUL-terminated path and room for one `statfs`, which the
        // call fills when it returns 0.
        if unsafe { libc::statfs(TMPFS.as_ptr(), fs.as_mut_ptr()) } != 0 {
            return Err(format!("{}", std::io::Error::last_os_error()));
        }
        // SAFETY: filled, as statfs returned 0.
        let fs = unsafe { fs.assume_init() };
        if fs.f_type != libc::TMPFS_MAGIC {
            return Err(format!("is not a tmpfs (type {:#x})", fs.f_type));
        }
        let free = fs.f_bavail.saturating_mul(fs.f_bsize as u64);
        if free < MIN_FREE {
            return Err(format!(
                "has {} MiB free, under {} MiB",
                free >> 20,
                MIN_FREE >> 20
            ));
        }
        // SAFETY: a NUL-terminated path; access only reads it.
        if unsafe { libc::access(TMPFS.as_ptr(), libc::W_OK) } != 0 {
            return Err("is not writable".into());
        }
        Ok(())
    }
}

/// The benchmark's switches; see the crate docs.
mod bench {
    use std::path::PathBuf;
    use std::sync::{LazyLock, Mutex};

    /// Steps an input decodes to at most.
    const MAX_STEPS: usize = 64;

    static DECODE_ONLY: LazyLock<bool> =
        LazyLock::new(|| std::env::var_os("VMM_FUZZ_DECODE_ONLY").is_some_and(|v| v == "1"));
    static STEPS: LazyLock<Option<PathBuf>> =
        LazyLock::new(|| std::env::var_os("VMM_FUZZ_STEPS").map(PathBuf::from));
    /// Inputs by the number of steps they ran.
    static RAN: Mutex<[u64; MAX_STEPS + 1]> = Mutex::new([0; MAX_STEPS + 1]);

    pub fn decode_only() -> bool {
        *DECODE_ONLY
    }

    /// Counts an input that ran `steps` steps, if asked to.
    pub fn count(steps: usize) {
        let Some(path) = STEPS.as_ref() else { return };
        let mut ran = RAN.lock().unwrap_or_else(|e| e.into_inner());
        ran[steps.min(MAX_STEPS)] += 1;
        if ran.iter().sum::<u64>() % 1024 == 0 {
            let lines: String = ran
                .iter()
                .enumerate()
                .map(|(steps, inputs)| format!("{steps} {inputs}\n"))
                .collect();
            // Written whole, then renamed over: a reader never sees half.
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, lines).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
}
