//! `export/nf4/`: the merged model re-quantized to NF4 in the layout transformers +
//! bitsandbytes save and load (a pre-quantized "bnb-4bit" checkpoint).
//!
//! Every decoder linear (`model.layers.N.*.X_proj.weight`) becomes NF4 with blocks of
//! 64 and double quantization ([`QuantTensor::quantize`], byte-identical to
//! bitsandbytes' `quantize_4bit`; saved with [`QuantTensor::to_bnb`], docs/model-math.md §4.2);
//! its quant_state says `dtype: bfloat16`. Embeddings, norms, biases and lm_head are
//! stored in bf16, unquantized, as transformers leaves them. `config.json` gains the
//! `quantization_config` transformers writes for `BitsAndBytesConfig(load_in_4bit=True,
//! bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
//! bnb_4bit_compute_dtype=torch.bfloat16)` (docs/model-math.md §4.1).
//!
//! Reference: transformers `integrations/bitsandbytes.py` (which modules are quantized:
//! `nn.Linear` except lm_head), bitsandbytes `nn.Linear4bit._save_to_state_dict`.

use super::merged::{write_model_files, ShardWriter};
use crate::model::Weights;
use crate::quant::{QuantTensor, QuantType};
use crate::util;
use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use std::path::Path;
use tch::{Device, Kind};

/// NF4 block size (what transformers uses).
pub const BLOCKSIZE: i64 = 64;

/// Whether a checkpoint name is a decoder linear's weight (what transformers quantizes).
pub fn is_decoder_linear(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// `quantization_config` as transformers 5 writes it for NF4 + double quant, bf16 compute.
pub fn quantization_config() -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

/// Quantize the merged folder `merged_dir` into `out`; returns the number of linears quantized.
pub fn write_nf4(merged_dir: &Path, out: &Path, max_shard_bytes: u64) -> Result<usize> {
    let mut weights = Weights::open(merged_dir)?;
    weights.track("write nf4");
    let mut names = weights.names();
    names.sort_by_key(|n| super::merged::order_key(n));
    let mut writer = ShardWriter::new(out, max_shard_bytes);
    let mut quantized = 0;
    for name in &names {
        let t = weights.get(name)?;
        if is_decoder_linear(name) && t.dim() == 2 {
            let mut q = QuantTensor::quantize(&t, QuantType::Nf4, BLOCKSIZE, true)?;
            // Dequantized values are produced in the dtype the checkpoint declares.
            q.dtype = Kind::BFloat16;
            let prefix = name.strip_suffix(".weight").unwrap_or(name);
            for (n, part) in q.to_bnb(prefix) {
                writer.add(&n, part.to_device(Device::Cpu).contiguous())?;
            }
            quantized += 1;
        } else {
            let t = if t.is_floating_point() { t.to_kind(Kind::BFloat16) } else { t };
            writer.add(name, t.contiguous())?;
        }
    }
    writer.finish()?;
    weights.finish();
    let mut cfg: Value = util::read_json(&merged_dir.join("config.json"))?;
    let obj = cfg.as_object_mut().ok_or_else(|| anyhow!("{}/config.json is not an object", merged_dir.display()))?;
    obj.insert("torch_dtype".into(), json!("bfloat16"));
    obj.insert("dtype".into(), json!("bfloat16"));
    obj.insert("quantization_config".into(), quantization_config());
    util::write_json_atomic(&out.join("config.json"), &cfg)?;
    write_model_files(merged_dir, out, &cfg)?;
    Ok(quantized)
}
