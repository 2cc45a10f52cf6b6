//! Timelines: the generator's actions made into scenario steps whose
//! expectations are the model's predictions, and the final sweep.

use crate::scenario::step::{self, Action, Step};
use crate::scenario::{Expect, Outcome};

use super::gen::{verify_run, GenConfig, Generator};
use super::model::slots::PAGE;
use super::model::{Layout, Model};

/// Memory ops that would change guest RAM or the boot region (the guest's
/// own memory) are not generated; their refusals are.
fn harms_the_guest(model: &Model, action: &Action) -> bool {
    let l = &model.layout;
    let touches = |gpa: u64, size: u64| {
        let end = gpa.saturating_add(size);
        let own = [(0, l.boot_end), (l.ram.0, l.ram.0 + l.ram.1)];
        own.iter().any(|&(a, b)| gpa < b && a < end)
    };
    let range = match action {
        Action::Unplug(u) => (u.gpa.0, u.size.0),
        Action::Protect(p) => (p.gpa.0, p.size.0),
        Action::Move(m) => (m.gpa.0, m.size.0),
        Action::DirtyLog(d) => (d.gpa.0, d.size.0),
        Action::Resize(r) => (r.gpa.0, r.new_size.0.max(PAGE)),
        _ => return false,
    };
    touches(range.0, range.1) && model.would_succeed(action)
}

/// `count` generated actions (plus the waits and the final sweep when
/// guest commands are on): the same for the same seed, config and layout.
pub fn generate(seed: u64, cfg: &GenConfig, layout: &Layout, count: usize) -> Vec<Action> {
    let mut gen = Generator::new(seed, cfg.clone());
    let mut model = Model::new(layout.clone());
    let mut out = Vec::with_capacity(count + 16);
    if cfg.prefill > 0 {
        let fill = Action::PlugMany(step::PlugMany {
            gpa: crate::scenario::num::Num(cfg.prefill_base()),
            count: Some(crate::scenario::num::Num(cfg.prefill)),
        });
        model.predict(&fill);
        out.push(fill);
    }
    while out.len() < count {
        let action = gen.next(&model);
        if action.check().is_err() || harms_the_guest(&model, &action) {
            continue;
        }
        model.predict(&action);
        out.push(action);
    }
    if cfg.guest {
        for vcpu in model.pending_vcpus() {
            let wait = Action::Wait(step::Wait::collect(vcpu));
            model.predict(&wait);
            out.push(wait);
        }
        out.extend(sweep(&model, cfg));
    }
    out
}

/// Verifies of every plugged page of the arena whose contents are known.
pub fn sweep(model: &Model, cfg: &GenConfig) -> Vec<Action> {
    let (a, b) = (cfg.arena_base, cfg.arena_base + cfg.arena_size);
    let mut out = Vec::new();
    let slots: Vec<(u64, u64)> = model
        .slots
        .slots
        .values()
        .filter(|s| s.start >= a && s.end() <= b)
        .map(|s| (s.start, s.end()))
        .collect();
    for (s, e) in slots {
        let mut page = s;
        while page < e {
            match verify_run(model, page, (e - page) / PAGE, 0, false) {
                Some(v) => {
                    let len = super::model::guest::range_of(&v).map_or(PAGE, |r| r.1 - r.0);
                    out.push(v);
                    page += len;
                }
                None => page += PAGE,
            }
        }
    }
    out
}

/// The steps of `actions` with the model's predictions as expectations
/// (widened where an async command races a memory op).
pub fn expectations(layout: &Layout, actions: &[Action]) -> Vec<Step> {
    let mut model = Model::new(layout.clone());
    let mut steps: Vec<Step> = actions
        .iter()
        .map(|a| {
            let set = model.predict(a);
            Step {
                action: a.clone(),
                expect: Expect::AnyOf(set),
                note: None,
            }
        })
        .collect();
    for (i, o) in model.take_widenings() {
        if let Some(Step {
            expect: Expect::AnyOf(list),
            ..
        }) = steps.get_mut(i)
        {
            if !list.contains(&o) {
                list.push(o);
            }
        }
    }
    steps
}

/// The outcomes a step may end with, as a set.
pub fn allowed(step: &Step) -> Vec<Outcome> {
    match &step.expect {
        Expect::AnyOf(l) => l.clone(),
        Expect::Error => Outcome::ALL
            .iter()
            .copied()
            .filter(|o| *o != Outcome::Ok)
            .collect(),
    }
}
