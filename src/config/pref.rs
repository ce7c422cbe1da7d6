//! Preference training's settings (`rl:` and its keys) and preference dataset formats, as
//! Axolotl names them. The losses' formulas are in `train::pref`.

use serde::Serialize;

/// The pair loss of a preference method, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "loss", rename_all = "snake_case")]
pub enum PrefLoss {
    /// DPO's sigmoid loss on the reference-relative margin; `label_smoothing` > 0 is
    /// conservative DPO (cDPO: the labels flipped with that probability).
    Sigmoid { beta: f64, label_smoothing: f64 },
    /// IPO: the squared distance of the length-normalised margin from 1/(2β).
    Ipo { beta: f64 },
    /// SLiC's hinge on the reference-relative margin.
    Hinge { beta: f64 },
    /// ORPO: −β·log σ(log odds ratio) of the length-averaged log-probabilities, no reference;
    /// the chosen completions' token loss is added.
    Orpo { beta: f64 },
    /// SimPO (CPO's `simpo` loss): the sigmoid loss on the length-averaged margin less γ/β, no
    /// reference; plus `cpo_alpha` times the chosen completions' token loss.
    Simpo {
        beta: f64,
        gamma: f64,
        label_smoothing: f64,
        cpo_alpha: f64,
    },
    /// KTO on unpaired data: each completion labelled desirable or not, its reward
    /// β·(log π − log π_ref) pushed above (or below) the batch's estimate of KL(π ‖ π_ref),
    /// weighted by `desirable_weight` / `undesirable_weight`.
    Kto {
        beta: f64,
        desirable_weight: f64,
        undesirable_weight: f64,
    },
}

/// How the prompt is marked up by Axolotl's fixed-string preference types (`chatml.*`,
/// `llama3.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PairMarkup {
    Chatml,
    Llama3,
}

/// Which fields an Axolotl fixed-string preference type reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PairFields {
    /// `argilla` / `default`: the prompt in `prompt`, `input`, `question` or `instruction`
    /// (the first present), completions in `chosen`/`rejected` or
    /// `chosen_response`/`rejected_response`; optional `system`.
    Argilla,
    /// `argilla_chat`: `chosen` and `rejected` are [user, assistant] conversations.
    ArgillaChat,
    /// `icr`: `input`, `chosen`, `rejected`, optional `system`.
    Icr,
    /// `intel`: `question`, `chosen`, `rejected`, optional `system`.
    Intel,
    /// `prompt_pairs`: `prompt`, `chosen`, `rejected`, optional `system`.
    PromptPairs,
    /// `ultra`: `prompt`, and `chosen`/`rejected` conversations whose second message is the
    /// completion; optional `system`.
    Ultra,
}

impl PairFields {
    /// Axolotl's strategy names, both markups.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "argilla" | "default" => PairFields::Argilla,
            "argilla_chat" => PairFields::ArgillaChat,
            "icr" => PairFields::Icr,
            "intel" => PairFields::Intel,
            "prompt_pairs" => PairFields::PromptPairs,
            "ultra" => PairFields::Ultra,
            _ => return None,
        })
    }

    pub const NAMES: &'static [&'static str] = &[
        "argilla",
        "argilla_chat",
        "icr",
        "intel",
        "prompt_pairs",
        "ultra",
    ];
}
