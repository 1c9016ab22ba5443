//! `export/adapter/`: the PEFT adapter exactly as the train stage wrote it
//! (`adapter_config.json` + `adapter_model.safetensors`, docs/model-math.md §5), plus the
//! model card and provenance. Loadable with `PeftModel.from_pretrained(base, dir)`.
//!
//! Reference: PEFT `utils/save_and_load.py` (file names and tensor keys) and the
//! Hub model-card convention (`base_model` and `library_name: peft` in the YAML header).

use anyhow::{bail, Context, Result};
use std::path::Path;

/// The files of a PEFT adapter folder.
pub const FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Copy the train stage's adapter folder `src` into `out` (the card is added by the caller).
pub fn write(src: &Path, out: &Path) -> Result<()> {
    for f in FILES {
        let from = src.join(f);
        if !from.is_file() {
            bail!("{} is missing; the train stage did not finish writing the adapter", from.display());
        }
        std::fs::copy(&from, out.join(f)).with_context(|| format!("cannot copy {}", from.display()))?;
    }
    Ok(())
}
