//! The trained prompt format as a Jinja chat template, written into an exported folder's
//! `tokenizer_config.json` so that chat front ends (transformers' `apply_chat_template`,
//! `tuner generate --chat`, `/v1/chat/completions`, vLLM, llama.cpp through the GGUF's
//! `tokenizer.chat_template`) prompt the model the way it was trained.
//!
//! - `"alpaca"`: each user message becomes the Alpaca prompt without input (the content in the
//!   instruction slot, ending `### Response:\n`), each assistant message its content plus the
//!   EOS token when `prompt.add_eos`; a system message is written first, followed by a blank line.
//! - an inline format string: the text before `{output}`, with the user's content in the
//!   `{instruction}` slot (else the first slot), the input slot and any other slot empty; the
//!   assistant's content is followed by the text after `{output}` and the EOS token.
//! - `"chatml"`: ChatML turns, the recipe's `prompt.system` first when the conversation has
//!   no system message, as data/template.rs renders them.
//! - `"chat"`: the base model's own template is kept.
//!
//! The text matches data/template.rs's `Renderer` byte for byte for the same row (tested
//! against transformers in tests/export.rs). Literal text is written as Jinja string literals
//! inside `{{ }}` with no text between tags, so transformers' `trim_blocks`/`lstrip_blocks`
//! and minijinja's defaults render it alike.
//!
//! References: transformers' chat templating docs (`messages`, `add_generation_prompt`,
//! `bos_token`/`eos_token`; `chat_template.jinja` is read in preference to
//! `tokenizer_config.json`'s `chat_template`, so a stale one is removed).

use crate::data::template::ALPACA_NO_INPUT;
use crate::recipe::{parse_format, Piece, PromptSection, PromptTemplate};
use crate::util;
use anyhow::{anyhow, Result};
use serde_json::Value;
use std::path::Path;

/// A Jinja expression printing `s` literally.
fn lit(s: &str) -> String {
    if s.is_empty() {
        return String::new();
    }
    format!("{{{{ {} }}}}", serde_json::Value::String(s.to_string()))
}

/// The loop over messages for a single-exchange prompt: `head` + user content + `tail`, then
/// the assistant's content + `after`.
fn exchange_template(head: &str, tail: &str, after: &str, add_eos: bool) -> String {
    let eos = if add_eos { "{{ eos_token }}" } else { "" };
    format!(
        "{{%- for message in messages -%}}\
         {{%- if message['role'] == 'system' -%}}{{{{ message['content'] }}}}{nl}\
         {{%- elif message['role'] == 'user' -%}}{head}{{{{ message['content'] }}}}{tail}\
         {{%- elif message['role'] == 'assistant' -%}}{{{{ message['content'] }}}}{after}{eos}\
         {{%- endif -%}}{{%- endfor -%}}",
        nl = lit("\n\n"),
        head = lit(head),
        tail = lit(tail),
        after = lit(after),
    )
}

/// The Jinja chat template that renders `p`'s format, or `None` for `"chat"` (the base's own).
pub fn for_prompt(p: &PromptSection) -> Option<String> {
    match &p.template {
        PromptTemplate::Chat => None,
        PromptTemplate::ChatMl => {
            let system = if p.system.is_empty() {
                String::new()
            } else {
                format!(
                    "{{%- if messages[0]['role'] != 'system' -%}}{}{{%- endif -%}}",
                    lit(&format!("<|im_start|>system\n{}<|im_end|>\n", p.system))
                )
            };
            Some(format!(
                "{system}{{%- for message in messages -%}}{}{{{{ message['role'] }}}}{}{{{{ message['content'] }}}}{}\
                 {{%- endfor -%}}{{%- if add_generation_prompt -%}}{}{{%- endif -%}}",
                lit("<|im_start|>"),
                lit("\n"),
                lit("<|im_end|>\n"),
                lit("<|im_start|>assistant\n"),
            ))
        }
        PromptTemplate::Alpaca => {
            let (head, tail) = ALPACA_NO_INPUT.split_once("{instruction}").expect("the Alpaca prompt has the slot");
            Some(exchange_template(head, tail, "", p.add_eos))
        }
        PromptTemplate::Inline(text) => {
            let pieces = parse_format(text).ok()?;
            let fields = || pieces.iter().filter_map(|x| if let Piece::Field(f) = x { Some(f) } else { None });
            let slot = fields()
                .find(|f| **f == p.instruction_field)
                .or_else(|| fields().find(|f| **f != p.output_field))
                .cloned();
            let (mut head, mut tail, mut after) = (String::new(), String::new(), String::new());
            let (mut seen_slot, mut seen_output) = (false, false);
            for piece in &pieces {
                let into = if seen_output {
                    &mut after
                } else if seen_slot {
                    &mut tail
                } else {
                    &mut head
                };
                match piece {
                    Piece::Text(t) => into.push_str(t),
                    Piece::Field(f) if *f == p.output_field => seen_output = true,
                    Piece::Field(f) if Some(f) == slot.as_ref() && !seen_slot => seen_slot = true,
                    Piece::Field(_) => {}
                }
            }
            Some(exchange_template(&head, &tail, &after, p.add_eos))
        }
    }
}

/// Set the chat template of the HF folder `dir` to `p`'s format (nothing for `"chat"`):
/// `tokenizer_config.json`'s `chat_template`, with `chat_template.jinja`/`.json` removed.
pub fn write(dir: &Path, p: &PromptSection) -> Result<()> {
    let Some(tpl) = for_prompt(p) else { return Ok(()) };
    let path = dir.join("tokenizer_config.json");
    let mut tc: Value = if path.is_file() { util::read_json(&path)? } else { Value::Object(Default::default()) };
    let obj = tc.as_object_mut().ok_or_else(|| anyhow!("{} is not a JSON object", path.display()))?;
    obj.insert("chat_template".into(), Value::String(tpl));
    util::write_json_atomic(&path, &tc)?;
    for stale in ["chat_template.jinja", "chat_template.json"] {
        let f = dir.join(stale);
        if f.is_file() {
            std::fs::remove_file(&f).map_err(|e| anyhow!("cannot remove {}: {e}", f.display()))?;
        }
    }
    Ok(())
}
