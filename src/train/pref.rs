//! Preference losses (DPO and its variants, ORPO, SimPO) on per-sequence log-probabilities, with
//! their gradients written out, as TRL defines them (`DPOTrainer`, `ORPOTrainer`,
//! `CPOTrainer` in TRL 1.16): the training step sums each completion's token log-probabilities,
//! evaluates the pair loss and its derivatives here in f64, and hands each trained position the
//! derivative of the batch loss with respect to its log-probability (see `train::pref_step`).
//! tests/fixtures/pref/reference.json holds the losses and gradients PyTorch's autograd computes
//! for the same formulas (scripts/pref-reference.py, calling TRL's own ORPO and CPO loss code).

use super::{token_losses, AdamW, Batch};
use crate::model::{Llama, ModelError};
use candle_core::{Tensor, Var};
use serde::Serialize;

pub use crate::config::pref::PrefLoss;

/// One pair's sequence scores: the summed token log-probabilities of the chosen and rejected
/// completions under the trained model (`chosen`, `rejected`) and the reference model, and the
/// completions' token counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairScores {
    pub chosen: f64,
    pub rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
}

/// A pair's loss, its derivatives with respect to the summed log-probabilities, and its
/// rewards (TRL's `rewards/chosen` and `rewards/rejected`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLoss {
    pub loss: f64,
    pub d_chosen: f64,
    pub d_rejected: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}

/// log σ(x), without overflow for large |x|.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// σ(x).
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log(1 − eˣ) for x < 0, as TRL's `log1mexp` (branching at −ln 2 against cancellation).
fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// −(1 − ε)·log σ(z) − ε·log σ(−z) and its derivative in z.
fn smoothed_sigmoid(z: f64, eps: f64) -> (f64, f64) {
    let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
    let d = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
    (loss, d)
}

impl PrefLoss {
    pub fn beta(&self) -> f64 {
        match *self {
            PrefLoss::Sigmoid { beta, .. }
            | PrefLoss::Ipo { beta }
            | PrefLoss::Hinge { beta }
            | PrefLoss::Orpo { beta }
            | PrefLoss::Simpo { beta, .. }
            | PrefLoss::Kto { beta, .. } => beta,
        }
    }

    /// Whether the loss compares with a reference model (DPO's family does; ORPO and SimPO
    /// do not).
    pub fn needs_reference(&self) -> bool {
        matches!(
            self,
            PrefLoss::Sigmoid { .. }
                | PrefLoss::Ipo { .. }
                | PrefLoss::Hinge { .. }
                | PrefLoss::Kto { .. }
        )
    }

    /// The weight of the chosen completions' mean token loss added to the pair losses' mean
    /// (ORPO's 1, CPO/SimPO's `cpo_alpha`, 0 for the DPO family).
    pub fn nll_weight(&self) -> f64 {
        match *self {
            PrefLoss::Orpo { .. } => 1.0,
            PrefLoss::Simpo { cpo_alpha, .. } => cpo_alpha,
            _ => 0.0,
        }
    }

    /// Whether the units are unpaired completions with labels (KTO) rather than pairs: each
    /// unit's second sequence is then its prompt with another unit's completion, scored for the
    /// batch's KL estimate only.
    pub fn unpaired(&self) -> bool {
        matches!(self, PrefLoss::Kto { .. })
    }

    /// KTO's loss for one completion and its derivative in the completion's summed
    /// log-probability, given the batch's KL estimate `kl` (held constant, as TRL detaches it):
    /// desirable 1 − σ(β(r − kl)), undesirable 1 − σ(β(kl − r)), r = log π − log π_ref, each
    /// times its weight. Zero for the other losses.
    pub fn kto_unit(&self, logp: f64, ref_logp: f64, kl: f64, desirable: bool) -> (f64, f64) {
        let PrefLoss::Kto {
            beta,
            desirable_weight,
            undesirable_weight,
        } = *self
        else {
            return (0.0, 0.0);
        };
        let r = logp - ref_logp;
        let (z, sign, w) = if desirable {
            (beta * (r - kl), 1.0, desirable_weight)
        } else {
            (beta * (kl - r), -1.0, undesirable_weight)
        };
        // d(1 − σ(z))/dr = −σ(z)σ(−z) · dz/dr, dz/dr = ±β.
        (
            w * (1.0 - sigmoid(z)),
            -w * sigmoid(z) * sigmoid(-z) * beta * sign,
        )
    }

    /// One pair's loss and its derivatives.
    pub fn pair(&self, s: &PairScores) -> PairLoss {
        let nc = s.chosen_tokens.max(1) as f64;
        let nr = s.rejected_tokens.max(1) as f64;
        let (cr, rr) = (s.chosen - s.ref_chosen, s.rejected - s.ref_rejected);
        match *self {
            PrefLoss::Sigmoid {
                beta,
                label_smoothing,
            } => {
                let (loss, dz) = smoothed_sigmoid(beta * (cr - rr), label_smoothing);
                PairLoss {
                    loss,
                    d_chosen: dz * beta,
                    d_rejected: -dz * beta,
                    reward_chosen: beta * cr,
                    reward_rejected: beta * rr,
                }
            }
            PrefLoss::Hinge { beta } => {
                let z = beta * (cr - rr);
                let (loss, dz) = if 1.0 - z > 0.0 {
                    (1.0 - z, -1.0)
                } else {
                    (0.0, 0.0)
                };
                PairLoss {
                    loss,
                    d_chosen: dz * beta,
                    d_rejected: -dz * beta,
                    reward_chosen: beta * cr,
                    reward_rejected: beta * rr,
                }
            }
            PrefLoss::Ipo { beta } => {
                let h = cr / nc - rr / nr - 1.0 / (2.0 * beta);
                PairLoss {
                    loss: h * h,
                    d_chosen: 2.0 * h / nc,
                    d_rejected: -2.0 * h / nr,
                    reward_chosen: beta * cr,
                    reward_rejected: beta * rr,
                }
            }
            PrefLoss::Orpo { beta } => {
                let (pc, pr) = (s.chosen / nc, s.rejected / nr);
                let log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr));
                // d log_odds / d p = 1 / (1 − eᵖ) for the chosen, −1 / (1 − eᵖ) for the
                // rejected; d(−β log σ(o))/do = −β σ(−o).
                let d_odds = -beta * sigmoid(-log_odds);
                PairLoss {
                    loss: -beta * log_sigmoid(log_odds),
                    d_chosen: d_odds / (-pc.exp_m1()) / nc,
                    d_rejected: -d_odds / (-pr.exp_m1()) / nr,
                    reward_chosen: beta * pc,
                    reward_rejected: beta * pr,
                }
            }
            // KTO scores completions one by one against a batch-level KL estimate (see
            // `kto_unit` and `score_units`), not pairs.
            PrefLoss::Kto { .. } => PairLoss {
                loss: 0.0,
                d_chosen: 0.0,
                d_rejected: 0.0,
                reward_chosen: 0.0,
                reward_rejected: 0.0,
            },
            PrefLoss::Simpo {
                beta,
                gamma,
                label_smoothing,
                ..
            } => {
                let (pc, pr) = (s.chosen / nc, s.rejected / nr);
                let z = beta * ((pc - pr) - gamma / beta);
                let (loss, dz) = smoothed_sigmoid(z, label_smoothing);
                PairLoss {
                    loss,
                    d_chosen: dz * beta / nc,
                    d_rejected: -dz * beta / nr,
                    reward_chosen: beta * pc,
                    reward_rejected: beta * pr,
                }
            }
        }
    }
}

/// The metrics TRL logs per step for a batch of pairs (means over the pairs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PrefMetrics {
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_margins: f64,
    pub rewards_accuracies: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
    /// KTO's KL estimate (NaN for the pair losses); `rewards_accuracies` is NaN for KTO.
    pub kl: f64,
}

/// Per sample of a batch: the summed log-probability of its trained tokens (the negated sum of
/// their token losses, in f64) and how many there are.
pub fn sample_logps(
    losses: &[f32],
    weights: &[f32],
    samples: &[(usize, usize)],
) -> Vec<(f64, usize)> {
    samples
        .iter()
        .map(|&(a, z)| {
            let lp = -losses[a..z].iter().map(|&l| f64::from(l)).sum::<f64>();
            let n = weights[a..z].iter().filter(|&&w| w > 0.0).count();
            (lp, n)
        })
        .collect()
}

/// A sample's flat position range in a batch.
type Span = (usize, usize);

/// A batch's samples as pairs: samples 2k and 2k+1 are pair k's chosen and rejected sequence
/// (the tokenize stage writes them so, and packing keeps a pair in one row).
fn pairs_of(batch: &Batch) -> Result<Vec<(Span, Span)>, ModelError> {
    if !batch.samples.len().is_multiple_of(2) {
        return Err(ModelError::Config(format!(
            "a preference batch holds whole pairs (chosen, rejected); this one has {} sequences",
            batch.samples.len()
        )));
    }
    Ok(batch.samples.chunks(2).map(|c| (c[0], c[1])).collect())
}

/// Per pair of `batch`: the summed log-probabilities of the chosen and rejected completions
/// under `model` as it is (the reference model's scores, when `model` is the reference), without
/// gradients.
pub fn pair_logps(model: &Llama, batch: &Batch) -> Result<Vec<(f64, f64)>, ModelError> {
    let pairs = pairs_of(batch)?;
    let losses = token_losses(model, batch, None)?
        .detach()
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = sample_logps(&losses, &batch.loss_weights, &batch.samples);
    Ok((0..pairs.len())
        .map(|k| (per[2 * k].0, per[2 * k + 1].0))
        .collect())
}

/// One micro-batch of pairs with the reference model's scores of each pair (chosen, rejected);
/// empty when the loss needs no reference.
pub struct PrefMicro {
    pub batch: Batch,
    pub reference: Vec<(f64, f64)>,
    /// KTO: whether each unit's completion is desirable (empty for pairs).
    pub labels: Vec<bool>,
}

/// A preference step's loss (pair losses' mean, plus the chosen completions' token loss for
/// ORPO and SimPO), its metrics and the trained variables' gradients.
pub struct PrefGrads {
    pub loss: f64,
    /// The chosen completions' mean token loss (TRL's `nll_loss`).
    pub nll: f64,
    pub metrics: PrefMetrics,
    pub grads: Vec<Tensor>,
}

/// The gradients of a preference step over micro-batches (gradient accumulation): the loss is
/// the mean over every pair of all micro-batches, and the token-loss term the mean over all
/// their chosen tokens, as one batch of them would give. Each micro-batch runs one forward pass
/// of the trained model for its chosen and rejected sequences together, and one backward pass of
/// Σ ∂L/∂logp · logp: the pair loss is evaluated here in f64 between the two, so each
/// position's loss gets its gradient (the head's op recomputes its logits for it,
/// `GradHint::PerRow`).
pub fn pref_grads(
    model: &Llama,
    vars: &[Var],
    micro: &[PrefMicro],
    loss: &PrefLoss,
) -> Result<PrefGrads, ModelError> {
    let mut n_units = 0usize;
    let mut chosen_tokens = 0usize;
    for m in micro {
        let pairs = pairs_of(&m.batch)?;
        check_micro(loss, m, pairs.len())?;
        n_units += pairs.len();
        chosen_tokens += pairs
            .iter()
            .map(|&((a, z), _)| {
                m.batch.loss_weights[a..z]
                    .iter()
                    .filter(|&&w| w > 0.0)
                    .count()
            })
            .sum::<usize>();
    }
    let n = n_units.max(1) as f64;
    let nll_w = loss.nll_weight();
    let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
    let (mut total, mut nll) = (0f64, 0f64);
    let mut sums = MetricSums::default();
    for m in micro {
        let b = &m.batch;
        let pairs = pairs_of(b)?;
        let losses = token_losses(model, b, Some(super::ce::GradHint::PerRow))?.flatten_all()?;
        let vals = losses.to_vec1::<f32>()?;
        let per = sample_logps(&vals, &b.loss_weights, &b.samples);
        let units = score_units(loss, &per, &m.reference, &m.labels, &mut sums);
        // d(step loss)/d(token loss) per position: −∂L/∂logp of its sequence.
        let mut w = vec![0f32; vals.len()];
        for (k, &((ca, cz), (ra, rz))) in pairs.iter().enumerate() {
            let (l, d_first, d_second) = units[k];
            total += l / n;
            nll += -per[2 * k].0 / chosen_tokens.max(1) as f64;
            let dc = -d_first / n + nll_w / chosen_tokens.max(1) as f64;
            let dr = -d_second / n;
            w[ca..cz].iter_mut().for_each(|x| *x = dc as f32);
            w[ra..rz].iter_mut().for_each(|x| *x = dr as f32);
        }
        let w = Tensor::from_vec(w, vals.len(), losses.device())?;
        let surrogate = (losses * w)?.sum_all()?;
        let grads = surrogate.backward()?;
        super::accumulate(model, vars, &grads, &mut acc)?;
    }
    Ok(PrefGrads {
        loss: total + nll_w * nll,
        nll,
        metrics: sums.finish(loss),
        grads: super::finish_grads(acc, vars)?,
    })
}

/// A micro-batch has what its loss reads: reference scores per unit, labels for KTO.
fn check_micro(loss: &PrefLoss, m: &PrefMicro, units: usize) -> Result<(), ModelError> {
    if loss.needs_reference() && m.reference.len() != units {
        return Err(ModelError::Config(format!(
            "{units} pairs but {} reference scores",
            m.reference.len()
        )));
    }
    if loss.unpaired() && m.labels.len() != units {
        return Err(ModelError::Config(format!(
            "{units} KTO completions but {} labels",
            m.labels.len()
        )));
    }
    Ok(())
}

/// Running sums for [`PrefMetrics`] over an effective batch.
#[derive(Debug, Default, Clone)]
pub struct MetricSums {
    chosen: (f64, f64, usize),
    rejected: (f64, f64, usize),
    correct: usize,
    pairs: usize,
    kl: (f64, usize),
}

impl MetricSums {
    /// The means (TRL's: over pairs; for KTO over the desirable and the undesirable
    /// completions, and the micro-batches' KL estimates).
    pub fn finish(&self, loss: &PrefLoss) -> PrefMetrics {
        let mean = |s: f64, n: usize| if n == 0 { 0.0 } else { s / n as f64 };
        let rc = mean(self.chosen.0, self.chosen.2);
        let rr = mean(self.rejected.0, self.rejected.2);
        PrefMetrics {
            rewards_chosen: rc,
            rewards_rejected: rr,
            rewards_margins: rc - rr,
            rewards_accuracies: if loss.unpaired() {
                f64::NAN
            } else {
                mean(self.correct as f64, self.pairs)
            },
            logps_chosen: mean(self.chosen.1, self.chosen.2),
            logps_rejected: mean(self.rejected.1, self.rejected.2),
            kl: if loss.unpaired() {
                mean(self.kl.0, self.kl.1)
            } else {
                f64::NAN
            },
        }
    }
}

/// One micro-batch's units scored from its sequences' summed log-probabilities `per` (2 per
/// unit): per unit its loss term and the derivatives of that term in the unit's first and second
/// sequence's log-probability; the metric sums updated. Pairs: the pair loss. KTO: the
/// micro-batch's KL estimate max(0, mean(log π − log π_ref) of the mismatched second
/// sequences), then each completion's loss against it (no gradient through the estimate, as TRL).
pub fn score_units(
    loss: &PrefLoss,
    per: &[(f64, usize)],
    reference: &[(f64, f64)],
    labels: &[bool],
    sums: &mut MetricSums,
) -> Vec<(f64, f64, f64)> {
    let units = per.len() / 2;
    let refs = |k: usize| reference.get(k).copied().unwrap_or((0.0, 0.0));
    if loss.unpaired() {
        let kl = if units == 0 {
            0.0
        } else {
            ((0..units)
                .map(|k| per[2 * k + 1].0 - refs(k).1)
                .sum::<f64>()
                / units as f64)
                .max(0.0)
        };
        sums.kl.0 += kl;
        sums.kl.1 += 1;
        return (0..units)
            .map(|k| {
                let desirable = labels.get(k).copied().unwrap_or(true);
                let (l, d) = loss.kto_unit(per[2 * k].0, refs(k).0, kl, desirable);
                let reward = loss.beta() * (per[2 * k].0 - refs(k).0);
                let side = if desirable {
                    &mut sums.chosen
                } else {
                    &mut sums.rejected
                };
                side.0 += reward;
                side.1 += per[2 * k].0;
                side.2 += 1;
                (l, d, 0.0)
            })
            .collect();
    }
    (0..units)
        .map(|k| {
            let (rc, rr) = refs(k);
            let s = PairScores {
                chosen: per[2 * k].0,
                rejected: per[2 * k + 1].0,
                ref_chosen: rc,
                ref_rejected: rr,
                chosen_tokens: per[2 * k].1,
                rejected_tokens: per[2 * k + 1].1,
            };
            let l = loss.pair(&s);
            sums.chosen.0 += l.reward_chosen;
            sums.chosen.1 += s.chosen;
            sums.chosen.2 += 1;
            sums.rejected.0 += l.reward_rejected;
            sums.rejected.1 += s.rejected;
            sums.rejected.2 += 1;
            sums.correct += usize::from(l.reward_chosen > l.reward_rejected);
            sums.pairs += 1;
            (l.loss, l.d_chosen, l.d_rejected)
        })
        .collect()
}

/// One optimizer step of preference training; returns the gradients' outcome (loss, metrics)
/// and the gradient norm before clipping.
pub fn pref_step(
    model: &Llama,
    opt: &mut AdamW,
    micro: &[PrefMicro],
    loss: &PrefLoss,
    lr: f64,
    max_grad_norm: f64,
) -> Result<(PrefGrads, f64), ModelError> {
    let mut g = pref_grads(model, &opt.vars, micro, loss)?;
    let grads = std::mem::take(&mut g.grads);
    let norm = opt.update(&grads, lr, max_grad_norm)?;
    Ok((g, norm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// TRL's ORPO casts the log-probabilities to f32 (`.float()`), so it is compared at f32's
    /// precision; everything else at f64's.
    fn close(a: f64, b: f64, what: &str) {
        let tol = if what.starts_with("Orpo") { 1e-6 } else { 1e-9 };
        assert!(
            (a - b).abs() <= tol * b.abs().max(1e-3),
            "{what}: kiln {a} vs PyTorch/TRL {b}"
        );
    }

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    }

    #[test]
    fn losses_and_gradients_match_pytorch_and_trl() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/pref/reference.json"
        );
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
        let pairs: Vec<PairScores> = r["pairs"]
            .as_array()
            .expect("pairs")
            .iter()
            .map(|p| PairScores {
                chosen: p["chosen"].as_f64().expect("chosen"),
                rejected: p["rejected"].as_f64().expect("rejected"),
                ref_chosen: p["ref_chosen"].as_f64().expect("ref"),
                ref_rejected: p["ref_rejected"].as_f64().expect("ref"),
                chosen_tokens: p["chosen_tokens"].as_u64().expect("n") as usize,
                rejected_tokens: p["rejected_tokens"].as_u64().expect("n") as usize,
            })
            .collect();
        let cases = r["cases"].as_array().expect("cases");
        assert_eq!(cases.len(), 7);
        for c in cases {
            let p = &c["params"];
            let f = |k: &str| p[k].as_f64().expect(k);
            let loss = match c["loss"].as_str().expect("loss") {
                "sigmoid" => PrefLoss::Sigmoid {
                    beta: f("beta"),
                    label_smoothing: f("label_smoothing"),
                },
                "hinge" => PrefLoss::Hinge { beta: f("beta") },
                "ipo" => PrefLoss::Ipo { beta: f("beta") },
                "orpo" => PrefLoss::Orpo { beta: f("beta") },
                "simpo" => PrefLoss::Simpo {
                    beta: f("beta"),
                    gamma: f("gamma"),
                    label_smoothing: f("label_smoothing"),
                    cpo_alpha: 0.0,
                },
                other => panic!("unexpected loss {other}"),
            };
            let name = format!("{loss:?}");
            let per: Vec<(f64, usize)> = pairs
                .iter()
                .flat_map(|p| [(p.chosen, p.chosen_tokens), (p.rejected, p.rejected_tokens)])
                .collect();
            let refs: Vec<(f64, f64)> = pairs
                .iter()
                .map(|p| (p.ref_chosen, p.ref_rejected))
                .collect();
            let mut sums = MetricSums::default();
            let units = score_units(&loss, &per, &refs, &[], &mut sums);
            let n = units.len() as f64;
            let mean = units.iter().map(|u| u.0).sum::<f64>() / n;
            let grads: Vec<(f64, f64)> = units.iter().map(|u| (u.1 / n, u.2 / n)).collect();
            let metrics = sums.finish(&loss);
            close(mean, c["mean"].as_f64().expect("mean"), &name);
            let per = floats(&c["per_pair"]);
            let (dc, dr) = (floats(&c["d_chosen"]), floats(&c["d_rejected"]));
            let (rc, rr) = (floats(&c["reward_chosen"]), floats(&c["reward_rejected"]));
            for (i, p) in pairs.iter().enumerate() {
                let l = loss.pair(p);
                close(l.loss, per[i], &format!("{name} pair {i} loss"));
                close(grads[i].0, dc[i], &format!("{name} pair {i} d/dchosen"));
                close(grads[i].1, dr[i], &format!("{name} pair {i} d/drejected"));
                close(l.reward_chosen, rc[i], &format!("{name} pair {i} reward"));
                close(l.reward_rejected, rr[i], &format!("{name} pair {i} reward"));
            }
            let acc = rc.iter().zip(&rr).filter(|(a, b)| a > b).count() as f64 / rc.len() as f64;
            close(metrics.rewards_accuracies, acc, &format!("{name} accuracy"));
        }
    }

    #[test]
    fn kto_matches_pytorch_with_the_kl_estimate_held_and_clamped() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/pref/reference.json"
        );
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
        let cases = r["kto"].as_array().expect("kto cases");
        assert_eq!(cases.len(), 2);
        for c in cases {
            let p = &c["params"];
            let loss = PrefLoss::Kto {
                beta: p["beta"].as_f64().expect("beta"),
                desirable_weight: p["desirable_weight"].as_f64().expect("w"),
                undesirable_weight: p["undesirable_weight"].as_f64().expect("w"),
            };
            let labels: Vec<bool> = c["labels"]
                .as_array()
                .expect("labels")
                .iter()
                .map(|l| l.as_bool().expect("bool"))
                .collect();
            let (lp, rlp) = (floats(&c["logps"]), floats(&c["ref_logps"]));
            let (klp, rklp) = (floats(&c["kl_logps"]), floats(&c["ref_kl_logps"]));
            let per: Vec<(f64, usize)> = lp
                .iter()
                .zip(&klp)
                .flat_map(|(&a, &b)| [(a, 10), (b, 10)])
                .collect();
            let refs: Vec<(f64, f64)> = rlp.iter().copied().zip(rklp.iter().copied()).collect();
            let mut sums = MetricSums::default();
            let units = score_units(&loss, &per, &refs, &labels, &mut sums);
            let n = units.len() as f64;
            let mean: f64 = units.iter().map(|u| u.0).sum::<f64>() / n;
            close(mean, c["mean"].as_f64().expect("mean"), "KTO mean");
            let (want, d) = (floats(&c["per_unit"]), floats(&c["d_logps"]));
            for (k, u) in units.iter().enumerate() {
                close(u.0, want[k], &format!("KTO unit {k} loss"));
                close(u.1 / n, d[k], &format!("KTO unit {k} d/dlogp"));
                assert_eq!(u.2, 0.0, "no gradient through the KL sequence");
            }
            let m = sums.finish(&loss);
            close(m.kl, c["kl"].as_f64().expect("kl"), "KTO kl");
            assert!(m.rewards_accuracies.is_nan());
        }
    }

    #[test]
    fn log_sigmoid_is_stable_far_out() {
        assert_eq!(log_sigmoid(800.0), 0.0);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!((sigmoid(-800.0)).abs() < 1e-300);
    }
}
