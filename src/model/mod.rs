//! The Llama-family model (Llama 2/3, SmolLM, Qwen2, Mistral differ by config) in candle, built
//! from differentiable ops so the train stage can backpropagate through it, with weights from
//! HF-layout safetensors or GGUF (dequantized to f32). Knows nothing about data or the cache.

pub mod adapter;
pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod frozen;
pub mod generate;
pub mod gguf_export;
pub mod llama;
pub mod load;
pub mod lora_op;
pub mod norm;
pub(crate) mod ops;
pub mod packed;
pub mod qkernels;
pub mod qmaps;
pub mod rope;
pub use kiln_kernels::sgemm;
pub mod swiglu;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::Llama;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Load {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("model config: {0}")]
    Config(String),
    #[error("missing weight `{0}`")]
    MissingWeight(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
