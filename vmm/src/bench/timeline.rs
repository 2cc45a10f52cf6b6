//! Every timed access of a pass on one clock: vCPU `i`'s guest start stamps
//! minus KVM's TSC offset of that vCPU are host TSC values (see
//! `super::tsc`), so accesses of every vCPU and the churn writer's op
//! windows can be compared directly.

use super::config::FaultsConfig;
use super::error::BenchError;
use super::guest::GuestBench;
use super::plan;
use super::workset::Touch;

/// The accesses of the pass that just ran, every vCPU, in plan order, with
/// host-TSC start stamps. Needs the layout's stamp buffers
/// ([`FaultsConfig::wants_stamps`]) and KVM's TSC offsets.
pub fn touches(cfg: &FaultsConfig, bench: &GuestBench) -> Result<Vec<Touch>, BenchError> {
    let mut out = Vec::new();
    for i in 0..cfg.vcpus {
        let offset = bench.tsc_offsets[i as usize].as_ref().map_err(|why| {
            BenchError::Setup(format!(
                "cannot place vCPU {i}'s accesses on the host clock: {why}"
            ))
        })?;
        let n = cfg.accesses(i);
        let ticks = bench.results(i as usize, n);
        let stamps = bench.stamps(i as usize, n);
        if stamps.len() != ticks.len() {
            return Err(BenchError::Setup(
                "the pass recorded no start stamps (no stamp buffers in the layout)".into(),
            ));
        }
        for ((off, start), t) in plan::touched_offsets(cfg, i)
            .into_iter()
            .zip(stamps)
            .zip(ticks)
        {
            out.push(Touch {
                vcpu: i,
                offset: off,
                start: start.wrapping_sub(*offset as u64),
                ticks: t,
            });
        }
    }
    Ok(out)
}

/// Checks that every access, placed on the host clock, started and ended
/// inside the phase that ran it (`[phase_start, phase_end]`, host TSC read
/// before handing out the commands and after the last vCPU reported): if
/// not, the guest and host clocks differ by more than KVM's offset says,
/// and attributing accesses to host-stamped ops would be wrong.
pub fn check_on_host_clock(
    touches: &[Touch],
    phase_start: u64,
    phase_end: u64,
) -> Result<(), BenchError> {
    match touches
        .iter()
        .find(|t| t.start < phase_start || t.start.saturating_add(t.ticks) > phase_end)
    {
        Some(t) => Err(BenchError::Setup(format!(
            "vCPU {}'s access at offset {:#x} is stamped at host TSC {} (+{} ticks), outside its phase [{phase_start}, {phase_end}]: the guest TSC is not the host TSC plus KVM's offset on this host",
            t.vcpu, t.offset, t.start, t.ticks
        ))),
        None => Ok(()),
    }
}
