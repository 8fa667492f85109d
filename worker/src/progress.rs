//! What a person watching a worker sees: indicatif progress bars for training, encoding, sampling
//! and evaluation when stderr is a terminal, plain throttled log lines otherwise (CI, files,
//! `kubectl logs`).

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Without a terminal, a progress line is logged at most this often (plus one at the end).
pub const DEFAULT_PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Setting this environment variable (to anything) turns bars off even on a terminal.
pub const NO_PROGRESS_ENV: &str = "EQIM_NO_PROGRESS";

/// What a progress display counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Training,
    Encoding,
    Sampling,
    Evaluation,
}

impl Activity {
    pub fn name(self) -> &'static str {
        match self {
            Activity::Training => "training",
            Activity::Encoding => "encoding",
            Activity::Sampling => "sampling",
            Activity::Evaluation => "evaluation",
        }
    }

    /// The unit of the counter: optimizer steps for training, images otherwise.
    pub fn unit(self) -> &'static str {
        match self {
            Activity::Training => "steps",
            Activity::Encoding | Activity::Sampling | Activity::Evaluation => "images",
        }
    }
}

/// The one `MultiProgress` all bars live in, so log lines can be printed above them.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// Whether bars should be drawn: stderr is a terminal and `EQIM_NO_PROGRESS` is unset.
pub fn bars_enabled() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os(NO_PROGRESS_ENV).is_none()
}

enum Output {
    Bar(ProgressBar),
    Log {
        interval: Duration,
        last_logged: Instant,
    },
}

/// Progress of one activity: a bar on a terminal, periodic log lines otherwise.
pub struct Progress {
    activity: Activity,
    total: Option<u64>,
    position: u64,
    started: Instant,
    message: String,
    output: Output,
}

impl Progress {
    /// A bar if [`bars_enabled`], else log lines every [`DEFAULT_PROGRESS_LOG_INTERVAL`].
    pub fn new(activity: Activity, total: Option<u64>) -> Self {
        if bars_enabled() {
            Self::bar(activity, total)
        } else {
            Self::log_lines(activity, total, DEFAULT_PROGRESS_LOG_INTERVAL)
        }
    }

    pub fn bar(activity: Activity, total: Option<u64>) -> Self {
        let template = match total {
            Some(_) => "{prefix:>10} [{elapsed_precise}] {wide_bar:.cyan/blue} {pos}/{len} {per_sec} eta {eta} {msg}",
            None => "{prefix:>10} [{elapsed_precise}] {spinner} {pos} {per_sec} {msg}",
        };
        let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(activity.name());
        let bar = bars().add(bar);
        Self::with_output(activity, total, Output::Bar(bar), Instant::now())
    }

    pub fn log_lines(activity: Activity, total: Option<u64>, interval: Duration) -> Self {
        let now = Instant::now();
        Self::with_output(
            activity,
            total,
            Output::Log {
                interval,
                last_logged: now,
            },
            now,
        )
    }

    fn with_output(activity: Activity, total: Option<u64>, output: Output, now: Instant) -> Self {
        Self {
            activity,
            total,
            position: 0,
            started: now,
            message: String::new(),
            output,
        }
    }

    pub fn position(&self) -> u64 {
        self.position
    }

    pub fn inc(&mut self, n: u64) {
        self.set_position(self.position + n);
    }

    pub fn set_position(&mut self, position: u64) {
        self.position = position;
        if let Some(line) = self.tick_at(Instant::now()) {
            tracing::info!(target: "eqim::progress", "{line}");
        }
    }

    /// Extra text after the counters, e.g. `loss 0.1234 lr 1.0e-4`.
    pub fn set_message(&mut self, message: impl Into<String>) {
        self.message = message.into();
        if let Output::Bar(bar) = &self.output {
            bar.set_message(self.message.clone());
        }
    }

    /// Updates the display; in log mode returns the line to log when the interval has passed.
    fn tick_at(&mut self, now: Instant) -> Option<String> {
        match &mut self.output {
            Output::Bar(bar) => {
                bar.set_position(self.position);
                None
            }
            Output::Log {
                interval,
                last_logged,
            } => {
                if now.saturating_duration_since(*last_logged) < *interval {
                    return None;
                }
                *last_logged = now;
                Some(self.line_at(now))
            }
        }
    }

    /// The plain progress line at `now`.
    pub fn line_at(&self, now: Instant) -> String {
        format_progress_line(&ProgressLine {
            activity: self.activity,
            position: self.position,
            total: self.total,
            elapsed: now.saturating_duration_since(self.started),
            message: &self.message,
        })
    }

    /// Ends the display (the bar stays on screen; log mode logs a last line); returns the
    /// elapsed time.
    pub fn finish(self) -> Duration {
        let now = Instant::now();
        match &self.output {
            Output::Bar(bar) => bar.finish(),
            Output::Log { .. } => {
                tracing::info!(target: "eqim::progress", "{} (done)", self.line_at(now))
            }
        }
        now.saturating_duration_since(self.started)
    }
}

/// The values one plain progress line shows.
pub struct ProgressLine<'a> {
    pub activity: Activity,
    pub position: u64,
    pub total: Option<u64>,
    pub elapsed: Duration,
    pub message: &'a str,
}

/// `training: 120/1000 steps (12.0%), 3.43 steps/s, elapsed 35s, eta 4m 17s, loss 0.12`
pub fn format_progress_line(p: &ProgressLine<'_>) -> String {
    let unit = p.activity.unit();
    let secs = p.elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        p.position as f64 / secs
    } else {
        0.0
    };
    let mut line = match p.total {
        Some(total) if total > 0 => format!(
            "{}: {}/{total} {unit} ({:.1}%)",
            p.activity.name(),
            p.position,
            100.0 * p.position as f64 / total as f64
        ),
        _ => format!("{}: {} {unit}", p.activity.name(), p.position),
    };
    line.push_str(&format!(
        ", {rate:.2} {unit}/s, elapsed {}",
        format_duration(p.elapsed)
    ));
    if let Some(total) = p.total {
        if rate > 0.0 && total > p.position {
            let eta = Duration::from_secs_f64((total - p.position) as f64 / rate);
            line.push_str(&format!(", eta {}", format_duration(eta)));
        }
    }
    if !p.message.is_empty() {
        line.push_str(", ");
        line.push_str(p.message);
    }
    line
}

/// `35s`, `4m 07s`, `2h 03m`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_show_counts_rate_and_eta() {
        let line = format_progress_line(&ProgressLine {
            activity: Activity::Training,
            position: 120,
            total: Some(1000),
            elapsed: Duration::from_secs(40),
            message: "loss 0.1234",
        });
        assert_eq!(
            line,
            "training: 120/1000 steps (12.0%), 3.00 steps/s, elapsed 40s, eta 4m 53s, loss 0.1234"
        );
        let open_ended = format_progress_line(&ProgressLine {
            activity: Activity::Sampling,
            position: 50,
            total: None,
            elapsed: Duration::from_secs(3700),
            message: "",
        });
        assert_eq!(
            open_ended,
            "sampling: 50 images, 0.01 images/s, elapsed 1h 01m"
        );
        let at_start = format_progress_line(&ProgressLine {
            activity: Activity::Evaluation,
            position: 0,
            total: Some(0),
            elapsed: Duration::ZERO,
            message: "",
        });
        assert_eq!(at_start, "evaluation: 0 images, 0.00 images/s, elapsed 0s");
    }

    #[test]
    fn log_mode_emits_at_most_one_line_per_interval() {
        let mut p = Progress::log_lines(Activity::Encoding, Some(100), Duration::from_secs(10));
        let t0 = p.started;
        p.position = 5;
        assert_eq!(p.tick_at(t0 + Duration::from_secs(3)), None);
        let line = p
            .tick_at(t0 + Duration::from_secs(10))
            .expect("interval passed");
        assert!(line.starts_with("encoding: 5/100 images (5.0%)"), "{line}");
        assert_eq!(p.tick_at(t0 + Duration::from_secs(15)), None);
        assert!(p.tick_at(t0 + Duration::from_secs(20)).is_some());
    }

    #[test]
    fn a_bar_tracks_position_without_logging() {
        let mut p = Progress::bar(Activity::Training, Some(10));
        p.set_message("loss 1.0");
        p.inc(3);
        p.inc(4);
        assert_eq!(p.position(), 7);
        if let Output::Bar(bar) = &p.output {
            assert_eq!(bar.position(), 7);
            assert_eq!(bar.message(), "loss 1.0");
        } else {
            panic!("expected a bar");
        }
        assert_eq!(p.tick_at(Instant::now() + Duration::from_secs(60)), None);
        p.finish();
    }
}
