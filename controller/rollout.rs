//! Staged rollouts. A version published with waves reaches its nodes one
//! wave at a time: the nodes of the released waves must all run it within
//! the ACK timeout, then bake with every gate green, before the next wave
//! is released. A failed gate withdraws the version: every node it
//! reached is pushed the version it ran before, and nodes of later waves
//! never see it.
//!
//! Waves are cut by a stable hash of the node id, so the same nodes go
//! first every time. The state is a store record, so a restarted
//! controller carries on where it was.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error_rate::{Tally, DEFAULT_MAX_INCREASE_BP};

/// How often running rollouts are looked at, when nothing wakes them.
pub const STEP: Duration = Duration::from_millis(200);
/// The least time between two looks (ACKs wake them in between).
pub const MIN_STEP_GAP: Duration = Duration::from_millis(20);

/// A wave's size: the share of the targets reached by its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveSize {
    Nodes(u64),
    Percent(u64),
}

/// `1,10%,50%,100%`: each a node count or a percentage, growing.
pub fn parse_waves(text: &[String]) -> Result<Vec<WaveSize>, String> {
    let mut waves = Vec::new();
    for part in text.iter().flat_map(|t| t.split(',')) {
        let part = part.trim();
        let wave = match part.strip_suffix('%') {
            Some(percent) => match percent.parse::<u64>() {
                Ok(p @ 1..=100) => WaveSize::Percent(p),
                _ => return Err(format!("wave {part:?}: a percentage from 1% to 100%")),
            },
            None => match part.parse::<u64>() {
                Ok(n @ 1..) => WaveSize::Nodes(n),
                _ => {
                    return Err(format!(
                        "wave {part:?}: a node count (1 or more) or a percentage"
                    ))
                }
            },
        };
        waves.push(wave);
    }
    if waves.is_empty() {
        return Err("no waves".to_owned());
    }
    if waves.len() > 100 {
        return Err("at most 100 waves".to_owned());
    }
    Ok(waves)
}

pub fn node_hash(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    /// Held by an operator: no gate runs, no wave is released.
    Paused,
    Completed,
    Failed,
    Aborted,
    /// A newer publish to the same nodes took over: the waves reached keep
    /// the version, no more are released.
    Superseded,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Completed => "completed",
            State::Failed => "failed",
            State::Aborted => "aborted",
            State::Superseded => "superseded",
        }
    }
}

/// A rollout as stored: the last record of a version wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRollout {
    pub version: u64,
    /// Per wave, the highest node-id hash it takes; the last is u64::MAX,
    /// so nodes that appear later fall into a wave by their hash.
    pub cutoffs: Vec<u64>,
    pub bake_ms: u64,
    pub ack_timeout_ms: u64,
    /// Waves released so far.
    pub released: usize,
    /// When the newest wave was released, ms since the Unix epoch.
    pub wave_started: u64,
    /// Since when every node of the released waves runs the version (0:
    /// not yet).
    pub baking_since: u64,
    pub state: State,
    #[serde(default)]
    pub reason: String,
    /// Waves by a label's values instead of by hash (`cutoffs` is then
    /// empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_label: Option<ByLabel>,
    /// The error-rate gate's margin, in hundredths of a point.
    #[serde(default = "default_max_increase")]
    pub max_5xx_increase_bp: u32,
}

fn default_max_increase() -> u32 {
    DEFAULT_MAX_INCREASE_BP
}

/// One wave per value of `label`, in this order, then a last wave for the
/// nodes with none of them (no such label, or a value that came later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByLabel {
    pub label: String,
    pub values: Vec<String>,
}

pub type Labels = BTreeMap<String, String>;

impl StoredRollout {
    /// The first wave released now; `targets` are the ids of the nodes the
    /// version is for, known at the start.
    pub fn start(
        version: u64,
        waves: &[WaveSize],
        bake: Duration,
        ack_timeout: Duration,
        targets: &[&str],
        now: u64,
    ) -> StoredRollout {
        let mut hashes: Vec<u64> = targets.iter().map(|id| node_hash(id)).collect();
        hashes.sort_unstable();
        let total = hashes.len() as u64;
        let mut cutoffs = Vec::new();
        for (index, wave) in waves.iter().enumerate() {
            if index + 1 == waves.len() {
                cutoffs.push(u64::MAX);
                break;
            }
            let count = match *wave {
                WaveSize::Nodes(n) => n.min(total),
                WaveSize::Percent(p) => (total * p).div_ceil(100),
            };
            let cutoff = match count {
                0 => 0,
                n => hashes[(n - 1) as usize],
            };
            // Waves never shrink.
            cutoffs.push(cutoff.max(cutoffs.last().copied().unwrap_or(0)));
        }
        StoredRollout {
            version,
            cutoffs,
            bake_ms: bake.as_millis() as u64,
            ack_timeout_ms: ack_timeout.as_millis() as u64,
            released: 1,
            wave_started: now,
            baking_since: 0,
            state: State::Running,
            reason: String::new(),
            by_label: None,
            max_5xx_increase_bp: DEFAULT_MAX_INCREASE_BP,
        }
    }

    /// The first wave released now, one wave per value of `label` among
    /// the targets' labels (sorted), then the nodes without one.
    pub fn start_by_label(
        version: u64,
        label: &str,
        bake: Duration,
        ack_timeout: Duration,
        targets: &[&Labels],
        now: u64,
    ) -> StoredRollout {
        let values: BTreeSet<&String> = targets.iter().filter_map(|l| l.get(label)).collect();
        StoredRollout {
            cutoffs: Vec::new(),
            by_label: Some(ByLabel {
                label: label.to_owned(),
                values: values.into_iter().cloned().collect(),
            }),
            ..StoredRollout::start(
                version,
                &[WaveSize::Percent(100)],
                bake,
                ack_timeout,
                &[],
                now,
            )
        }
    }

    /// How many waves there are.
    pub fn waves(&self) -> usize {
        match &self.by_label {
            Some(by) => by.values.len() + 1,
            None => self.cutoffs.len(),
        }
    }

    /// The wave (from 0) node `id` with `labels` belongs to.
    pub fn wave_of(&self, id: &str, labels: &Labels) -> usize {
        if let Some(by) = &self.by_label {
            let value = labels.get(&by.label);
            return by
                .values
                .iter()
                .position(|v| Some(v) == value)
                .unwrap_or(by.values.len());
        }
        let hash = node_hash(id);
        self.cutoffs
            .iter()
            .position(|cutoff| hash <= *cutoff)
            .unwrap_or(self.cutoffs.len() - 1)
    }

    /// Whether node `id` with `labels` should run the version (when its
    /// selector matches).
    pub fn releases_to(&self, id: &str, labels: &Labels) -> bool {
        match self.state {
            State::Completed => true,
            State::Failed | State::Aborted => false,
            State::Running | State::Paused | State::Superseded => {
                self.wave_of(id, labels) < self.released
            }
        }
    }
}

/// What an operator asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Abort,
    Pause,
    Resume,
    Promote,
}

impl StoredRollout {
    /// The rollout after `action` at `now`, or why it cannot be done.
    pub fn after(&self, action: Action, reason: String, now: u64) -> Result<StoredRollout, String> {
        let version = self.version;
        let mut next = self.clone();
        match (action, self.state) {
            (Action::Abort, State::Running | State::Paused) => {
                next.state = State::Aborted;
                next.reason = reason;
            }
            (Action::Pause, State::Running) => next.state = State::Paused,
            (Action::Resume, State::Paused) => {
                next.state = State::Running;
                next.wave_started = now;
                next.baking_since = 0;
            }
            (Action::Promote, State::Running) if self.baking_since != 0 => {
                next.baking_since = now.saturating_sub(self.bake_ms);
            }
            (Action::Promote, State::Running) => {
                return Err(format!(
                    "wave {} of v{version} is not baking yet: its nodes do not all run it",
                    self.released
                ))
            }
            (_, state) => {
                return Err(format!(
                    "the rollout of version {version} is {}; {action:?} needs it {}",
                    state.name(),
                    if action == Action::Resume {
                        "paused"
                    } else {
                        "running"
                    }
                ))
            }
        }
        Ok(next)
    }
}

/// What the rollout's gates see of one target node.
pub struct NodeView<'a> {
    pub id: &'a str,
    pub labels: &'a Labels,
    pub connected: bool,
    pub version: u64,
    /// The version of its last NACK, if any.
    pub nacked: Option<(u64, &'a str)>,
    /// "upstream/server" it sees down.
    pub down: &'a [String],
    /// How often it reports its answer counts (0: it does not), and how
    /// long it has been silent.
    pub reports_every_ms: u64,
    pub silent_ms: u64,
}

/// How long a node may go without reporting its answers before the
/// error-rate gate counts the missing data as a failure.
pub fn report_deadline_ms(every_ms: u64) -> u64 {
    every_ms * 3 + 2_000
}

/// What to do with a running rollout.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Wait,
    /// Every node of the released waves runs it: the bake starts.
    StartBake,
    /// Baked: release the next wave.
    Release,
    Complete,
    Fail(String),
}

/// The gates, evaluated at `now` over the version's target nodes and the
/// answers they reported.
pub fn evaluate(
    rollout: &StoredRollout,
    nodes: &[NodeView<'_>],
    answers: &Tally,
    now: u64,
) -> Step {
    let version = rollout.version;
    let (reached, others): (Vec<&NodeView>, Vec<&NodeView>) = nodes
        .iter()
        .partition(|n| rollout.releases_to(n.id, n.labels));

    // A NACK of this version in a released wave.
    let nacked: Vec<String> = reached
        .iter()
        .filter_map(|n| match n.nacked {
            Some((v, reason)) if v == version => Some(format!("{} ({reason})", n.id)),
            _ => None,
        })
        .collect();
    if !nacked.is_empty() {
        return Step::Fail(format!(
            "NACK gate: v{version} NACKed by {}",
            nacked.join(", ")
        ));
    }

    // A server down on the wave's nodes that no node still on the previous
    // version sees down: the new version broke it.
    if !others.is_empty() {
        let down_before: BTreeSet<&String> = others
            .iter()
            .filter(|n| n.connected)
            .flat_map(|n| n.down.iter())
            .collect();
        let mut regressed: BTreeMap<&String, Vec<&str>> = BTreeMap::new();
        for node in reached
            .iter()
            .filter(|n| n.connected && n.version == version)
        {
            for server in node.down.iter().filter(|s| !down_before.contains(s)) {
                regressed.entry(server).or_default().push(node.id);
            }
        }
        if !regressed.is_empty() {
            let list: Vec<String> = regressed
                .iter()
                .map(|(server, ids)| {
                    format!(
                        "{server} down on {} of {} nodes running v{version} ({}), down on 0 of {} still on the previous version",
                        ids.len(),
                        reached.len(),
                        ids.join(", "),
                        others.len()
                    )
                })
                .collect();
            return Step::Fail(format!("health gate: {}", list.join("; ")));
        }
    }

    // Answers: a node of the wave gone quiet is a failure (no data is not
    // good news), and so is a 5xx share above the old version's.
    let silent: Vec<String> = reached
        .iter()
        .filter(|n| n.connected && n.version == version && n.reports_every_ms > 0)
        .filter(|n| n.silent_ms > report_deadline_ms(n.reports_every_ms))
        .map(|n| {
            format!(
                "{} ({} ms, reports every {} ms)",
                n.id, n.silent_ms, n.reports_every_ms
            )
        })
        .collect();
    if !silent.is_empty() {
        return Step::Fail(format!(
            "error-rate gate: no answer counts from {} running v{version}: {}",
            if silent.len() == 1 {
                "1 node".to_owned()
            } else {
                format!("{} nodes", silent.len())
            },
            silent.join(", ")
        ));
    }
    if let Some(reason) = answers.judge(version, rollout.max_5xx_increase_bp) {
        return Step::Fail(reason);
    }

    let missing: Vec<&str> = reached
        .iter()
        .filter(|n| !(n.connected && n.version == version))
        .map(|n| n.id)
        .collect();
    if !missing.is_empty() {
        let waited = now.saturating_sub(rollout.wave_started);
        if waited >= rollout.ack_timeout_ms {
            return Step::Fail(format!(
                "ACK gate: {} of {} nodes did not run v{version} within {} ms: {}",
                missing.len(),
                reached.len(),
                rollout.ack_timeout_ms,
                missing.join(", ")
            ));
        }
        return Step::Wait;
    }
    // A wave with no nodes (a small fleet, a selector matching few) has
    // nothing to bake.
    let newest = rollout.released - 1;
    let newest_is_empty = newest > 0
        && !nodes
            .iter()
            .any(|n| rollout.wave_of(n.id, n.labels) == newest);
    if rollout.baking_since == 0 && !newest_is_empty {
        return Step::StartBake;
    }
    if newest_is_empty {
        return if rollout.released < rollout.waves() {
            Step::Release
        } else {
            Step::Complete
        };
    }
    if now.saturating_sub(rollout.baking_since) < rollout.bake_ms {
        return Step::Wait;
    }
    if rollout.released < rollout.waves() {
        Step::Release
    } else {
        Step::Complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waves(text: &str) -> Vec<WaveSize> {
        parse_waves(&[text.to_owned()]).unwrap()
    }

    #[test]
    fn waves_are_parsed_and_bad_ones_named() {
        assert_eq!(
            waves("1,10%, 100%"),
            [
                WaveSize::Nodes(1),
                WaveSize::Percent(10),
                WaveSize::Percent(100)
            ]
        );
        for bad in ["0", "0%", "101%", "x", ""] {
            assert!(parse_waves(&[bad.to_owned()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_same_nodes_go_first_and_waves_grow_to_all() {
        let ids: Vec<String> = (0..10).map(|i| format!("node-{i}")).collect();
        let targets: Vec<&str> = ids.iter().map(String::as_str).collect();
        let plan = waves("1,30%,100%");
        let rollout = StoredRollout::start(7, &plan, Duration::ZERO, Duration::ZERO, &targets, 0);
        let mut sizes = [0; 3];
        for id in &targets {
            sizes[rollout.wave_of(id, &Labels::new())] += 1;
        }
        assert_eq!(sizes, [1, 2, 7]);
        // The same targets in another order: the same waves.
        let mut reversed = targets.clone();
        reversed.reverse();
        let again = StoredRollout::start(8, &plan, Duration::ZERO, Duration::ZERO, &reversed, 0);
        assert_eq!(again.cutoffs, rollout.cutoffs);
        // A node that joins later lands in a wave by its hash.
        assert!(rollout.wave_of("newcomer", &Labels::new()) < 3);
    }

    fn view<'a>(id: &'a str, version: u64, down: &'a [String]) -> NodeView<'a> {
        static NO_LABELS: Labels = Labels::new();
        NodeView {
            id,
            labels: &NO_LABELS,
            connected: true,
            version,
            nacked: None,
            down,
            reports_every_ms: 0,
            silent_ms: 0,
        }
    }

    #[test]
    fn waves_by_label_go_value_by_value_then_the_rest() {
        let label = |region: &str| Labels::from([("region".to_owned(), region.to_owned())]);
        let (eu, us) = (label("eu"), label("us"));
        let rollout = StoredRollout::start_by_label(
            2,
            "region",
            Duration::ZERO,
            Duration::ZERO,
            &[&us, &eu, &us],
            0,
        );
        assert_eq!(rollout.waves(), 3);
        assert_eq!(rollout.wave_of("a", &eu), 0);
        assert_eq!(rollout.wave_of("b", &us), 1);
        assert_eq!(rollout.wave_of("c", &label("ap")), 2);
        assert_eq!(rollout.wave_of("d", &Labels::new()), 2);
        assert!(rollout.releases_to("a", &eu) && !rollout.releases_to("b", &us));
    }

    #[test]
    fn a_wave_without_nodes_is_not_baked() {
        let ids = ["only"];
        let mut rollout = StoredRollout::start(
            2,
            &waves("1,50%,100%"),
            Duration::from_secs(60),
            Duration::from_secs(60),
            &ids,
            0,
        );
        let nodes = [view("only", 2, &[])];
        assert_eq!(
            evaluate(&rollout, &nodes, &Tally::default(), 1),
            Step::StartBake
        );
        rollout.baking_since = 1;
        assert_eq!(evaluate(&rollout, &nodes, &Tally::default(), 2), Step::Wait);
        assert_eq!(
            evaluate(&rollout, &nodes, &Tally::default(), 60_001),
            Step::Release
        );
        rollout.released = 2;
        rollout.baking_since = 0;
        assert_eq!(
            evaluate(&rollout, &nodes, &Tally::default(), 60_002),
            Step::Release
        );
        rollout.released = 3;
        assert_eq!(
            evaluate(&rollout, &nodes, &Tally::default(), 60_003),
            Step::Complete
        );
    }

    #[test]
    fn a_quiet_node_or_more_5xx_on_the_new_version_fails_the_error_rate_gate() {
        let ids = ["only"];
        let rollout = StoredRollout::start(
            2,
            &waves("100%"),
            Duration::from_secs(60),
            Duration::from_secs(60),
            &ids,
            0,
        );
        let reporting = |silent_ms| NodeView {
            reports_every_ms: 200,
            silent_ms,
            ..view("only", 2, &[])
        };
        let quiet = Tally::default();
        assert_eq!(
            evaluate(&rollout, &[reporting(2_600)], &quiet, 1),
            Step::StartBake
        );
        assert_eq!(
            evaluate(&rollout, &[reporting(2_601)], &quiet, 1),
            Step::Fail(
                "error-rate gate: no answer counts from 1 node running v2: only (2601 ms, reports every 200 ms)"
                    .to_owned()
            )
        );
        // A node that never reports (an older build) is left out.
        assert_eq!(
            evaluate(&rollout, &[view("only", 2, &[])], &quiet, 1),
            Step::StartBake
        );
        let mut failing = Tally::default();
        failing.add(
            "only",
            true,
            crate::controller::error_rate::Counts {
                answered: 40,
                server_errors: 40,
            },
        );
        assert!(matches!(
            evaluate(&rollout, &[reporting(0)], &failing, 1),
            Step::Fail(reason) if reason.starts_with("error-rate gate: 5xx on 100.0% of 40 answers")
        ));
    }

    #[test]
    fn gates_wait_bake_release_and_fail_with_their_reason() {
        let ids = ["a", "b", "c", "d"];
        let mut rollout = StoredRollout::start(
            2,
            &waves("1,100%"),
            Duration::from_millis(100),
            Duration::from_millis(1000),
            &ids,
            1_000,
        );
        let first = *ids
            .iter()
            .find(|id| rollout.wave_of(id, &Labels::new()) == 0)
            .unwrap();
        let nodes = |first_runs: u64, first_down: &'static [String]| -> Vec<NodeView<'static>> {
            ["a", "b", "c", "d"]
                .into_iter()
                .map(|id| {
                    if id == first {
                        view(id, first_runs, first_down)
                    } else {
                        view(id, 1, &[])
                    }
                })
                .collect()
        };
        assert_eq!(
            evaluate(&rollout, &nodes(1, &[]), &Tally::default(), 1_500),
            Step::Wait
        );
        assert!(matches!(
            evaluate(&rollout, &nodes(1, &[]), &Tally::default(), 2_000),
            Step::Fail(reason) if reason.starts_with("ACK gate: 1 of 1 nodes did not run v2 within 1000 ms")
        ));
        assert_eq!(
            evaluate(&rollout, &nodes(2, &[]), &Tally::default(), 1_500),
            Step::StartBake
        );
        rollout.baking_since = 1_500;
        assert_eq!(
            evaluate(&rollout, &nodes(2, &[]), &Tally::default(), 1_550),
            Step::Wait
        );
        assert_eq!(
            evaluate(&rollout, &nodes(2, &[]), &Tally::default(), 1_600),
            Step::Release
        );
        let down: &'static [String] =
            Box::leak(vec!["app/10.0.0.9:80".to_owned()].into_boxed_slice());
        assert!(matches!(
            evaluate(&rollout, &nodes(2, down), &Tally::default(), 1_550),
            Step::Fail(reason) if reason.starts_with("health gate: app/10.0.0.9:80 down on 1 of 1 nodes running v2")
        ));
        let mut nacking = nodes(1, &[]);
        for node in &mut nacking {
            if node.id == first {
                node.nacked = Some((2, "cannot bind"));
            }
        }
        assert_eq!(
            evaluate(&rollout, &nacking, &Tally::default(), 1_100),
            Step::Fail(format!("NACK gate: v2 NACKed by {first} (cannot bind)"))
        );
    }
}
