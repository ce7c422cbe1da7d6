//! Model hyperparameters from HF `config.json` or GGUF metadata.

use super::ModelError;
use candle_core::quantized::gguf_file::Content;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2 has biases on q, k and v.
    pub attention_bias: bool,
    /// Mistral's sliding window (tokens), if any.
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// From an HF `config.json` value.
    pub fn from_hf(v: &serde_json::Value) -> Result<Self, ModelError> {
        let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let need =
            |k: &str| u(k).ok_or_else(|| ModelError::Config(format!("config.json has no `{k}`")));
        let model_type = v
            .get("model_type")
            .and_then(|x| x.as_str())
            .unwrap_or("llama")
            .to_string();
        if !["llama", "qwen2", "mistral", "smollm", "smollm2"].contains(&model_type.as_str()) {
            return Err(ModelError::Config(format!(
                "not supported yet: model_type `{model_type}` (kiln runs llama, qwen2, mistral)"
            )));
        }
        let heads = need("num_attention_heads")?;
        Ok(Self {
            vocab_size: need("vocab_size")?,
            hidden_size: need("hidden_size")?,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: u("num_key_value_heads").unwrap_or(heads),
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .and_then(|x| x.as_f64())
                .unwrap_or(10000.0),
            max_position_embeddings: u("max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            attention_bias: model_type == "qwen2"
                || v.get("attention_bias")
                    .and_then(|x| x.as_bool())
                    .unwrap_or(false),
            sliding_window: if model_type == "mistral" {
                u("sliding_window")
            } else {
                None
            },
            architecture: model_type,
        })
    }

    /// From GGUF metadata (`<arch>.*` keys). `has_output` tells whether an untied lm head exists.
    pub fn from_gguf(c: &Content, has_output: bool) -> Result<Self, ModelError> {
        let md = &c.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "llama".into());
        if !["llama", "qwen2", "mistral"].contains(&arch.as_str()) {
            return Err(ModelError::Config(format!(
                "not supported yet: GGUF architecture `{arch}`"
            )));
        }
        let u = |k: &str| {
            md.get(&format!("{arch}.{k}"))
                .and_then(|v| v.to_u32().ok())
                .map(|x| x as usize)
        };
        let f = |k: &str| {
            md.get(&format!("{arch}.{k}"))
                .and_then(|v| v.to_f32().ok())
                .map(|x| x as f64)
        };
        let need =
            |k: &str| u(k).ok_or_else(|| ModelError::Config(format!("GGUF has no `{arch}.{k}`")));
        let heads = need("attention.head_count")?;
        let vocab = match md.get("tokenizer.ggml.tokens") {
            Some(candle_core::quantized::gguf_file::Value::Array(a)) => a.len(),
            _ => c
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| ModelError::Config("GGUF has no vocabulary".into()))?,
        };
        Ok(Self {
            architecture: arch.clone(),
            vocab_size: vocab,
            hidden_size: need("embedding_length")?,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: need("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: u("attention.head_count_kv").unwrap_or(heads),
            rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            rope_theta: f("rope.freq_base").unwrap_or(10000.0),
            max_position_embeddings: u("context_length").unwrap_or(4096),
            tie_word_embeddings: !has_output,
            attention_bias: arch == "qwen2",
            sliding_window: None,
        })
    }

    /// The HF `config.json` for this model (written beside trained weights).
    pub fn to_hf(&self) -> serde_json::Value {
        let arch = match self.architecture.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": if self.architecture == "qwen2" || self.architecture == "mistral" { self.architecture.as_str() } else { "llama" },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        })
    }
}
