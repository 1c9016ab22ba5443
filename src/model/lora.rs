//! LoRA adapters on a loaded model: target matching, PEFT initialisation, PEFT tensor
//! names, loading saved adapters.
//!
//! Reference: PEFT `tuners/lora/layer.py` (`update_layer`, `reset_lora_parameters`:
//! A ~ kaiming_uniform(a=√5) = U(−1/√in, 1/√in), B = 0; scaling alpha/r or alpha/√r),
//! `tuners/tuners_utils.py::check_target_module_exists` (a list entry matches a module
//! path equal to it or ending in `.entry`; a string is `re.fullmatch`ed), and
//! `utils/save_and_load.py` (keys `base_model.model.<path>.lora_{A,B}.weight`), docs/model-math.md §5.
//!
//! A is drawn from a SplitMix64 stream seeded with `seed` (not libtorch's global generator),
//! so the same seed gives the same adapters on any device and under concurrent use.

use std::collections::{BTreeSet, HashMap};

use anyhow::{bail, Context, Result};
use regex::Regex;
use tch::{Kind, Tensor};

use super::linear::Lora;
use super::CausalLm;

/// Which linears get an adapter.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Module names such as `q_proj` (or `self_attn.q_proj`): a path matches when it equals
    /// one or ends with `.` + one.
    Names(Vec<String>),
    /// Every decoder linear; never lm_head.
    AllLinear,
    /// A regex that must match the full module path (`re.fullmatch`).
    Regex(String),
}

/// Adapter hyper-parameters.
#[derive(Debug, Clone)]
pub struct LoraSpec {
    /// Rank r.
    pub r: i64,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Dropout on the adapter input during training.
    pub dropout: f64,
    /// rsLoRA: scale alpha/√r instead of alpha/r.
    pub use_rslora: bool,
    /// Target modules.
    pub targets: Targets,
}

impl LoraSpec {
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// Attach adapters, PEFT init: A ~ U(−1/√in, 1/√in) drawn from a generator seeded with `seed`
/// (same seed → same A; layers in module-path order), B = 0. Returns the adapted module paths in order.
pub fn attach(model: &mut dyn CausalLm, spec: &LoraSpec, seed: i64) -> Result<Vec<String>> {
    if spec.r <= 0 {
        bail!("lora rank must be > 0 (found `{}`)", spec.r);
    }
    if !(0.0..1.0).contains(&spec.dropout) {
        bail!("lora dropout must be in [0, 1) (found `{}`)", spec.dropout);
    }
    let matches = matcher(&spec.targets)?;
    let paths: Vec<String> = model.linears().into_iter().map(|(p, _)| p).collect();
    let chosen: Vec<&String> = paths.iter().filter(|p| matches(p)).collect();
    if chosen.is_empty() {
        let leaves: BTreeSet<&str> = paths.iter().filter_map(|p| p.rsplit('.').next()).collect();
        let leaves: Vec<&str> = leaves.into_iter().collect();
        bail!(
            "lora.target_modules matched no module; linears are: {} (paths like `{}`)",
            leaves.join(", "),
            paths.first().map(String::as_str).unwrap_or("")
        );
    }
    let mut rng = crate::data::SplitMix64(seed as u64);
    let scale = spec.scale();
    let mut names = Vec::new();
    for (path, linear) in model.linears_mut() {
        if !matches(&path) {
            continue;
        }
        if linear.lora.is_some() {
            bail!("`{path}` already has a LoRA adapter");
        }
        let (out_f, in_f) = (linear.out_features(), linear.in_features());
        let bound = 1.0 / (in_f as f64).sqrt();
        let values: Vec<f32> = (0..spec.r * in_f).map(|_| ((rng.unit() * 2.0 - 1.0) * bound) as f32).collect();
        let device = linear.device();
        let a = Tensor::from_slice(&values).view([spec.r, in_f]).to_device(device).set_requires_grad(true);
        let b = Tensor::zeros([out_f, spec.r], (Kind::Float, device)).set_requires_grad(true);
        linear.lora = Some(Lora::new(a, b, scale, spec.dropout));
        names.push(path);
    }
    Ok(names)
}

/// (PEFT key, tensor) for every adapter, in module order: `base_model.model.<path>.lora_A.weight`
/// `[r, in]` and `….lora_B.weight` `[out, r]` (detached, sharing storage with the adapter).
pub fn adapter_tensors(model: &dyn CausalLm) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (path, linear) in model.linears() {
        if let Some(lora) = &linear.lora {
            out.push((format!("base_model.model.{path}.lora_A.weight"), lora.a.detach()));
            out.push((format!("base_model.model.{path}.lora_B.weight"), lora.b.detach()));
        }
    }
    out
}

/// Copy adapter tensors (PEFT keys) into an attached model; every missing, mis-shaped or
/// unexpected key is named in one error.
pub fn load_adapter_tensors(model: &mut dyn CausalLm, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut given: HashMap<&str, &Tensor> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut problems = Vec::new();
    let mut attached = 0;
    for (path, linear) in model.linears_mut() {
        let Some(lora) = linear.lora.as_mut() else { continue };
        attached += 1;
        for (key, dst) in [("lora_A", &mut lora.a), ("lora_B", &mut lora.b)] {
            let key = format!("base_model.model.{path}.{key}.weight");
            match given.remove(key.as_str()) {
                None => problems.push(format!("missing `{key}`")),
                Some(src) if src.size() != dst.size() => {
                    problems.push(format!("`{key}` has shape {:?}, expected {:?}", src.size(), dst.size()))
                }
                Some(src) => tch::no_grad(|| dst.copy_(src)),
            }
        }
    }
    if attached == 0 {
        bail!("the model has no LoRA adapters to load into (attach them first)");
    }
    let mut extra: Vec<&str> = given.into_keys().collect();
    extra.sort();
    problems.extend(extra.iter().map(|k| format!("unexpected `{k}` (no such adapter)")));
    if !problems.is_empty() {
        bail!("adapter tensors do not fit the model ({} problems): {}", problems.len(), problems.join("; "));
    }
    Ok(())
}

/// Every adapter's A and B, in module order (shallow clones: gradients are shared).
pub fn trainable_parameters(model: &dyn CausalLm) -> Vec<Tensor> {
    let mut out = Vec::new();
    for (_, linear) in model.linears() {
        if let Some(lora) = &linear.lora {
            out.push(lora.a.shallow_clone());
            out.push(lora.b.shallow_clone());
        }
    }
    out
}

/// Every adapter's compute form `(scale·A, B)` in `kind` ([`Lora::compute_form`]) made once and
/// held by the adapters ([`Lora::cast`]) until this is dropped: for the passes of one optimizer
/// step, during which A and B do not change. Nothing is held when `kind` is the adapters' own
/// dtype. Dropping it lets every adapter go back to making its form per use, so no later forward
/// (an evaluation, a generation) can read a form the optimizer has since made stale.
pub struct CastAdapters<'m> {
    model: &'m dyn CausalLm,
}

/// Hold every adapter's compute form in `kind` ([`CastAdapters`]).
pub fn cast_adapters(model: &dyn CausalLm, kind: Kind) -> CastAdapters<'_> {
    for (_, linear) in model.linears() {
        if let Some(lora) = &linear.lora {
            if lora.a.kind() != kind || lora.b.kind() != kind {
                *lora.cast.lock().unwrap_or_else(|e| e.into_inner()) = Some(lora.compute_form(kind));
            }
        }
    }
    CastAdapters { model }
}

impl Drop for CastAdapters<'_> {
    fn drop(&mut self) {
        for (_, linear) in self.model.linears() {
            if let Some(lora) = &linear.lora {
                *lora.cast.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
    }
}

/// A predicate on module paths.
type Matcher = Box<dyn Fn(&str) -> bool>;

/// The target predicate for a module path.
fn matcher(targets: &Targets) -> Result<Matcher> {
    Ok(match targets {
        Targets::AllLinear => Box::new(|_| true),
        Targets::Names(names) => {
            let names = names.clone();
            Box::new(move |p: &str| names.iter().any(|n| p == n || p.ends_with(&format!(".{n}"))))
        }
        Targets::Regex(re) => {
            let re = Regex::new(&format!("^(?:{re})$"))
                .with_context(|| format!("invalid lora.target_modules regex `{re}`"))?;
            Box::new(move |p: &str| re.is_match(p))
        }
    })
}
