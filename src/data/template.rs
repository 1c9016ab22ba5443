//! Prompt templates: a dataset row becomes text segments, each marked as
//! prompt (not trained when `train_on_responses_only`) or response (trained).
//!
//! Templates: "alpaca" (the Stanford Alpaca prompt), "chatml", "chat" (the
//! tokenizer's own Jinja chat template, rendered with minijinja the way
//! transformers' `apply_chat_template` renders it), or an inline format string
//! whose `{output}` slot starts the response.
//!
//! Conversations are OpenAI-style messages (roles system, user, assistant, tool; assistant
//! `tool_calls`; a row-level `tools` list handed to the Jinja template as `tools`, as
//! transformers does). A template that leaves tool calls or tool messages out of its text is
//! refused for that row rather than training on a conversation with holes.

use crate::recipe::{Piece, PromptSection, PromptTemplate};
use serde_json::{Map, Value};

/// A run of text and whether it is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    pub trained: bool,
}

const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
pub const ALPACA_NO_INPUT: &str =
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

/// One turn of a training conversation, as the Jinja template sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Turn {
    pub role: String,
    /// A string; null for an assistant turn that only calls tools and has no content.
    pub content: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where it is in the row (`messages[2]`), for messages; not rendered.
    #[serde(skip)]
    pub at: String,
}

impl Turn {
    fn plain(role: &str, content: String, at: String) -> Turn {
        Turn {
            role: role.into(),
            content: Value::String(content),
            tool_calls: None,
            tool_call_id: None,
            name: None,
            at,
        }
    }

    /// The content as text ("" when null).
    pub fn text(&self) -> &str {
        self.content.as_str().unwrap_or("")
    }

    /// The function names of its tool calls.
    fn call_names(&self) -> Vec<&str> {
        let calls = self.tool_calls.iter().flatten();
        calls.filter_map(|c| c.get("function").unwrap_or(c).get("name").and_then(Value::as_str)).collect()
    }
}

/// An optional string field of a message object.
fn opt_string(obj: &Map<String, Value>, key: &str, at: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("`{at}.{key}`: expected a string, found {}", json_type_name(other))),
    }
}

/// Check an assistant message's `tool_calls`: a list of {function: {name, arguments}} (or {name, arguments}).
fn tool_calls(v: &Value, at: &str) -> Result<Vec<Value>, String> {
    let Value::Array(calls) = v else {
        return Err(format!("`{at}.tool_calls`: expected a list of tool calls, found {}", json_type_name(v)));
    };
    for (j, c) in calls.iter().enumerate() {
        let here = format!("{at}.tool_calls[{j}]");
        let f = c.get("function").unwrap_or(c);
        match f.get("name") {
            Some(Value::String(n)) if !n.is_empty() => {}
            None | Some(Value::Null) => {
                let key = if c.get("function").is_some() { "function.name" } else { "function" };
                return Err(format!(
                    "`{here}.{key}`: missing (a tool call is {{\"function\": {{\"name\", \"arguments\"}}}})"
                ));
            }
            Some(other) => return Err(format!("`{here}.function.name`: expected a function name, found {other}")),
        }
        if let Some(a) = f.get("arguments").filter(|a| !(a.is_string() || a.is_object())) {
            return Err(format!(
                "`{here}.function.arguments`: expected an object or a JSON string, found {}",
                json_type_name(a)
            ));
        }
    }
    Ok(calls.clone())
}

/// One message object of a messages list, checked.
fn parse_turn(m: &Value, at: String) -> Result<Turn, String> {
    let obj = m.as_object().ok_or_else(|| format!("field `{at}`: expected an object with role and content"))?;
    let role = text_field(obj, "role", true).map_err(|e| format!("`{at}`: {e}"))?;
    if !["system", "user", "assistant", "tool"].contains(&role.as_str()) {
        return Err(format!("`{at}`: role must be system, user, assistant or tool, found {role:?}"));
    }
    let calls = match obj.get("tool_calls") {
        None | Some(Value::Null) => None,
        Some(_) if role != "assistant" => {
            return Err(format!("`{at}.tool_calls`: only assistant messages call tools, this one is {role:?}"))
        }
        Some(v) => Some(tool_calls(v, &at)?).filter(|c| !c.is_empty()),
    };
    let content = match obj.get("content") {
        None | Some(Value::Null) if calls.is_some() => Value::Null,
        _ => Value::String(text_field(obj, "content", true).map_err(|e| format!("`{at}`: {e}"))?),
    };
    Ok(Turn {
        tool_call_id: opt_string(obj, "tool_call_id", &at)?,
        name: opt_string(obj, "name", &at)?,
        role,
        content,
        tool_calls: calls,
        at,
    })
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
    crate::data::formats::type_name(v)
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
    pub fn messages(&self, row: &Map<String, Value>) -> Result<Vec<Turn>, String> {
        let mut out = vec![];
        if !self.p.system.is_empty() {
            out.push(Turn::plain("system", self.p.system.clone(), "prompt.system".into()));
        }
        let f = &self.p.messages_field;
        if let Some(v) = row.get(f) {
            let Value::Array(items) = v else {
                return Err(format!(
                    "field `{f}`: expected a list of {{role, content}} objects, found {}",
                    json_type_name(v)
                ));
            };
            for (i, m) in items.iter().enumerate() {
                let turn = parse_turn(m, format!("{f}[{i}]"))?;
                if turn.role == "system" && !out.is_empty() && i == 0 {
                    out.clear();
                }
                out.push(turn);
            }
            if !out.iter().any(|m| m.role == "assistant") {
                return Err(format!("field `{f}`: no assistant message to train on"));
            }
            return Ok(out);
        }
        let instruction = text_field(row, &self.p.instruction_field, true)?;
        let input = text_field(row, &self.p.input_field, false)?;
        let output = text_field(row, &self.p.output_field, true)?;
        let user = if input.is_empty() { instruction } else { format!("{instruction}\n\n{input}") };
        out.push(Turn::plain("user", user, self.p.instruction_field.clone()));
        out.push(Turn::plain("assistant", output, self.p.output_field.clone()));
        Ok(out)
    }

    /// A conversation row under a template that only reads instruction/output fields.
    fn refuse_chat_row(&self, row: &Map<String, Value>) -> Result<(), String> {
        let f = &self.p.messages_field;
        if row.contains_key(f) && !row.contains_key(&self.p.output_field) {
            return Err(format!(
                "a conversation row (`{f}`) needs prompt.template = \"chat\" or \"chatml\"; \"{}\" reads `{}` and `{}`",
                self.p.template, self.p.instruction_field, self.p.output_field
            ));
        }
        Ok(())
    }

    /// Render a row into segments. Errors name the missing or bad field.
    pub fn render(&self, row: &Map<String, Value>) -> Result<Vec<Segment>, String> {
        let prompt = |text: String| Segment { text, trained: false };
        let response = |text: String| Segment { text, trained: true };
        match &self.kind {
            Kind::Alpaca => {
                self.refuse_chat_row(row)?;
                let instruction = text_field(row, &self.p.instruction_field, true)?;
                let input = text_field(row, &self.p.input_field, false)?;
                let output = text_field(row, &self.p.output_field, true)?;
                let head = if input.is_empty() { ALPACA_NO_INPUT } else { ALPACA_WITH_INPUT };
                let head = head.replace("{instruction}", &instruction).replace("{input}", &input);
                Ok(vec![prompt(head), response(output)])
            }
            Kind::Inline(pieces) => {
                self.refuse_chat_row(row)?;
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
                    if m.tool_calls.is_some() {
                        return Err(format!("`{}`: prompt.template = \"chatml\" has no way to write tool calls; use \"chat\" with a model whose chat template writes them (Qwen2.5, Llama 3.1, …)", m.at));
                    }
                    if m.role == "assistant" {
                        pending.push_str("<|im_start|>assistant\n");
                        segs.push(prompt(std::mem::take(&mut pending)));
                        segs.push(response(format!("{}<|im_end|>", m.text())));
                        pending.push('\n');
                    } else {
                        pending.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.text()));
                    }
                }
                Ok(segs)
            }
            Kind::Chat(tpl) => self.render_chat(tpl, &self.messages(row)?, row.get("tools")),
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
        Self::render_template(tpl, msgs, None, add_generation_prompt, bos, eos)
    }

    /// Render messages (and the row's `tools`, if any) through a Jinja chat template.
    fn render_template<T: serde::Serialize>(
        tpl: &str,
        msgs: &[T],
        tools: Option<&Value>,
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
        let ctx = minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos,
            eos_token => eos,
        };
        let ctx = match tools {
            Some(tools) => minijinja::context! { tools => tools, ..ctx },
            None => ctx,
        };
        t.render(ctx).map_err(|e| format!("chat template failed: {e}"))
    }

    fn render_chat(&self, tpl: &str, msgs: &[Turn], tools: Option<&Value>) -> Result<Vec<Segment>, String> {
        let has_tools = msgs.iter().any(|m| m.role == "tool" || m.tool_calls.is_some());
        let render = |n: usize, gen: bool| {
            Self::render_template(tpl, &msgs[..n], tools, gen, &self.bos_token, &self.eos_token).map_err(|e| {
                if has_tools {
                    format!(
                        "{e} (the row has tool calls or tool messages: does this model's chat template support tools?)"
                    )
                } else {
                    e
                }
            })
        };
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
            let cut = body.find(m.text()).map(|i| i + m.text().len()).unwrap_or(body.len());
            let tail = &body[cut..];
            let marker = tail.trim_end_matches(['\n', ' ']).len();
            let resp = &body[..cut + marker];
            if let Some(name) = m.call_names().into_iter().find(|n| !resp.contains(n)) {
                return Err(format!("`{}`: the model's chat template does not write assistant tool_calls (the call to `{name}` is missing from the rendered turn); use a model whose chat template supports tools, or drop these rows", m.at));
            }
            segs.push(Segment { text: resp.to_string(), trained: true });
            done = format!("{before}{resp}");
        }
        // Text after the last response (e.g. the newline after the end-of-turn marker) is
        // neither trained nor needed: the sequence ends with the response.
        let full = render(msgs.len(), false)?;
        if let Some(t) = msgs.iter().find(|m| m.role == "tool" && !full.contains(m.text())) {
            return Err(format!("`{}`: the model's chat template leaves `tool` messages out; use a model whose chat template supports tools, or drop these rows", t.at));
        }
        if let Some(rest) = full.strip_prefix(done.as_str()) {
            if !rest.trim().is_empty() {
                segs.push(Segment { text: rest.to_string(), trained: false });
            }
        }
        Ok(segs)
    }
}
