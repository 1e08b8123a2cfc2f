//! How `tether fleet … --wait` and `rollout status --watch` show what is
//! happening: live bars on a terminal, one line per change when the output
//! is a pipe or a file, one JSON object per event with `--json`.

use std::io::IsTerminal;
use std::time::{Duration, SystemTime};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::proto::v1::{self as pb};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Terminal,
    Lines,
    Json,
}

impl Mode {
    pub fn of_stdout(json: bool) -> Mode {
        if json {
            Mode::Json
        } else if std::io::stdout().is_terminal() {
            Mode::Terminal
        } else {
            Mode::Lines
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("a valid template")
        .progress_chars("█▉▊▋▌▍▎▏ ")
}

/// Bars on a terminal: a headline, then one bar per wave (or a single one
/// for a publish at once). Lines printed through it go above the bars.
pub struct Bars {
    multi: MultiProgress,
    headline: ProgressBar,
    bars: Vec<ProgressBar>,
}

impl Bars {
    pub fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let headline = multi.add(ProgressBar::new_spinner());
        headline
            .set_style(ProgressStyle::with_template("{spinner} {msg}").expect("a valid template"));
        headline.enable_steady_tick(Duration::from_millis(120));
        Bars {
            multi,
            headline,
            bars: Vec::new(),
        }
    }

    pub fn headline(&self, text: String) {
        self.headline.set_message(text);
    }

    /// Sets bar `index` (made on first use): `done` of `total`, `text`
    /// after it.
    pub fn bar(&mut self, index: usize, name: String, done: u64, total: u64, text: String) {
        while self.bars.len() <= index {
            let bar = ProgressBar::new(total)
                .with_style(style("  {prefix:<7} {bar:30} {pos:>5}/{len:<5} {msg}"))
                .with_prefix(name.clone())
                .with_position(done)
                .with_message(text.clone());
            self.bars.push(self.multi.add(bar));
        }
        let bar = &self.bars[index];
        bar.set_prefix(name);
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(text);
    }

    /// A line above the bars.
    pub fn println(&self, line: &str) {
        // Only fails when the terminal is gone; the line is lost with it.
        let _ = self.multi.println(line);
    }

    /// Leaves the bars as they are drawn, with `last` under them.
    pub fn finish(&self, last: String) {
        for bar in &self.bars {
            bar.finish();
        }
        self.headline.finish_with_message(last);
    }
}

impl Default for Bars {
    fn default() -> Self {
        Bars::new()
    }
}

/// `eu-2 NACKed v12: cannot bind: 1 error (listener[0].listen: …)`, with
/// the reason from `nack_reason`.
pub fn nacked_line(node: &str, version: u64, reason: &str) -> String {
    format!("{node} NACKed v{version}: {reason}")
}

/// A NACK's reason on one line, with its first located error.
pub fn nack_reason(reason: &str, errors: &[pb::ConfigError]) -> String {
    let reason = reason.lines().next().unwrap_or_default();
    match errors.first() {
        Some(error) if !error.path.is_empty() => {
            format!("{reason} ({}: {})", error.path, error.message)
        }
        _ => reason.to_owned(),
    }
}

/// `5xx 0.4% of 1200 (0.3% of 5400 before, limit +1%)`, once the new
/// version has answered anything.
pub fn answers_text(status: &pb::RolloutStatus) -> Option<String> {
    if status.wave_answered == 0 {
        return None;
    }
    let percent = |errors: u64, answered: u64| match answered {
        0 => 0.0,
        n => errors as f64 * 100.0 / n as f64,
    };
    Some(format!(
        "5xx {:.1}% of {} ({:.1}% of {} before, limit +{}%)",
        percent(status.wave_server_errors, status.wave_answered),
        status.wave_answered,
        percent(status.baseline_server_errors, status.baseline_answered),
        status.baseline_answered,
        status.max_5xx_increase
    ))
}

/// What wave `index` (from 0) is doing: done, baking (with the time
/// left), waiting for its nodes, or not released.
pub fn wave_text(status: &pb::RolloutStatus, index: usize, now: SystemTime) -> String {
    let wave = index as u32 + 1;
    let released = status.released;
    if wave > released {
        return "not released".to_owned();
    }
    if wave < released || status.state == "completed" {
        return "done".to_owned();
    }
    if status.state != "running" {
        return status.state.clone();
    }
    match status
        .baking_since
        .and_then(|t| SystemTime::try_from(t).ok())
    {
        Some(since) => {
            let baked = now.duration_since(since).unwrap_or_default();
            let left = Duration::from_millis(status.bake_ms).saturating_sub(baked);
            format!("baking, {}s left", left.as_secs_f64().ceil() as u64)
        }
        None => "waiting for its nodes".to_owned(),
    }
}
