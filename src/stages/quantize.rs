//! `quantize`: packs the base model's block linear weights in the storage training asks for
//! (`adapter: qlora` + `load_in_4bit`'s NF4, `load_in_8bit`'s int8, a 16-bit base; a GGUF's
//! quantized blocks are kept), once: its key is the model entry's digest and the format, so the
//! train stages of a sweep that differ only in LoRA or optimizer settings read one entry.
//! Reads: every file of `fetch.model`. Writes `model.packed.safetensors` (see model/load.rs) and
//! `config.json`.

use super::{write_json, RunCx, Stage, StageError, StageKind};
use crate::config::precision::BaseWeights;
use crate::events::Event;
use crate::model::load::{save_packed, PACKED_FILE};

/// Everything the quantize stage reads, and so its key (with the model entry's digest).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Quantize {
    pub base_weights: BaseWeights,
}

impl Stage for Quantize {
    const KIND: StageKind = StageKind::Quantize;
    const VERSION: u32 = 1;
    const USES_ALL_CORES: bool = true;
    type Neutral = ();

    fn run(&self, _: &(), cx: &mut RunCx<'_>) -> Result<(), StageError> {
        let [model_up] = cx.upstream else {
            return Err(StageError::Invalid(
                "quantize needs the model upstream".into(),
            ));
        };
        let (model, stored) = super::train::load_model_as(&model_up.dir, self.base_weights)?;
        save_packed(&model, &cx.out.join(PACKED_FILE))?;
        write_json(&cx.out.join("config.json"), &model.cfg.to_hf())?;
        if let Some(message) = stored {
            (cx.emit)(Event::Note {
                message: format!("{}: {message}", cx.name),
            });
        }
        Ok(())
    }
}
