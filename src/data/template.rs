//! Prompt templates: a dataset row becomes text segments, each marked as
//! prompt (not trained when `train_on_responses_only`) or response (trained).
//!
//! Templates: "alpaca" (the Stanford Alpaca prompt), "chatml", "chat" (the
//! tokenizer's own Jinja chat template, rendered with minijinja the way
//! transformers' `apply_chat_template` renders it), or an inline format string
//! whose `{output}` slot starts the response.

use crate::recipe::{Piece, PromptSection, PromptTemplate};
use serde_json::{Map, Value};

/// A run of text and whether it is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    pub trained: bool,
}

const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
const ALPACA_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

enum Kind {
    Alpaca,
    ChatMl,
    Chat(String),
    Inline(Vec<Piece>),
}

/// Renders rows for one recipe's `[prompt]`.
pub struct Renderer {
    kind: Kind,
    p: PromptSection,
    bos_token: String,
    eos_token: String,
}

/// A chat message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

fn text_field(row: &Map<String, Value>, name: &str, required: bool) -> Result<String, String> {
    match row.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) if !required => Ok(String::new()),
        None | Some(Value::Null) => Err(format!("missing field `{name}`")),
        Some(Value::Number(n)) => Err(format!("field `{name}`: expected a string, found the number {n}")),
        Some(other) => Err(format!("field `{name}`: expected a string, found {}", json_type_name(other))),
    }
}

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl Renderer {
    /// Build a renderer; `chat_template` is the tokenizer's (needed for "chat").
    pub fn new(
        p: &PromptSection,
        chat_template: Option<&str>,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Renderer, String> {
        let kind = match &p.template {
            PromptTemplate::Alpaca => Kind::Alpaca,
            PromptTemplate::ChatMl => Kind::ChatMl,
            PromptTemplate::Chat => Kind::Chat(
                chat_template
                    .ok_or("prompt.template = \"chat\" needs a chat_template in the model's tokenizer_config.json; use \"chatml\" or \"alpaca\" instead")?
                    .to_string(),
            ),
            PromptTemplate::Inline(text) => Kind::Inline(crate::recipe::parse_format(text)?),
        };
        Ok(Renderer { kind, p: p.clone(), bos_token: bos_token.into(), eos_token: eos_token.into() })
    }

    /// Whether responses end with an end-of-turn marker written by the template itself.
    pub fn is_chat(&self) -> bool {
        matches!(self.kind, Kind::ChatMl | Kind::Chat(_))
    }

    /// The conversation of a row: its messages field, or instruction/input/output as one exchange.
    pub fn messages(&self, row: &Map<String, Value>) -> Result<Vec<Message>, String> {
        let mut out = vec![];
        if !self.p.system.is_empty() {
            out.push(Message { role: "system".into(), content: self.p.system.clone() });
        }
        if let Some(v) = row.get(&self.p.messages_field) {
            let Value::Array(items) = v else {
                return Err(format!(
                    "field `{}`: expected a list of {{role, content}} objects, found {}",
                    self.p.messages_field,
                    json_type_name(v)
                ));
            };
            for (i, m) in items.iter().enumerate() {
                let obj = m.as_object().ok_or_else(|| {
                    format!("field `{}[{i}]`: expected an object with role and content", self.p.messages_field)
                })?;
                let role =
                    text_field(obj, "role", true).map_err(|e| format!("`{}[{i}]`: {e}", self.p.messages_field))?;
                if !["system", "user", "assistant"].contains(&role.as_str()) {
                    return Err(format!(
                        "`{}[{i}]`: role must be system, user or assistant, found {role:?}",
                        self.p.messages_field
                    ));
                }
                let content =
                    text_field(obj, "content", true).map_err(|e| format!("`{}[{i}]`: {e}", self.p.messages_field))?;
                if role == "system" && !out.is_empty() && i == 0 {
                    out.clear();
                }
                out.push(Message { role, content });
            }
            if !out.iter().any(|m| m.role == "assistant") {
                return Err(format!("field `{}`: no assistant message to train on", self.p.messages_field));
            }
            return Ok(out);
        }
        let instruction = text_field(row, &self.p.instruction_field, true)?;
        let input = text_field(row, &self.p.input_field, false)?;
        let output = text_field(row, &self.p.output_field, true)?;
        let user = if input.is_empty() { instruction } else { format!("{instruction}\n\n{input}") };
        out.push(Message { role: "user".into(), content: user });
        out.push(Message { role: "assistant".into(), content: output });
        Ok(out)
    }

    /// Render a row into segments. Errors name the missing or bad field.
    pub fn render(&self, row: &Map<String, Value>) -> Result<Vec<Segment>, String> {
        let prompt = |text: String| Segment { text, trained: false };
        let response = |text: String| Segment { text, trained: true };
        match &self.kind {
            Kind::Alpaca => {
                let instruction = text_field(row, &self.p.instruction_field, true)?;
                let input = text_field(row, &self.p.input_field, false)?;
                let output = text_field(row, &self.p.output_field, true)?;
                let head = if input.is_empty() { ALPACA_NO_INPUT } else { ALPACA_WITH_INPUT };
                let head = head.replace("{instruction}", &instruction).replace("{input}", &input);
                Ok(vec![prompt(head), response(output)])
            }
            Kind::Inline(pieces) => {
                let mut segs = vec![prompt(String::new())];
                for piece in pieces {
                    match piece {
                        Piece::Text(t) => segs.last_mut().map(|s| s.text.push_str(t)).unwrap_or(()),
                        Piece::Field(f) if *f == self.p.output_field => {
                            segs.push(response(text_field(row, f, true)?));
                        }
                        Piece::Field(f) => {
                            let v = text_field(row, f, *f != self.p.input_field)?;
                            segs.last_mut().map(|s| s.text.push_str(&v)).unwrap_or(());
                        }
                    }
                }
                segs.retain(|s| !s.text.is_empty() || s.trained);
                Ok(segs)
            }
            Kind::ChatMl => {
                let msgs = self.messages(row)?;
                let mut segs: Vec<Segment> = vec![];
                let mut pending = String::new();
                for m in &msgs {
                    if m.role == "assistant" {
                        pending.push_str("<|im_start|>assistant\n");
                        segs.push(prompt(std::mem::take(&mut pending)));
                        segs.push(response(format!("{}<|im_end|>", m.content)));
                        pending.push('\n');
                    } else {
                        pending.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
                    }
                }
                Ok(segs)
            }
            Kind::Chat(tpl) => self.render_chat(tpl, &self.messages(row)?),
        }
    }

    /// The prompt of a row for generation: everything before the last response.
    pub fn prompt_text(&self, row: &Map<String, Value>) -> Result<(String, String), String> {
        let segs = self.render(row)?;
        let last = segs.iter().rposition(|s| s.trained).ok_or("no response in row")?;
        let prompt: String = segs[..last].iter().map(|s| s.text.as_str()).collect();
        Ok((prompt, segs[last].text.clone()))
    }

    /// Render messages through a Jinja chat template.
    pub fn apply_chat_template(
        tpl: &str,
        msgs: &[Message],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
    ) -> Result<String, String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", tpl).map_err(|e| format!("chat template does not parse: {e}"))?;
        let t = env.get_template("chat").map_err(|e| e.to_string())?;
        t.render(minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos,
            eos_token => eos,
        })
        .map_err(|e| format!("chat template failed: {e}"))
    }

    fn render_chat(&self, tpl: &str, msgs: &[Message]) -> Result<Vec<Segment>, String> {
        let render =
            |n: usize, gen: bool| Self::apply_chat_template(tpl, &msgs[..n], gen, &self.bos_token, &self.eos_token);
        let mut segs = vec![];
        let mut done = String::new();
        for (k, m) in msgs.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = render(k, true)?;
            let after = render(k + 1, false)?;
            let (Some(head), Some(body)) = (before.strip_prefix(done.as_str()), after.strip_prefix(before.as_str()))
            else {
                return Err("the chat template does not render turns as prefixes of each other, so responses cannot be located; set prompt.train_on_responses_only = false or use \"chatml\"".into());
            };
            segs.push(Segment { text: head.to_string(), trained: false });
            // The response runs to the end of the assistant's content plus the end-of-turn marker;
            // what follows (e.g. a newline) belongs to the next prompt.
            let cut = body.find(m.content.as_str()).map(|i| i + m.content.len()).unwrap_or(body.len());
            let tail = &body[cut..];
            let marker = tail.trim_end_matches(['\n', ' ']).len();
            let resp = &body[..cut + marker];
            segs.push(Segment { text: resp.to_string(), trained: true });
            done = format!("{before}{resp}");
        }
        // Text after the last response (e.g. the newline after the end-of-turn marker) is
        // neither trained nor needed: the sequence ends with the response.
        let full = render(msgs.len(), false)?;
        if let Some(rest) = full.strip_prefix(done.as_str()) {
            if !rest.trim().is_empty() {
                segs.push(Segment { text: rest.to_string(), trained: false });
            }
        }
        Ok(segs)
    }
}
