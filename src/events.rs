//! The one closed set of things that happen during a plan or run. The scheduler and stages emit
//! them; the CLI renders them; tests assert on them.

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A stage is fresh: its key has a finished cache entry.
    StageFresh { name: String, key: String },
    /// A stale stage starts building, with the reason it is stale.
    StageStarted {
        name: String,
        key: String,
        reason: String,
    },
    /// Progress inside a stage.
    Progress {
        name: String,
        done: u64,
        total: u64,
        unit: &'static str,
    },
    /// A stage finished and its entry is published.
    StageFinished {
        name: String,
        key: String,
        duration_ms: u64,
        bytes: u64,
    },
    /// A rebuilt stage produced the same output digest as before: downstream stays fresh.
    EarlyCutoff { name: String },
    /// A stage failed; nothing was published.
    StageFailed { name: String, error: String },
    /// A cache entry failed verification and was moved to quarantine; it will be rebuilt.
    Corrupt {
        name: String,
        key: String,
        damage: Vec<String>,
    },
    /// A training or evaluation figure at a step (recorded in the index's metrics table).
    Metric {
        stage: String,
        step: u64,
        name: String,
        value: f64,
    },
    /// Something the user should know that does not stop the run.
    Warning { message: String },
    /// What a stage decided that the user should see once (a train stage's weight storage).
    Note { message: String },
    /// A training step's log line (every `logging_steps`): shown as a progress bar in a
    /// terminal, a plain line otherwise. Its figures are also sent as `Metric`s.
    TrainLog(TrainLog),
}

/// What a train stage reports every `logging_steps`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainLog {
    pub stage: String,
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub samples_per_s: f64,
    pub elapsed_s: f64,
    /// Remaining time at the pace so far.
    pub eta_s: f64,
    /// The process's peak resident memory.
    pub peak_rss_bytes: Option<u64>,
}
