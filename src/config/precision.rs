//! How training stores what it does not compute with at f32: the frozen base weights
//! (`adapter: qlora` + `load_in_4bit`, `load_in_8bit`, `bf16` / `fp16`) and AdamW's moments
//! (Axolotl's 8- and 4-bit optimizer names). Both are train keys; f32 (the default) is left out
//! of the key, so configs without these settings keep the keys they had.

use serde::Serialize;

/// Storage of the frozen block linear weights while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BaseWeights {
    #[default]
    F32,
    Bf16,
    F16,
    /// LLM.int8's storage (`load_in_8bit`).
    Int8,
    Nf4,
    /// NF4 with double-quantised scales (bitsandbytes' `bnb_4bit_use_double_quant`, Axolotl's
    /// default).
    Nf4DoubleQuant,
    Fp4,
    Fp4DoubleQuant,
}

impl BaseWeights {
    pub fn is_f32(&self) -> bool {
        *self == BaseWeights::F32
    }

    /// What the storage costs, for the line training prints.
    pub fn describe(&self) -> &'static str {
        use BaseWeights::*;
        match self {
            F32 => "f32 (4 bytes a weight)",
            Bf16 => "bf16 (2 bytes a weight)",
            F16 => "f16 (2 bytes a weight)",
            Int8 => "int8, row-wise absmax (≈1 byte a weight)",
            Nf4 => "NF4, blocks of 64 with f32 scales (4.5 bits a weight)",
            Nf4DoubleQuant => "NF4, blocks of 64, double-quantised scales (≈4.13 bits a weight)",
            Fp4 => "FP4, blocks of 64 with f32 scales (4.5 bits a weight)",
            Fp4DoubleQuant => "FP4, blocks of 64, double-quantised scales (≈4.13 bits a weight)",
        }
    }
}

/// AdamW's moment storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimStates {
    #[default]
    F32,
    /// bitsandbytes' blockwise 8-bit (dynamic maps, blocks of 256; parameters under 4096
    /// values keep f32 moments).
    Bnb8bit,
    /// torchao's AdamW8bit (dynamic maps, blocks of 256).
    Torchao8bit,
    /// torchao's AdamW4bit (signed 4-bit dynamic map for m, linear 4-bit for v, blocks of 128).
    Torchao4bit,
}

impl OptimStates {
    pub fn is_f32(&self) -> bool {
        *self == OptimStates::F32
    }
}

/// The moment storage Axolotl's `optimizer:` name asks for, with a note when kiln's behaviour
/// differs from the name's (paging). None: not an AdamW kiln implements.
pub fn optimizer_states(name: &str) -> Option<(OptimStates, Option<&'static str>)> {
    const PAGED: &str = "paged optimizers page their state to CPU memory under GPU pressure; kiln keeps it in memory already, so this is its unpaged twin";
    Some(match name {
        "adamw_torch" | "adamw_torch_fused" | "adamw_hf" | "adamw" => (OptimStates::F32, None),
        "paged_adamw_32bit" => (OptimStates::F32, Some(PAGED)),
        "adamw_bnb_8bit" | "adamw_8bit" => (OptimStates::Bnb8bit, None),
        "paged_adamw_8bit" => (OptimStates::Bnb8bit, Some(PAGED)),
        "adamw_torch_8bit" => (OptimStates::Torchao8bit, None),
        "adamw_torch_4bit" => (OptimStates::Torchao4bit, None),
        _ => return None,
    })
}
