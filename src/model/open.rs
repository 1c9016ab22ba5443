//! Opening a model, the one place that does it: the compute dtype for a device, an HF folder
//! for a model path (a `.gguf` file is imported once into a cache folder), the base model as a
//! recipe loads it (quantized at load when `[quantization]` says so), the pad id batches use,
//! and PEFT adapters read and written (adapter_config.json + adapter_model.safetensors).
//!
//! References: PEFT `LoraConfig` / `save_pretrained` (the adapter format), transformers'
//! `from_pretrained` dtype handling, and src/gguf/import.rs for `.gguf` models.

use super::{lora, CausalLm};
use crate::recipe::{Dtype, QuantMethod, Recipe, TargetModules};
use crate::util;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The compute dtype for `model.dtype` on `device`: "auto" is bf16 on CUDA, fp32 on CPU.
pub fn compute_kind(d: Dtype, device: Device) -> Kind {
    match d {
        Dtype::Auto if device.is_cuda() => Kind::BFloat16,
        Dtype::Auto | Dtype::Fp32 => Kind::Float,
        Dtype::Bf16 => Kind::BFloat16,
        Dtype::Fp16 => Kind::Half,
    }
}

/// An HF folder for `path`: the folder itself, or a `.gguf` imported once into a cache folder.
pub fn resolve_dir(path: &Path, cache: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.extension().is_some_and(|e| e == "gguf") && path.is_file() {
        let sha = util::sha256_file(path)?;
        let dir = cache.join("gguf-import").join(&sha[..16]);
        if !dir.join("config.json").is_file() {
            crate::gguf::import::import_gguf(path, &dir)
                .with_context(|| format!("cannot import {}", path.display()))?;
        }
        return Ok(dir);
    }
    bail!("--model {}: expected an HF model folder or a .gguf file", path.display())
}

/// The model flags shared by `tuner score`, `generate` and `serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// An HF folder, a bnb-4bit folder, a .gguf file, or a run's export.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter folder to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA, fp32 on CPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: Dtype,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: crate::recipe::DeviceSpec,
}

/// A model opened from [`ModelArgs`]: its HF folder, the weights with the adapter applied, and
/// the device they are on.
pub struct Opened {
    pub dir: PathBuf,
    pub model: Box<dyn CausalLm>,
    pub device: Device,
}

impl ModelArgs {
    /// Resolve the folder (a `.gguf` imported once into `cache`), load the model in the
    /// compute dtype on the device, and apply the adapter.
    pub fn open(&self, cache: &Path) -> Result<Opened> {
        let dir = resolve_dir(&self.model, cache)?;
        let device = self.device.resolve();
        let opts =
            super::LoadOptions { dtype: compute_kind(self.dtype, device), device, quantize: None, cuda_kernels: true };
        let mut model = super::load(&dir, &opts)?;
        if let Some(a) = &self.adapter {
            apply_adapter(model.as_mut(), a).with_context(|| format!("cannot apply the adapter {}", a.display()))?;
        }
        Ok(Opened { dir, model, device })
    }
}

/// Load the base model as the recipe asks (quantized at load when `[quantization]` says so).
pub fn load_for_recipe(dir: &Path, r: &Recipe, device: Device) -> Result<Box<dyn CausalLm>> {
    let quantize = match r.quantization.method {
        QuantMethod::None => None,
        QuantMethod::Nf4 => {
            Some((crate::quant::QuantType::Nf4, r.quantization.block_size as i64, r.quantization.double_quant))
        }
        QuantMethod::Fp4 => {
            Some((crate::quant::QuantType::Fp4, r.quantization.block_size as i64, r.quantization.double_quant))
        }
    };
    super::load(
        dir,
        &super::LoadOptions {
            dtype: compute_kind(r.model.dtype, device),
            device,
            quantize,
            cuda_kernels: r.train.cuda_kernels,
        },
    )
}

/// The token id batches are padded with: the tokenizer's `<|endoftext|>`, else its EOS.
/// (Padding positions attend only to padding and are never trained, so any id works; this one
/// is fixed so that runs are reproducible.)
pub fn pad_id(tok: &crate::data::tokenizer::Tok) -> i64 {
    tok.tokenizer.token_to_id("<|endoftext|>").map(|x| x as i64).unwrap_or(tok.eos_id as i64)
}

/// Attach and load a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
pub fn apply_adapter(model: &mut dyn CausalLm, dir: &Path) -> Result<()> {
    let cfg: serde_json::Value = util::read_json(&dir.join("adapter_config.json"))?;
    let r = cfg["r"].as_i64().with_context(|| format!("{}/adapter_config.json: no `r`", dir.display()))?;
    let alpha = cfg["lora_alpha"].as_f64().unwrap_or(r as f64);
    let targets = match &cfg["target_modules"] {
        serde_json::Value::Array(a) => {
            lora::Targets::Names(a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        }
        serde_json::Value::String(s) if s == "all-linear" => lora::Targets::AllLinear,
        serde_json::Value::String(s) => lora::Targets::Regex(s.clone()),
        _ => bail!("{}/adapter_config.json: `target_modules` must be a list or a string", dir.display()),
    };
    let spec =
        lora::LoraSpec { r, alpha, dropout: 0.0, use_rslora: cfg["use_rslora"].as_bool().unwrap_or(false), targets };
    lora::attach(model, &spec, 0)?;
    let tensors = Tensor::read_safetensors(dir.join("adapter_model.safetensors"))
        .with_context(|| format!("cannot read {}/adapter_model.safetensors", dir.display()))?;
    lora::load_adapter_tensors(model, &tensors)
}

/// Write the final adapter in PEFT format: adapter_config.json + adapter_model.safetensors.
pub fn write_peft_adapter(out: &Path, model: &dyn CausalLm, r: &Recipe, base_name: &str) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)?;
    let tensors: Vec<(String, tch::Tensor)> =
        lora::adapter_tensors(model).into_iter().map(|(n, t)| (n, t.to_device(Device::Cpu).contiguous())).collect();
    let tmp = out.join(".adapter_model.safetensors.tmp");
    tch::Tensor::write_safetensors(&tensors, &tmp).context("cannot write the adapter")?;
    std::fs::rename(&tmp, out.join("adapter_model.safetensors"))?;
    let target_modules = match &r.lora.target_modules {
        TargetModules::List(v) => json!(v),
        TargetModules::Pattern(p) => json!(p),
    };
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "revision": null,
        "inference_mode": true,
        "r": r.lora.r,
        "lora_alpha": r.lora.alpha,
        "lora_dropout": r.lora.dropout,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": r.lora.use_rslora,
        "use_dora": false,
        "init_lora_weights": true,
        "target_modules": target_modules,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    util::write_json_atomic(&out.join("adapter_config.json"), &cfg)?;
    Ok(vec![out.join("adapter_config.json"), out.join("adapter_model.safetensors")])
}
