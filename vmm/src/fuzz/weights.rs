//! The step families' weights, and their `--weights` syntax.

/// Relative weights of the step families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weights {
    /// plug.
    pub plug: u64,
    /// unplug.
    pub unplug: u64,
    /// protect.
    pub protect: u64,
    /// move.
    pub moves: u64,
    /// resize.
    pub resize: u64,
    /// dirty-log and dirty-pages.
    pub dirty: u64,
    /// plug-many.
    pub plug_many: u64,
    /// pin, unpin, check.
    pub pins: u64,
    /// guest commands (real tier only).
    pub guest: u64,
    /// DMA (real tier only).
    pub dma: u64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            plug: 14,
            unplug: 8,
            protect: 8,
            moves: 6,
            resize: 6,
            dirty: 5,
            plug_many: 2,
            pins: 8,
            guest: 20,
            dma: 6,
        }
    }
}

impl std::str::FromStr for Weights {
    type Err = String;
    /// `plug=10,guest=0,...`: the named weights replace the defaults.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut w = Weights::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected NAME=WEIGHT"))?;
            let v: u64 = v.parse().map_err(|e| format!("{part:?}: {e}"))?;
            let slot = match k {
                "plug" => &mut w.plug,
                "unplug" => &mut w.unplug,
                "protect" => &mut w.protect,
                "move" => &mut w.moves,
                "resize" => &mut w.resize,
                "dirty" => &mut w.dirty,
                "plug-many" => &mut w.plug_many,
                "pins" => &mut w.pins,
                "guest" => &mut w.guest,
                "dma" => &mut w.dma,
                _ => return Err(format!("unknown weight {k:?}: expected plug, unplug, protect, move, resize, dirty, plug-many, pins, guest, dma")),
            };
            *slot = v;
        }
        let total = [
            w.plug,
            w.unplug,
            w.protect,
            w.moves,
            w.resize,
            w.dirty,
            w.plug_many,
            w.pins,
            w.guest,
            w.dma,
        ]
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b));
        if total == 0 {
            return Err(format!(
                "{s:?}: every weight is 0, so nothing could be generated"
            ));
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_weights_that_are_all_zero_are_refused() {
        let all_zero =
            "plug=0,unplug=0,protect=0,move=0,resize=0,dirty=0,plug-many=0,pins=0,guest=0,dma=0";
        let e = all_zero.parse::<Weights>().unwrap_err();
        assert!(e.contains("every weight is 0"), "{e}");
        let dma_only =
            "plug=0,unplug=0,protect=0,move=0,resize=0,dirty=0,plug-many=0,pins=0,guest=0";
        assert_eq!(dma_only.parse::<Weights>().unwrap().dma, 6);
    }
}
