//! The GGUF architectures tuner writes and reads, and how each one's llama.cpp layout differs
//! from the Hugging Face checkpoint. Which model family maps to which architecture is said once,
//! in the family registry (`model/family.rs`, its `gguf` field); this file says what an
//! architecture means.
//!
//! It also holds llama.cpp's Q/K row permutation for the `llama` architecture and its inverse.
//!
//! Reference: llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`, the Gemma classes'
//! `norm_shift` / `data_torch + 1`) and gguf-py's `constants.py` (`MODEL_ARCH_NAMES`).

use anyhow::{bail, Context, Result};

/// A llama.cpp model architecture (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufArch {
    /// `llama` (also Mistral).
    Llama,
    /// `qwen2`.
    Qwen2,
    /// `qwen3`.
    Qwen3,
    /// `phi3`: fused `attn_qkv` and `ffn_up` (gate and up stacked).
    Phi3,
    /// `gemma2`: four norms per layer, RMSNorm weights stored as `1 + w`.
    Gemma2,
    /// `gemma3`: Gemma 2's layout plus q/k norms.
    Gemma3,
    /// `gemma3n`: Gemma 3's layout plus AltUp, LAuReL and per-layer inputs; norms stored as is.
    Gemma3n,
}

impl GgufArch {
    /// Every architecture, for lookups by name.
    pub const ALL: [GgufArch; 7] = [
        GgufArch::Llama,
        GgufArch::Qwen2,
        GgufArch::Qwen3,
        GgufArch::Phi3,
        GgufArch::Gemma2,
        GgufArch::Gemma3,
        GgufArch::Gemma3n,
    ];

    /// The `general.architecture` value, which also prefixes the architecture's metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2 => "qwen2",
            GgufArch::Qwen3 => "qwen3",
            GgufArch::Phi3 => "phi3",
            GgufArch::Gemma2 => "gemma2",
            GgufArch::Gemma3 => "gemma3",
            GgufArch::Gemma3n => "gemma3n",
        }
    }

    /// The architecture called `name`, if tuner knows it.
    pub fn from_name(name: &str) -> Option<GgufArch> {
        GgufArch::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Whether the rows of Q and K are permuted into llama.cpp's interleaved rotary layout
    /// (`LlamaModel.permute`); the other architectures use the NeoX (half-split) rotation as HF.
    pub fn permute_qk(self) -> bool {
        self == GgufArch::Llama
    }

    /// Whether a layer has Gemma's four norms: `post_attention_layernorm` then normalises the
    /// attention output (`post_attention_norm`) and `pre_feedforward_layernorm` is the FFN's input
    /// norm (`ffn_norm`). Elsewhere `post_attention_layernorm` is the FFN's input norm.
    pub fn sandwich_norms(self) -> bool {
        matches!(self, GgufArch::Gemma2 | GgufArch::Gemma3 | GgufArch::Gemma3n)
    }

    /// What the converter adds to every `*norm.weight`: Gemma 2 and 3 scale by `1 + w` where
    /// llama.cpp scales by `w`, so the file stores `w + 1`; Gemma 3n's norms scale by `w`.
    pub fn norm_shift(self) -> f32 {
        match self {
            GgufArch::Gemma2 | GgufArch::Gemma3 => 1.0,
            _ => 0.0,
        }
    }
}

/// Permute the rows of a row-major `[rows, cols]` matrix (or a bias, `cols = 1`) the way
/// llama.cpp's converter does for Q and K: within each head, HF row `j·half + i` becomes
/// GGUF row `2i + j`.
pub fn permute_rows(w: &[f32], rows: usize, n_head: usize) -> Result<Vec<f32>> {
    move_rows(w, rows, n_head, false).with_context(|| format!("cannot permute {} values", w.len()))
}

/// Undo llama.cpp's Q/K row permutation of a row-major `[rows, cols]` matrix (or a
/// bias, with `cols = 1`): the numpy expression
/// `w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
///
/// Within each head, GGUF row `2 i + j` becomes HF row `j * half + i`.
pub fn unpermute_rows(w: &[f32], rows: usize, n_head: usize) -> Result<Vec<f32>> {
    move_rows(w, rows, n_head, true).with_context(|| format!("cannot un-permute {} values", w.len()))
}

/// The row move of [`permute_rows`] (HF row `j·half + i` → row `2i + j` within each head), or
/// its inverse.
fn move_rows(w: &[f32], rows: usize, n_head: usize, inverse: bool) -> Result<Vec<f32>> {
    if rows == 0 || n_head == 0 || !rows.is_multiple_of(2 * n_head) || !w.len().is_multiple_of(rows) {
        bail!("{rows} rows do not split into 2 halves of {n_head} heads");
    }
    let cols = w.len() / rows;
    let per_head = rows / n_head;
    let half = per_head / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let (hf, gguf) = (h * per_head + j * half + i, h * per_head + 2 * i + j);
                let (src, dst) = if inverse { (gguf, hf) } else { (hf, gguf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

impl std::fmt::Display for GgufArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
