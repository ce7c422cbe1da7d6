//! Generation over the inference engine ([`super::engine`]): sampling (temperature, top-k,
//! top-p, seeded), the generate loop, and streaming detokenization that never emits half a
//! UTF-8 character.

use super::engine::{Engine, EngineCache};
use super::ModelError;
use crate::rng::SplitMix64;

/// How to pick the next token.
#[derive(Debug, Clone)]
pub struct SamplingOptions {
    /// 0 = greedy.
    pub temperature: f64,
    /// 1.0 = off.
    pub top_p: f64,
    /// 0 = off.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 42,
        }
    }
}

pub struct Sampler {
    opts: SamplingOptions,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Self {
        let rng = SplitMix64::new(opts.seed);
        Self { opts, rng }
    }

    /// Greedy at temperature 0; otherwise softmax(logits / T), restricted to the top-k and then
    /// to the smallest set whose mass reaches top-p, sampled with the seeded PRNG.
    pub fn sample_slice(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                })
                .0 as u32
        };
        if self.opts.temperature <= 0.0 {
            return argmax();
        }
        let mut idx: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.opts.top_k > 0 {
            idx.truncate(self.opts.top_k);
        }
        if idx.is_empty() {
            return argmax();
        }
        let t = self.opts.temperature as f32;
        let max = logits[idx[0]] / t;
        let mut probs: Vec<f32> = idx.iter().map(|&i| (logits[i] / t - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.opts.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.opts.top_p as f32 {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let u = (self.rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        let mut acc = 0.0;
        for (p, &i) in probs.iter().zip(&idx) {
            acc += p;
            if u < acc {
                return i as u32;
            }
        }
        idx[idx.len() - 1] as u32
    }
}

/// Turns a growing list of token ids into text pieces, holding back bytes of an unfinished
/// UTF-8 character (the tokenizer decodes those as U+FFFD).
pub struct TextStream<'t> {
    tok: &'t tokenizers::Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t tokenizers::Tokenizer) -> Self {
        Self {
            tok,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, true).ok()?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return None;
        }
        let piece = text.get(self.emitted..)?.to_string();
        self.emitted = text.len();
        Some(piece)
    }

    /// Everything decoded so far.
    pub fn text(&self) -> String {
        self.tok.decode(&self.ids, true).unwrap_or_default()
    }
}

/// Timing of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub prompt_seconds: f64,
    pub generated_tokens: usize,
    pub decode_seconds: f64,
    /// "stop" (a stop token), "length" (max_new_tokens or the model's context) or "cancelled".
    pub finish_reason: String,
    /// The stop token that ended generation (fed into the cache, not emitted).
    pub stop_token: Option<u32>,
}

/// Generates after `prompt` (continuing `cache`), calling `on_token` with each new token; stops
/// at a stop token (not passed on), at `max_new` tokens, at the model's context
/// (`max_position_embeddings`: no token is sampled for a position past it), or when `on_token`
/// returns false.
pub fn generate(
    model: &Engine,
    cache: &mut EngineCache,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    sampler: &mut Sampler,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<GenStats, ModelError> {
    let mut st = GenStats {
        prompt_tokens: prompt.len(),
        finish_reason: "length".into(),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let mut logits = model.forward(prompt, cache)?;
    st.prompt_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    // The context bounds the answer: a token is sampled only for a position the model has.
    let context = model.cfg.max_position_embeddings;
    for n in 0..max_new {
        if cache.len >= context {
            break;
        }
        let next = sampler.sample_slice(&logits);
        if stop.contains(&next) {
            // Keep the stop token in the cache so a next turn continues after it.
            model.forward(&[next], cache)?;
            st.finish_reason = "stop".into();
            st.stop_token = Some(next);
            break;
        }
        st.generated_tokens += 1;
        if !on_token(next) {
            st.finish_reason = "cancelled".into();
            break;
        }
        if n + 1 < max_new && cache.len + 1 < context {
            logits = model.forward(&[next], cache)?;
        } else {
            break;
        }
    }
    st.decode_seconds = t1.elapsed().as_secs_f64();
    Ok(st)
}

/// Stop tokens for chat: the tokenizer's eos plus the end-of-turn markers of common templates
/// that this vocabulary has.
pub fn stop_tokens(tok: &crate::text::TextTokenizer) -> Vec<u32> {
    let mut v: Vec<u32> = tok.eos_id().into_iter().collect();
    for t in [
        "<|im_end|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        "<|endoftext|>",
        "<|end|>",
        "<end_of_turn>",
        "</s>",
    ] {
        if let Some(id) = tok.token_id(t) {
            if !v.contains(&id) {
                v.push(id);
            }
        }
    }
    v
}
