//! `tuner score`: per-row and mean negative log-likelihood of a JSONL dataset
//! under a model (HF folder, bnb-4bit folder, `.gguf` file, or a run's export),
//! optionally with a PEFT adapter. Semantics: a `{"text": s}` row is encoded as
//! `encode(s, add_special_tokens=true)`; a `{"messages": [...]}` row is rendered
//! through the model's chat template and encoded without extra special tokens
//! (as transformers' `apply_chat_template(tokenize=True)` does). Each token i ≥ 1
//! is predicted from the tokens before it.

use crate::data::template::{Message, Renderer};
use crate::data::tokenizer::Tok;
use crate::model::{self, CausalLm};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// One row's result.
#[derive(Debug, Clone, Serialize)]
pub struct RowScore {
    /// Predicted tokens (the row's length − 1).
    pub tokens: i64,
    /// Mean NLL over the row's predicted tokens.
    pub loss: f64,
}

/// The whole result, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub rows: usize,
    pub tokens: i64,
    pub mean_loss: f64,
    pub perplexity: f64,
    pub per_row: Vec<RowScore>,
}

/// Token ids of each row of a JSONL file.
pub fn encode_rows(data: &Path, tok: &Tok) -> Result<Vec<Vec<i64>>> {
    let text = std::fs::read_to_string(data).with_context(|| format!("cannot read {}", data.display()))?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = format!("{}:{}", data.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{at}: invalid JSON"))?;
        let ids = if let Some(s) = v.get("text").and_then(|t| t.as_str()) {
            tok.encode(s, true).map_err(|e| anyhow::anyhow!("{at}: {e}"))?
        } else if let Some(msgs) = v.get("messages").and_then(|m| m.as_array()) {
            let tpl = tok.chat_template.as_deref().with_context(|| {
                format!("{at}: a messages row needs a chat template in the model's tokenizer_config.json")
            })?;
            let msgs: Vec<Message> = msgs
                .iter()
                .map(|m| Message {
                    role: m["role"].as_str().unwrap_or("").to_string(),
                    content: m["content"].as_str().unwrap_or("").to_string(),
                })
                .collect();
            let rendered = Renderer::apply_chat_template(tpl, &msgs, false, &tok.bos_token, &tok.eos_token)
                .map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
            tok.encode(&rendered, false).map_err(|e| anyhow::anyhow!("{at}: {e}"))?
        } else {
            bail!("{at}: expected {{\"text\": …}} or {{\"messages\": […]}}");
        };
        out.push(ids.into_iter().map(|x| x as i64).collect());
    }
    Ok(out)
}

/// Score rows one at a time (no padding), in f64 accumulation.
pub fn score_rows(model: &dyn CausalLm, rows: &[Vec<i64>], device: Device) -> Score {
    let _g = tch::no_grad_guard();
    let mut per_row = vec![];
    let (mut total, mut n) = (0.0f64, 0i64);
    for ids in rows {
        if ids.len() < 2 {
            per_row.push(RowScore { tokens: 0, loss: 0.0 });
            continue;
        }
        let input = Tensor::from_slice(ids).unsqueeze(0).to_device(device);
        let logits = model.forward(&model::Batch::new(input.shallow_clone(), None)).squeeze_dim(0).to_kind(Kind::Float);
        let t = ids.len() as i64;
        let nll = logits
            .narrow(0, 0, t - 1)
            .cross_entropy_loss::<Tensor>(
                &input.squeeze_dim(0).narrow(0, 1, t - 1),
                None,
                tch::Reduction::Sum,
                -100,
                0.0,
            )
            .to_kind(Kind::Double)
            .double_value(&[]);
        total += nll;
        n += t - 1;
        per_row.push(RowScore { tokens: t - 1, loss: nll / (t - 1) as f64 });
    }
    let mean = if n > 0 { total / n as f64 } else { 0.0 };
    Score { rows: rows.len(), tokens: n, mean_loss: mean, perplexity: mean.exp(), per_row }
}

/// Load the model (`cache`: where a `.gguf` is imported), score the rows of `data`, return the result.
pub fn run(model: &crate::model::open::ModelArgs, data: &Path, cache: &Path) -> Result<Score> {
    let resolved = crate::model::open::resolve_dir(&model.model, cache)?;
    let rows = encode_rows(data, &Tok::load(&resolved)?)?;
    let m = model.open(cache)?;
    Ok(score_rows(m.model.as_ref(), &rows, m.device))
}
