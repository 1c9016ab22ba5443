//! `tuner generate`: one completion of `--prompt` streamed to stdout, or, without a prompt,
//! a chat on the terminal (one user message per input line, the conversation kept and
//! rendered through the model's chat template; `/reset` starts over, `/exit` or end of input
//! quits).
//!
//! Reference: the `transformers chat` command (a REPL over `apply_chat_template` +
//! `generate` with a text streamer, `!clear`/`!exit` commands) and `llama-cli`'s
//! conversation mode.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};

use super::{Completion, FinishReason, Generator, SamplingParams};
use crate::data::template::Message;
use crate::error::Failure;

/// Options of `tuner generate`.
#[derive(Debug, Clone)]
pub struct GenerateArgs {
    /// The model, adapter, dtype and device.
    pub model: crate::model::open::ModelArgs,
    /// The prompt; `None` starts the interactive chat.
    pub prompt: Option<String>,
    /// Wrap `prompt` as one user message through the chat template.
    pub chat: bool,
    /// Sampling and stopping.
    pub params: SamplingParams,
    /// Where a .gguf model is imported.
    pub cache: PathBuf,
}

/// Run `tuner generate`. Bad flags are usage errors (exit 2); Ctrl-C stops a one-shot
/// completion with exit 130 and only the current reply in a chat.
pub fn run(a: &GenerateArgs, interrupted: &AtomicBool) -> Result<()> {
    let device = a.model.device.resolve();
    if device.is_cuda() && !tch::Cuda::is_available() {
        return Err(
            Failure::Usage(format!("--device {}: CUDA is not available on this machine", a.model.device)).into()
        );
    }
    a.params.validate().map_err(|e| Failure::Usage(format!("invalid sampling options: {e}")))?;
    let g = Generator::load(&a.model, &a.cache)?;
    let stdout = std::io::stdout();
    match &a.prompt {
        Some(prompt) => {
            let text = if a.chat {
                g.chat_prompt(&[Message { role: "user".into(), content: prompt.clone() }])?
            } else {
                prompt.clone()
            };
            reply(&g, &text, &a.params, &mut stdout.lock(), interrupted, log::Level::Info)?;
            if interrupted.load(Ordering::SeqCst) {
                return Err(Failure::Interrupted("generation stopped".into()).into());
            }
            Ok(())
        }
        None => {
            let stdin = std::io::stdin();
            let terminal = stdin.is_terminal();
            if terminal {
                eprintln!("chat with {} (/reset starts over, /exit or Ctrl-D quits)", a.model.model.display());
            }
            chat(&g, &a.params, &mut stdin.lock(), &mut stdout.lock(), terminal, interrupted)
        }
    }
}

/// The interactive loop: each non-empty line of `input` is a user message, each reply is
/// streamed to `out` followed by a newline. `terminal` shows a `> ` prompt (on stderr).
pub fn chat(
    g: &Generator,
    p: &SamplingParams,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    terminal: bool,
    interrupted: &AtomicBool,
) -> Result<()> {
    g.chat_template()?; // fail before reading anything when the model cannot chat
    let mut messages: Vec<Message> = vec![];
    let mut line = String::new();
    loop {
        if terminal {
            eprint!("> ");
        }
        line.clear();
        if input.read_line(&mut line).context("cannot read from stdin")? == 0 {
            return Ok(());
        }
        let said = line.trim();
        match said {
            "" => continue,
            "/exit" => return Ok(()),
            "/reset" => {
                messages.clear();
                if terminal {
                    eprintln!("(conversation cleared)");
                }
                continue;
            }
            _ => {}
        }
        messages.push(Message { role: "user".into(), content: said.to_string() });
        let prompt = g.chat_prompt(&messages)?;
        let c = reply(g, &prompt, p, out, interrupted, log::Level::Debug)?;
        if interrupted.swap(false, Ordering::SeqCst) && terminal {
            eprintln!("(reply stopped)");
        } else if c.finish_reason == FinishReason::Length && terminal {
            eprintln!("(reply cut at {} tokens; raise --max-new-tokens)", p.max_new_tokens);
        }
        messages.push(Message { role: "assistant".into(), content: c.text });
    }
}

/// Generate one completion of `prompt`, streaming it to `out`, then a newline.
/// Logs the token counts and speeds at `level`.
fn reply(
    g: &Generator,
    prompt: &str,
    p: &SamplingParams,
    out: &mut dyn Write,
    interrupted: &AtomicBool,
    level: log::Level,
) -> Result<Completion> {
    let start = Instant::now();
    let mut first = None;
    let mut write_err = None;
    let mut on_delta = |_: usize, delta: &str| {
        first.get_or_insert_with(Instant::now);
        if let Err(e) = out.write_all(delta.as_bytes()).and_then(|_| out.flush()) {
            write_err = Some(e);
            return false;
        }
        !interrupted.load(Ordering::SeqCst)
    };
    let c = g.generate(&[prompt.to_string()], p, &mut on_delta)?.pop().context("no completion")?;
    if let Some(e) = write_err {
        return Err(e).context("cannot write to stdout");
    }
    writeln!(out).context("cannot write to stdout")?;
    out.flush().context("cannot write to stdout")?;
    let total = start.elapsed().as_secs_f64();
    let first = first.map(|t| (t - start).as_secs_f64()).unwrap_or(total);
    let rate = if total > first { (c.tokens.len().saturating_sub(1)) as f64 / (total - first) } else { 0.0 };
    log::log!(
        level,
        "{} new tokens (finish: {:?}) in {total:.2} s; first text after {:.0} ms, then {rate:.1} tokens/s",
        c.tokens.len(),
        c.finish_reason,
        first * 1e3
    );
    Ok(c)
}
