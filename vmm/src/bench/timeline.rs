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
        for ((off, start), t) in plan::touched_offsets(cfg, i).into_iter().zip(stamps).zip(ticks) {
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
