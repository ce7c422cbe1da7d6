//! Closed sets and units the config names that stages, the engine and the CLI share: export
//! formats and GGUF quant types, safetensors dtypes, shard sizes. Plain data: nothing here
//! knows how a format is written.

use serde::Serialize;

/// The GGUF file types kiln writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quant {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4KM,
}

impl Quant {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => Quant::F32,
            "f16" => Quant::F16,
            "q8_0" => Quant::Q8_0,
            "q4_0" => Quant::Q4_0,
            "q4_k_m" => Quant::Q4KM,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::Q8_0 => "q8_0",
            Quant::Q4_0 => "q4_0",
            Quant::Q4KM => "q4_k_m",
        }
    }

    pub const NAMES: &'static [&'static str] = &["f32", "f16", "q8_0", "q4_0", "q4_k_m"];
}

/// The dtype of an HF safetensors export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SafetensorsDtype {
    F32,
    F16,
    Bf16,
}

impl SafetensorsDtype {
    pub fn as_str(&self) -> &'static str {
        match self {
            SafetensorsDtype::F32 => "f32",
            SafetensorsDtype::F16 => "f16",
            SafetensorsDtype::Bf16 => "bf16",
        }
    }
}

/// One `export:` entry: a GGUF in a quant type, or an HF safetensors directory in a dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportFormat {
    Gguf(Quant),
    Safetensors(SafetensorsDtype),
}

impl ExportFormat {
    pub fn parse(format: &str, quant: Option<&str>) -> Result<Self, String> {
        match format {
            "gguf" => {
                let q = quant.unwrap_or("q8_0");
                Quant::parse(q).map(ExportFormat::Gguf).ok_or_else(|| {
                    format!(
                        "unknown GGUF quant `{q}`; kiln writes {}",
                        Quant::NAMES.join(", ")
                    )
                })
            }
            "safetensors" => match quant.unwrap_or("f32") {
                "f32" => Ok(ExportFormat::Safetensors(SafetensorsDtype::F32)),
                "f16" => Ok(ExportFormat::Safetensors(SafetensorsDtype::F16)),
                "bf16" => Ok(ExportFormat::Safetensors(SafetensorsDtype::Bf16)),
                q => Err(format!(
                    "safetensors export takes a dtype (f32, f16, bf16), not `{q}`"
                )),
            },
            f => Err(format!(
                "unknown export format `{f}`; use gguf or safetensors"
            )),
        }
    }

    /// The stage name suffix: `gguf.q8_0`, `safetensors.f16`.
    pub fn label(&self) -> String {
        match self {
            ExportFormat::Gguf(q) => format!("gguf.{}", q.as_str()),
            ExportFormat::Safetensors(d) => format!("safetensors.{}", d.as_str()),
        }
    }
}

/// Keys and records show a format by its label (`gguf.q8_0`).
impl Serialize for ExportFormat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.label())
    }
}

/// HF's default `max_shard_size`.
pub const DEFAULT_MAX_SHARD: u64 = 5_000_000_000;

/// Parses a size like `5GB`, `500MB`, `2GiB` or a plain byte count (HF's `max_shard_size`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mul: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (n >= 0.0).then_some((n * mul) as u64)
}
