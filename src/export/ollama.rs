//! The Ollama `Modelfile` written next to the GGUF files.
//!
//! `FROM ./model-q8_0.gguf`, a Go-template `TEMPLATE` that renders prompts the way the
//! model was trained, `PARAMETER stop` for the end-of-turn markers, and `SYSTEM` when the
//! recipe has a system prompt. The template follows the recipe's `[prompt] template`:
//! - `"chatml"`, or `"chat"` with a ChatML chat template: ChatML turns;
//! - `"chat"` with a Llama-3 chat template: Llama-3 header/eot turns;
//! - `"chat"` with any other chat template: ChatML (stated in a comment in the file);
//! - `"alpaca"`: the Alpaca instruction prompt;
//! - an inline format string: its text before `{output}`, with the first field slot as
//!   the user's prompt (other slots dropped).
//!
//! Reference: Ollama's Modelfile documentation (`FROM`, `TEMPLATE` with `.Messages`,
//! `.Role`, `.Content`, `.System`, `.Prompt`, `.Response`, `PARAMETER stop`, `SYSTEM`).

use crate::data::tokenizer::Tok;
use crate::recipe::{parse_format, Piece, PromptSection, PromptTemplate};

const CHATML: &str =
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n";
const LLAMA3: &str = "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n";
const ALPACA: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}";

/// Text safe inside a Go template (a literal `{{` is written as an action printing it).
fn go_literal(s: &str) -> String {
    s.replace("{{", "{{ \"{{\" }}")
}

/// (template, stop strings, note) for a recipe's prompt format.
fn template_for(prompt: &PromptSection, tok: &Tok) -> (String, Vec<String>, Option<String>) {
    let chatml_stops = vec!["<|im_start|>".to_string(), "<|im_end|>".to_string()];
    match &prompt.template {
        PromptTemplate::ChatMl => (CHATML.into(), chatml_stops, None),
        PromptTemplate::Chat => {
            let t = tok.chat_template.as_deref().unwrap_or("");
            if t.contains("<|start_header_id|>") {
                let stops = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"].map(String::from).to_vec();
                (LLAMA3.into(), stops, None)
            } else if t.contains("<|im_start|>") {
                (CHATML.into(), chatml_stops, None)
            } else {
                let note = "the model's chat template is neither ChatML nor Llama 3; ChatML is used here, check it against tokenizer_config.json";
                (CHATML.into(), chatml_stops, Some(note.into()))
            }
        }
        PromptTemplate::Alpaca => (ALPACA.into(), vec![], None),
        PromptTemplate::Inline(inline) => {
            let pieces = parse_format(inline).unwrap_or_default();
            let mut out = String::new();
            let mut prompt_used = false;
            let mut dropped = vec![];
            for p in &pieces {
                match p {
                    Piece::Field(f) if *f == prompt.output_field => break,
                    Piece::Field(_) if !prompt_used => {
                        out.push_str("{{ .Prompt }}");
                        prompt_used = true;
                    }
                    Piece::Field(f) => dropped.push(f.clone()),
                    Piece::Text(t) => out.push_str(&go_literal(t)),
                }
            }
            out.push_str("{{ .Response }}");
            let note = (!dropped.is_empty()).then(|| {
                format!("the fields {dropped:?} of the training format have no Ollama counterpart and are left out")
            });
            (out, vec![], note)
        }
    }
}

/// The Modelfile text for `gguf_file` (a name in the same folder).
pub fn modelfile(gguf_file: &str, prompt: &PromptSection, tok: &Tok) -> String {
    let (template, mut stops, note) = template_for(prompt, tok);
    if !tok.eos_token.is_empty() && !stops.contains(&tok.eos_token) {
        stops.push(tok.eos_token.clone());
    }
    let mut s =
        String::from("# Ollama Modelfile written by tuner. In this folder: ollama create <name> -f Modelfile\n");
    s.push_str(&format!("# Prompt format: [prompt] template = {:?}\n", prompt.template.as_str()));
    if let Some(n) = note {
        s.push_str(&format!("# Note: {n}\n"));
    }
    s.push_str(&format!("FROM ./{gguf_file}\n"));
    s.push_str(&format!("TEMPLATE \"\"\"{template}\"\"\"\n"));
    if !prompt.system.is_empty() && prompt.template != PromptTemplate::Alpaca {
        s.push_str(&format!("SYSTEM \"\"\"{}\"\"\"\n", prompt.system));
    }
    for stop in stops {
        s.push_str(&format!("PARAMETER stop {}\n", serde_json::Value::String(stop)));
    }
    s
}
