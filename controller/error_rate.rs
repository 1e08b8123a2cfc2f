//! A rollout's error-rate gate: the share of 5xx answers from the nodes
//! running the new version, against the share from the target nodes not
//! reached yet, since the rollout started. Nodes report their answer
//! counters; the controller adds up the differences. The tally lives in
//! memory: a restarted controller counts again from its start.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Below this many answers from the new version, the gate does not judge:
/// one 500 among the first three answers says little.
pub const MIN_ANSWERS: u64 = 20;

/// `--max-5xx-increase` unless the publish says otherwise: one point.
pub const DEFAULT_MAX_INCREASE_BP: u32 = 100;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub answered: u64,
    pub server_errors: u64,
}

impl Counts {
    /// What was counted between `earlier` and this (counters only grow
    /// within one stream; a smaller value counts as nothing).
    pub fn since(self, earlier: Counts) -> Counts {
        Counts {
            answered: self.answered.saturating_sub(earlier.answered),
            server_errors: self.server_errors.saturating_sub(earlier.server_errors),
        }
    }

    fn add(&mut self, more: Counts) {
        self.answered += more.answered;
        self.server_errors += more.server_errors;
    }

    /// The 5xx share in percent (0 without answers).
    pub fn percent(self) -> f64 {
        match self.answered {
            0 => 0.0,
            n => self.server_errors as f64 * 100.0 / n as f64,
        }
    }
}

/// Answers of one rollout, by node: from the released waves' nodes while
/// they run the version, and from the targets not reached yet while they
/// run another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub reached: BTreeMap<String, Counts>,
    pub not_reached: BTreeMap<String, Counts>,
}

impl Tally {
    pub fn add(&mut self, node: &str, reached: bool, counts: Counts) {
        let side = match reached {
            true => &mut self.reached,
            false => &mut self.not_reached,
        };
        match side.get_mut(node) {
            Some(total) => total.add(counts),
            None => {
                side.insert(node.to_owned(), counts);
            }
        }
    }

    /// Adds what another replica counted (of the nodes it holds).
    pub fn merge(&mut self, other: &Tally) {
        for (node, counts) in &other.reached {
            self.add(node, true, *counts);
        }
        for (node, counts) in &other.not_reached {
            self.add(node, false, *counts);
        }
    }

    pub fn reached_total(&self) -> Counts {
        total(&self.reached)
    }

    pub fn not_reached_total(&self) -> Counts {
        total(&self.not_reached)
    }

    /// Why the gate fails, if it does: the new version's 5xx share is
    /// above the old one's by more than `max_increase_bp` hundredths of a
    /// point.
    pub fn judge(&self, version: u64, max_increase_bp: u32) -> Option<String> {
        let new = self.reached_total();
        if new.answered < MIN_ANSWERS {
            return None;
        }
        let old = self.not_reached_total();
        let allowed = f64::from(max_increase_bp) / 100.0;
        if new.percent() - old.percent() <= allowed {
            return None;
        }
        let mut worst: Vec<(&String, &Counts)> = self
            .reached
            .iter()
            .filter(|(_, c)| c.server_errors > 0)
            .collect();
        worst.sort_by(|a, b| b.1.percent().total_cmp(&a.1.percent()));
        let named: Vec<String> = worst
            .iter()
            .take(5)
            .map(|(id, c)| format!("{id} {} of {}", c.server_errors, c.answered))
            .collect();
        let more = match worst.len() {
            n if n > 5 => format!(", {} more", n - 5),
            _ => String::new(),
        };
        Some(format!(
            "error-rate gate: 5xx on {:.1}% of {} answers from {} running v{version} ({}{more}), \
             {:.1}% of {} from {} still on the previous version (--max-5xx-increase {allowed}%)",
            new.percent(),
            new.answered,
            nodes(self.reached.len()),
            named.join(", "),
            old.percent(),
            old.answered,
            nodes(self.not_reached.len()),
        ))
    }
}

fn total(side: &BTreeMap<String, Counts>) -> Counts {
    let mut sum = Counts::default();
    for counts in side.values() {
        sum.add(*counts);
    }
    sum
}

fn nodes(count: usize) -> String {
    match count {
        1 => "1 node".to_owned(),
        n => format!("{n} nodes"),
    }
}

/// `1%`, `0.5%`: hundredths of a point, from 0 to 100%.
pub fn parse_max_increase(text: &str) -> Result<u32, String> {
    let bad = || format!("max 5xx increase {text:?}: a percentage such as 1% or 0.5%");
    let percent: f64 = text
        .trim()
        .strip_suffix('%')
        .ok_or_else(bad)?
        .parse()
        .map_err(|_| bad())?;
    if !(0.0..=100.0).contains(&percent) {
        return Err(bad());
    }
    Ok((percent * 100.0).round() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(answered: u64, server_errors: u64) -> Counts {
        Counts {
            answered,
            server_errors,
        }
    }

    #[test]
    fn the_gate_compares_the_new_versions_share_with_the_old_ones() {
        let mut tally = Tally::default();
        // Too few answers to judge, however bad.
        tally.add("a", true, counts(10, 10));
        assert_eq!(tally.judge(2, 100), None);
        tally.add("a", true, counts(90, 0));
        tally.add("b", false, counts(1000, 95));
        // 10% against 9.5%: within one point.
        assert_eq!(tally.judge(2, 100), None);
        // Within half a point fails it.
        let reason = tally.judge(2, 25).unwrap();
        assert!(
            reason.starts_with(
                "error-rate gate: 5xx on 10.0% of 100 answers from 1 node running v2 (a 10 of 100), \
                 9.5% of 1000 from 1 node still on the previous version (--max-5xx-increase 0.25%)"
            ),
            "{reason}"
        );
        // Nothing to compare with: the old share counts as 0.
        let mut alone = Tally::default();
        alone.add("a", true, counts(100, 2));
        assert!(alone.judge(2, 100).is_some());
        assert_eq!(alone.judge(2, 200), None);
    }

    #[test]
    fn counters_give_differences_and_increases_parse() {
        assert_eq!(counts(30, 5).since(counts(10, 1)), counts(20, 4));
        assert_eq!(counts(3, 0).since(counts(10, 1)), counts(0, 0));
        assert_eq!(parse_max_increase("1%"), Ok(100));
        assert_eq!(parse_max_increase("0.5%"), Ok(50));
        assert_eq!(parse_max_increase("0%"), Ok(0));
        for bad in ["1", "x%", "101%", "-1%"] {
            assert!(parse_max_increase(bad).is_err(), "{bad}");
        }
    }
}
