//! `export/adapter/`: the PEFT adapter exactly as the train stage wrote it
//! (`adapter_config.json` + `adapter_model.safetensors`, arch-spec §5), plus the
//! model card and provenance. Loadable with `PeftModel.from_pretrained(base, dir)`.
//!
//! Reference: PEFT `utils/save_and_load.py` (file names and tensor keys) and the
//! Hub model-card convention (`base_model` and `library_name: peft` in the YAML header).

use super::{card, Staging};
use crate::pipeline::RunContext;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The files of a PEFT adapter folder.
pub const FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Write `<export>/adapter/` from the train stage's adapter folder `src`; returns the folder.
pub fn export(ctx: &RunContext, src: &Path, export_dir: &Path, prov: &card::Provenance) -> Result<PathBuf> {
    let stage = Staging::new(export_dir, "adapter")?;
    for f in FILES {
        let from = src.join(f);
        if !from.is_file() {
            bail!("{} is missing; the train stage did not finish writing the adapter", from.display());
        }
        std::fs::copy(&from, stage.path().join(f)).with_context(|| format!("cannot copy {}", from.display()))?;
    }
    let model_rec = crate::stages::fetch::model_record(ctx)?;
    let readme = card::readme(ctx, card::Format::Adapter, &model_rec, None);
    card::finish(stage.path(), card::Format::Adapter, prov, &readme)?;
    stage.commit()
}
