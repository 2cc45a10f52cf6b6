//! KVM binary statistics (`KVM_GET_STATS_FD`, Documentation/virt/kvm/api.rst
//! section 4.133), which kvm-ioctls does not wrap. A [`StatsReader`] is opened
//! once per VM or vCPU fd and reads every counter with two `pread`s.
//!
//! Layout of the stats fd: a header (flags, name_size, num_desc, id_offset,
//! desc_offset, data_offset), `num_desc` descriptors of `16 + name_size` bytes
//! (flags, exponent, size, offset, bucket_size, name), and the data block of
//! `u64`s at `data_offset + desc.offset`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// `KVM_GET_STATS_FD` = `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xAE << 8 | 0xCE;

/// Errors reading KVM statistics.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The ioctl failed (kernel without binary stats).
    #[error("KVM_GET_STATS_FD failed: {0}")]
    Open(io::Error),
    /// Reading the stats fd failed.
    #[error("reading KVM stats: {0}")]
    Read(io::Error),
    /// The header or a descriptor is inconsistent.
    #[error("malformed KVM stats data: {0}")]
    Malformed(&'static str),
}

#[derive(Debug, Clone)]
struct Descriptor {
    name: String,
    size: u32,
    offset: u32,
}

/// Reads one VM's or vCPU's binary statistics.
#[derive(Debug)]
pub struct StatsReader {
    file: File,
    data_offset: u64,
    data_len: usize,
    descriptors: Vec<Descriptor>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, StatsError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4-byte slice")))
        .ok_or(StatsError::Malformed("short descriptor block"))
}

impl StatsReader {
    /// Opens the statistics of a VM or vCPU file descriptor.
    pub fn open(fd: &impl AsRawFd) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1;
        // `fd` is a live KVM VM or vCPU descriptor borrowed for the call.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if raw < 0 {
            return Err(StatsError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut header = [0u8; 24];
        file.read_exact_at(&mut header, 0)
            .map_err(StatsError::Read)?;
        let name_size = u32_at(&header, 4)? as usize;
        let num_desc = u32_at(&header, 8)? as usize;
        let desc_offset = u64::from(u32_at(&header, 16)?);
        let data_offset = u64::from(u32_at(&header, 20)?);
        let desc_len = 16 + name_size;
        let mut block = vec![0u8; num_desc * desc_len];
        file.read_exact_at(&mut block, desc_offset)
            .map_err(StatsError::Read)?;
        let mut descriptors = Vec::with_capacity(num_desc);
        let mut data_len = 0usize;
        for d in block.chunks_exact(desc_len) {
            let size = u32::from(u16::from_le_bytes([d[6], d[7]]));
            let offset = u32_at(d, 8)?;
            let name_bytes = &d[16..];
            let end = name_bytes.iter().position(|&c| c == 0).unwrap_or(name_size);
            let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
            data_len = data_len.max(offset as usize + size as usize * 8);
            descriptors.push(Descriptor { name, size, offset });
        }
        Ok(Self {
            file,
            data_offset,
            data_len,
            descriptors,
        })
    }

    /// Reads every counter now. Histograms (size > 1) are summed.
    pub fn read(&self) -> Result<BTreeMap<String, u64>, StatsError> {
        let mut data = vec![0u8; self.data_len];
        self.file
            .read_exact_at(&mut data, self.data_offset)
            .map_err(StatsError::Read)?;
        let mut out = BTreeMap::new();
        for d in &self.descriptors {
            let start = d.offset as usize;
            let sum = data[start..start + d.size as usize * 8]
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk")))
                .fold(0u64, u64::wrapping_add);
            out.insert(d.name.clone(), sum);
        }
        Ok(out)
    }
}

/// Adds `b` into `a`, key by key.
pub fn accumulate(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

/// `after - before`, key by key (saturating).
pub fn delta(
    after: &BTreeMap<String, u64>,
    before: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .collect()
}
