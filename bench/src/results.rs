//! The figures the benchmarks produce and the goals they are held to: what the measuring parts
//! (`orchestrate` for `run`, `daemon` for `daemon`) fill in and save as JSON, and what the report
//! renders. Data only: nothing here measures or prints.

use serde::{Deserialize, Serialize};

use crate::accuracy::AccuracyResult;
use crate::latency::LatencyResult;
use crate::scale::{ResyncRow, ScaleRow};
use crate::stats::Summary;

/// The goal for a tracked ratio per backend and workload (`None`: no goal).
pub fn ratio_goal(backend: &str, mode: &str) -> Option<f64> {
    match (backend, mode) {
        ("cnproc" | "ebpf", _) => Some(0.97),
        ("ptrace", "seq") => Some(0.30),
        ("ptrace", "burst") => Some(0.40),
        ("ptrace", "spawn") => Some(0.80),
        _ => None,
    }
}

/// The goal for the daemon's CPU per event, µs (cnproc and ebpf).
pub const CPU_GOAL_US: f64 = 2.0;
/// What "a handful of journal records" for a VPS that forks 10^4 times means here.
pub const JOURNAL_GOAL_RECORDS: f64 = 10.0;

/// One variant of the overhead comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OverheadRow {
    pub mode: String,
    pub variant: String,
    /// tracked rate / untracked rate (ABAB neighbours), per round.
    pub ratio: Summary,
    /// The tracked rate, ops/s.
    pub rate: Summary,
    /// CPU seconds of the listener per 10^5 workload events (trackers and forkstat).
    pub cpu_per_1e5: Option<Summary>,
    /// Events the manager applied per workload event (host-wide listeners see others' too).
    pub events_seen_per_event: Option<f64>,
    /// The tracking process's wake-ups (voluntary context switches) per workload event.
    #[serde(default)]
    pub wakeups_per_event: Option<f64>,
    pub ratios: Vec<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LossRow {
    pub label: String,
    pub rcvbuf: String,
    pub mode: String,
    pub parallel: u32,
    /// Asked rate (0: as fast as possible).
    pub target_rate: f64,
    pub rate: Summary,
    pub loss_reports: Summary,
    pub lost_events: Summary,
    pub resyncs: Summary,
    /// Runs whose final table was exact (no divergence, nothing left).
    pub exact_runs: usize,
    pub runs: usize,
    pub resync_secs: Summary,
    /// Runs where `Manager::wait` never saw the first process end (its exit event was lost).
    #[serde(default)]
    pub wait_missed: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Results {
    pub date: String,
    pub command: String,
    /// How the binary was built.
    pub build: String,
    pub machine: Vec<(String, String)>,
    pub rounds: usize,
    pub pin_cpu: String,
    pub tracker_cpu: String,
    pub loss_parallel: u32,
    pub entry_size: usize,
    pub counts: Vec<(String, u64)>,
    pub unavailable: Vec<(String, String)>,
    pub accuracy: Vec<(String, Vec<AccuracyResult>)>,
    pub accuracy_procs: u64,
    pub untracked: Vec<(String, Summary)>,
    pub overhead: Vec<OverheadRow>,
    pub latency: Vec<(String, Summary, Summary, LatencyResult)>,
    pub untracked_parallel_rate: Option<Summary>,
    pub loss: Vec<LossRow>,
    pub highest_zero_loss_small: Option<f64>,
    pub scale: Vec<ScaleRow>,
    pub resync: Vec<ResyncRow>,
    pub criterion: Vec<(String, f64)>,
    pub load_before: String,
    pub load_after: String,
    pub elapsed: f64,
    /// The daemon as deployed (`vpstag-bench daemon`), when measured.
    pub daemon: Option<DaemonResults>,
}

/// What the daemon cost during one tracked run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonRun {
    /// CPU seconds (user + system, all threads) the daemon used from just before `vpstag start`
    /// to the moment it listed the VPS empty.
    pub cpu_secs: f64,
    /// The same by /proc/PID/stat's utime + stime (10 ms ticks), as a cross-check.
    pub stat_cpu_secs: f64,
    /// Voluntary context switches of its threads in that span.
    pub voluntary: u64,
    /// Involuntary context switches of its threads in that span.
    pub involuntary: u64,
    /// The same two figures (CPU seconds, switches) for a VPS running /bin/true just before: what
    /// starting a VPS and the bench's questions cost, whatever the VPS does. Included above.
    pub vps_cpu_secs: f64,
    pub vps_switches: u64,
    /// Events the daemon's manager applied in that span (host-wide backends see others' too).
    pub events_applied: u64,
    pub loss_reports: u64,
    pub lost_events: u64,
    pub resyncs: u64,
    /// Bytes the run added to the state directory (journal and snapshot).
    pub journal_bytes: i64,
    /// Journal lines (records) the run added.
    pub journal_records: i64,
    /// The daemon wrote a new snapshot during the run (the journal was compacted: the two
    /// figures above then undercount).
    pub compacted: bool,
    /// Seconds from the daemon's start to its first `hello` answer.
    pub startup_secs: f64,
    /// Seconds from the workload's end to the daemon listing the VPS empty.
    pub catch_up_secs: f64,
    /// Divergences `check` found after the run (expected 0).
    pub divergences: usize,
    /// The untracked workload's rate while the daemon ran (not in any VPS).
    pub bystander_rate: Option<f64>,
    /// How the daemon ended after SIGTERM.
    pub exit: String,
}

/// One tracked run with its untracked neighbours.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunRecord {
    pub mode: String,
    pub variant: String,
    pub round: usize,
    /// The untracked rates just before and just after, ops/s.
    pub before: f64,
    pub after: f64,
    /// The tracked rate, ops/s.
    pub rate: f64,
    pub ratio: f64,
    pub daemon: Option<DaemonRun>,
}

/// One variant on one workload, over the rounds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonRow {
    pub variant: String,
    /// The daemon's backend (None for strace and the C tracer).
    pub backend: Option<String>,
    pub mode: String,
    /// tracked rate / untracked rate (ABAB neighbours).
    pub ratio: Summary,
    pub ratios: Vec<f64>,
    /// The tracked rate, ops/s.
    pub rate: Summary,
    /// Untracked while the daemon ran / untracked with no daemon.
    pub bystander_ratio: Option<Summary>,
    pub cpu_us_per_event: Option<Summary>,
    /// The same without the fixed cost of a VPS (a /bin/true VPS's, measured in the same daemon).
    pub net_cpu_us_per_event: Option<Summary>,
    /// That fixed cost: the daemon's CPU ms and wake-ups for a VPS running /bin/true.
    pub vps_cpu_ms: Option<Summary>,
    pub vps_wakeups: Option<Summary>,
    /// Voluntary + involuntary context switches of the daemon per workload event.
    pub wakeups_per_event: Option<Summary>,
    pub events_applied_per_event: Option<Summary>,
    pub journal_bytes: Option<Summary>,
    pub journal_records: Option<Summary>,
    pub compacted_runs: usize,
    pub loss_reports: u64,
    pub divergences: usize,
    pub catch_up_secs: Option<Summary>,
    pub startup_secs: Option<Summary>,
    /// Rounds that failed (see `DaemonResults::failures`).
    pub failed_runs: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonResults {
    pub date: String,
    /// The command line of this measurement.
    pub command: String,
    pub build: String,
    pub vpstag: String,
    pub vpstag_version: String,
    /// How each daemon was started.
    pub daemon_command: String,
    pub state_root: String,
    pub state_fs: String,
    pub rounds: usize,
    pub counts: Vec<(String, u64)>,
    pub pin_cpu: String,
    pub daemon_cpu: String,
    pub unavailable: Vec<(String, String)>,
    /// Untracked rates (no daemon) per workload.
    pub untracked: Vec<(String, Summary)>,
    pub rows: Vec<DaemonRow>,
    pub runs: Vec<RunRecord>,
    /// Every failed run, with what was seen.
    pub failures: Vec<String>,
    pub load_before: String,
    pub load_after: String,
    pub elapsed: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_per_backend_and_workload() {
        assert_eq!(ratio_goal("cnproc", "spawn"), Some(0.97));
        assert_eq!(ratio_goal("ebpf", "seq"), Some(0.97));
        assert_eq!(ratio_goal("ptrace", "seq"), Some(0.30));
        assert_eq!(ratio_goal("ptrace", "burst"), Some(0.40));
        assert_eq!(ratio_goal("ptrace", "spawn"), Some(0.80));
        assert_eq!(ratio_goal("kqueue", "seq"), None);
    }
}
