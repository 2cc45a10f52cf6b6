//! Shrinking a failing timeline while it still fails the same way: first
//! cut everything after the failing step, then drop steps by delta debugging
//! (ddmin), then simplify the arguments of what is left.

use crate::scenario::num::Num;
use crate::scenario::step::Action;

use super::finding::Finding;
use super::model::slots::PAGE;

/// The alignment addresses are simplified to.
const HUGE: u64 = 2 << 20;

/// What the shrinker did.
#[derive(Debug, Clone)]
pub struct Shrunk {
    /// The smallest timeline found that fails with the same signature.
    pub actions: Vec<Action>,
    /// Its finding.
    pub finding: Finding,
    /// Candidate runs tried.
    pub runs: usize,
}

/// Shrinks `actions` (which fail as `finding`); `test` runs a candidate and
/// returns its finding, if any. At most `max_runs` candidates are tried.
pub fn shrink(
    actions: Vec<Action>,
    finding: Finding,
    max_runs: usize,
    mut test: impl FnMut(&[Action]) -> Option<Finding>,
) -> Shrunk {
    let sig = finding.signature.clone();
    let mut best = Shrunk {
        actions,
        finding,
        runs: 0,
    };
    let cut = |s: &mut Shrunk| {
        s.actions
            .truncate(s.finding.step.max(1).min(s.actions.len()))
    };
    cut(&mut best);
    let mut try_candidate = |best: &mut Shrunk, cand: Vec<Action>| -> bool {
        if best.runs >= max_runs {
            return false;
        }
        best.runs += 1;
        match test(&cand) {
            Some(f) if f.signature == sig => {
                best.actions = cand;
                best.finding = f;
                cut(best);
                true
            }
            _ => false,
        }
    };
    // ddmin: remove chunks at granularity n.
    let mut n = 2usize;
    while best.actions.len() >= 2 && best.runs < max_runs {
        let len = best.actions.len();
        let chunk = len.div_ceil(n);
        let mut reduced = false;
        let parts = n;
        for i in 0..parts {
            let (a, b) = (i * chunk, ((i + 1) * chunk).min(len));
            if a >= b {
                continue;
            }
            let cand: Vec<Action> = best.actions[..a]
                .iter()
                .chain(&best.actions[b..])
                .cloned()
                .collect();
            if try_candidate(&mut best, cand) {
                n = (n - 1).max(2);
                reduced = true;
                break;
            }
        }
        if !reduced {
            if n >= len {
                break;
            }
            n = (n * 2).min(len);
        }
    }
    // Simplify arguments, step by step, while it helps.
    let mut progress = true;
    while progress && best.runs < max_runs {
        progress = false;
        for i in 0..best.actions.len() {
            for simpler in simplify(&best.actions[i]) {
                let mut cand = best.actions.clone();
                cand[i] = simpler;
                if try_candidate(&mut best, cand) {
                    progress = true;
                    break;
                }
            }
        }
    }
    best
}

/// The fields every guest command has, of `a` if it is one: its vCPU,
/// repeat count and whether it is async.
fn guest_fields(a: &mut Action) -> Option<(&mut u64, &mut u64, &mut bool)> {
    macro_rules! fields {
        ($($v:ident),*) => {
            match a {
                $(Action::$v(g) => Some((&mut g.vcpu, &mut g.repeat, &mut g.is_async)),)*
                _ => None,
            }
        };
    }
    fields!(
        Fill,
        Verify,
        VerifyConst,
        Touch,
        Read,
        Write,
        Spin,
        DmaCopy,
        DmaFill,
        DmaChecksum
    )
}

/// Simpler versions of an action: one page, half the size, fewer slots of
/// a plug-many, addresses aligned down to 2 MiB, vCPU 0, no repeat, not
/// async, default backing and flags.
pub fn simplify(action: &Action) -> Vec<Action> {
    let mut out = Vec::new();
    let mut push = |f: &dyn Fn(&mut Action) -> bool| {
        let mut a = action.clone();
        if f(&mut a) && a != *action && a.check().is_ok() {
            out.push(a);
        }
    };
    let sizes = |s: &mut Num, to: u64| {
        if s.0 > to {
            s.0 = to;
            true
        } else {
            false
        }
    };
    for target in [PAGE, 0] {
        push(&|a| match a {
            Action::Plug(p) => {
                let half = (p.size.0 / 2).max(PAGE) & !(PAGE - 1);
                let to = if target == 0 { half } else { target };
                sizes(&mut p.size, to)
            }
            Action::Unplug(u) => {
                let half = (u.size.0 / 2).max(PAGE) & !(PAGE - 1);
                sizes(&mut u.size, half)
            }
            Action::Pin(p) => sizes(&mut p.size, PAGE),
            Action::Fill(g) => sizes(&mut g.command.size, PAGE),
            Action::Verify(g) => sizes(&mut g.command.size, PAGE),
            Action::VerifyConst(g) => sizes(&mut g.command.size, PAGE),
            Action::Touch(g) => sizes(&mut g.command.size, PAGE),
            Action::DmaFill(g) => sizes(&mut g.command.size, PAGE),
            Action::DmaCopy(g) => sizes(&mut g.command.size, PAGE),
            Action::DmaChecksum(g) => sizes(&mut g.command.size, PAGE),
            _ => false,
        });
    }
    for to in [Some(1), None] {
        push(&|a| match a {
            Action::PlugMany(p) => {
                let was = p.count.map(|c| c.0);
                let fewer = match (to, was) {
                    (Some(one), Some(n)) if n > one => one,
                    (None, Some(n)) if n > 1 => n / 2,
                    // Until the budget is full: try a handful of slots.
                    (Some(_), None) => 8,
                    _ => return false,
                };
                p.count = Some(Num(fewer));
                true
            }
            _ => false,
        });
    }
    push(&|a| {
        let align = |g: &mut Num| {
            let down = g.0 & !(HUGE - 1);
            std::mem::replace(&mut g.0, down) != down
        };
        match a {
            Action::Plug(p) => align(&mut p.gpa),
            Action::Unplug(u) => align(&mut u.gpa),
            Action::Protect(p) => align(&mut p.gpa),
            Action::Move(m) => align(&mut m.gpa) | align(&mut m.to),
            _ => false,
        }
    });
    push(&|a| guest_fields(a).is_some_and(|(vcpu, _, _)| std::mem::replace(vcpu, 0) != 0));
    push(&|a| match a {
        Action::Plug(p) => p.backing.take().is_some() | p.flags.take().is_some(),
        Action::Pin(p) => p.write.take().is_some() | p.revocable.take().is_some(),
        _ => false,
    });
    push(&|a| {
        guest_fields(a).is_some_and(|(_, repeat, is_async)| {
            let changed = *repeat != 1 || *is_async;
            (*repeat, *is_async) = (1, false);
            changed
        })
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::step::{Unpin, Unplug};

    fn unplug(i: u64) -> Action {
        Action::Unplug(Unplug {
            gpa: Num(i * PAGE),
            size: Num(PAGE),
        })
    }

    /// A planted bug: the timeline fails when it holds unplugs 7 and 31 (in
    /// that order) and then an unpin; everything else is noise.
    fn planted(actions: &[Action]) -> Option<Finding> {
        let pos = |want: &Action| actions.iter().position(|a| a == want);
        let (a, b) = (pos(&unplug(7))?, pos(&unplug(31))?);
        let c = actions.iter().position(|a| matches!(a, Action::Unpin(_)))?;
        (a < b && b < c).then(|| Finding {
            step: c + 1,
            kind: "unpin".into(),
            what: String::new(),
            expected: "ok".into(),
            actual: "no-such-pin".into(),
            signature: "unpin:no-such-pin".into(),
        })
    }

    #[test]
    fn test_shrinker_finds_the_three_planted_steps() {
        let mut actions: Vec<Action> = (0..200).map(unplug).collect();
        actions.insert(150, Action::Unpin(Unpin { name: "x".into() }));
        actions.push(Action::Unpin(Unpin { name: "y".into() }));
        let finding = planted(&actions).unwrap();
        let s = shrink(actions, finding, 10_000, planted);
        assert_eq!(
            s.actions,
            vec![
                unplug(7),
                unplug(31),
                Action::Unpin(Unpin { name: "x".into() })
            ]
        );
        assert!(s.runs < 500, "{} runs", s.runs);
    }

    fn parsed(step: &str) -> Action {
        let sc = crate::scenario::Scenario::parse(&format!("vcpus = 2\n[[step]]\n{step}\n"))
            .expect("a valid step");
        sc.steps[0].action.clone()
    }

    #[test]
    fn test_simplify_tries_fewer_slots_aligned_addresses_and_vcpu_0() {
        let many = simplify(&parsed("do = \"plug-many\"\ngpa = \"4G\"\ncount = 64"));
        let counts: Vec<u64> = many
            .iter()
            .filter_map(|a| match a {
                Action::PlugMany(p) => p.count.map(|c| c.0),
                _ => None,
            })
            .collect();
        assert_eq!(counts, [1, 32]);
        let all = simplify(&parsed("do = \"plug-many\"\ngpa = \"4G\""));
        assert!(all
            .iter()
            .any(|a| matches!(a, Action::PlugMany(p) if p.count == Some(Num(8)))));
        let plug = simplify(&parsed(
            "do = \"plug\"\ngpa = \"0x100203000\"\nsize = \"8K\"",
        ));
        assert!(plug
            .iter()
            .any(|a| matches!(a, Action::Plug(p) if p.gpa.0 == 0x1_0020_0000)));
        let fill = simplify(&parsed(
            "do = \"fill\"\nvcpu = 1\ngpa = \"4G\"\nsize = \"8K\"\nseed = 3",
        ));
        assert!(fill
            .iter()
            .any(|a| matches!(a, Action::Fill(g) if g.vcpu == 0 && g.command.size.0 == 8192)));
        let repeated = simplify(&parsed(
            "do = \"fill\"\nrepeat = 3\ngpa = \"4G\"\nsize = \"8K\"\nseed = 3",
        ));
        assert!(repeated
            .iter()
            .any(|a| matches!(a, Action::Fill(g) if g.repeat == 1 && g.command.size.0 == 8192)));
        assert!([many, all, plug, fill]
            .iter()
            .flatten()
            .all(|a| a.check().is_ok()));
    }

    #[test]
    fn test_simplify_shrinks_sizes_and_keeps_steps_valid() {
        let a = Action::Unplug(Unplug {
            gpa: Num(0),
            size: Num(8 * PAGE),
        });
        let s = simplify(&a);
        assert!(s
            .iter()
            .any(|x| matches!(x, Action::Unplug(u) if u.size.0 == 4 * PAGE)));
        assert!(s.iter().all(|x| x.check().is_ok()));
    }
}
