//! Progress of long work: a bar on a terminal; elsewhere (CI logs, notebooks, pipes) a plain
//! line on stderr every few seconds with done/total, the rate and an ETA; nothing for a
//! non-leader rank.
//!
//! Work that ends before the first line is due prints nothing off a terminal, so short phases
//! stay quiet; the caller prints its own summary when the work is done. The bar is indicatif's;
//! the plain lines are ours (indicatif draws nothing when stderr is not a TTY).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a plain line is printed when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// What the counted units are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Things (steps, rows, tensors): shown as numbers with the given noun.
    Items(&'static str),
    /// Bytes: shown in MB or GB.
    Bytes,
}

struct Plain {
    what: String,
    unit: Unit,
    len: u64,
    pos: u64,
    /// Position when counting began (a resumed run starts past 0): the rate counts from here.
    start_pos: u64,
    /// Whether any progress was reported yet (the first `set_position` sets `start_pos`).
    moved: bool,
    message: String,
    start: Instant,
    last: Instant,
    every: Duration,
    printed: bool,
    out: Box<dyn Write + Send>,
}

/// A progress report; see the module docs. Share it by reference (it is `Sync`).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: Option<Mutex<Plain>>,
}

impl Progress {
    /// Progress over `len` units of `what` (a short label such as "train" or "load"): a bar on
    /// a terminal, plain lines every [`PLAIN_EVERY`] otherwise.
    pub fn new(len: u64, what: &str, unit: Unit) -> Progress {
        if std::io::stderr().is_terminal() {
            return Progress { bar: Some(bar(len, what, unit)), plain: None };
        }
        Progress::plain_to(len, what, unit, PLAIN_EVERY, Box::new(std::io::stderr()))
    }

    /// [`Progress::new`] on the leader, nothing elsewhere (one report per run, not per rank).
    pub fn leader(leader: bool, len: u64, what: &str, unit: Unit) -> Progress {
        if leader {
            Progress::new(len, what, unit)
        } else {
            Progress::hidden()
        }
    }

    /// Plain lines into `out` at most every `every` (a zero interval prints on every update).
    pub fn plain_to(len: u64, what: &str, unit: Unit, every: Duration, out: Box<dyn Write + Send>) -> Progress {
        let now = Instant::now();
        let plain = Plain {
            what: what.to_string(),
            unit,
            len,
            pos: 0,
            start_pos: 0,
            moved: false,
            message: String::new(),
            start: now,
            last: now,
            every,
            printed: false,
            out,
        };
        Progress { bar: None, plain: Some(Mutex::new(plain)) }
    }

    /// A terminal bar styled by the caller (e.g. a spinner for a download of unknown size).
    pub fn from_bar(bar: indicatif::ProgressBar) -> Progress {
        Progress { bar: Some(bar), plain: None }
    }

    /// Reports nothing.
    pub fn hidden() -> Progress {
        Progress { bar: None, plain: None }
    }

    /// Whether a terminal bar is drawn (then callers leave per-step lines to the bar's message).
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// `n` more units done.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        self.update(|p| {
            p.pos += n;
            p.moved = true;
        });
    }

    /// `pos` units done in all. The first call, before any other progress, sets where the rate
    /// counts from (a resumed run starts past 0).
    pub fn set_position(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
        self.update(|p| {
            if !p.moved {
                p.start_pos = pos;
                p.moved = true;
            }
            p.pos = pos;
        });
    }

    /// A short note shown after the counts (the latest loss, the file being written).
    pub fn set_message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        if let Some(b) = &self.bar {
            b.set_message(msg.clone());
        }
        if let Some(p) = &self.plain {
            if let Ok(mut p) = p.lock() {
                p.message = msg;
            }
        }
    }

    /// Time left, from the rate since counting began; `None` before any progress.
    pub fn eta(&self) -> Option<Duration> {
        let p = self.plain.as_ref()?.lock().ok()?;
        eta(p.start.elapsed(), p.pos.saturating_sub(p.start_pos), p.len.saturating_sub(p.pos))
    }

    /// The caller has just printed a line of its own (with [`Progress::eta`]): the next plain
    /// line waits another interval.
    pub fn touch(&self) {
        if let Some(p) = &self.plain {
            if let Ok(mut p) = p.lock() {
                p.last = Instant::now();
                p.printed = true;
            }
        }
    }

    /// The work is complete: the bar is cleared (the caller says what was done).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// The work stopped early: the bar stays where it is; nothing more is printed.
    pub fn abandon(&self) {
        if let Some(b) = &self.bar {
            b.abandon();
        }
    }

    fn update(&self, f: impl FnOnce(&mut Plain)) {
        let Some(p) = &self.plain else { return };
        let Ok(mut p) = p.lock() else { return };
        f(&mut p);
        let now = Instant::now();
        if now.duration_since(p.last) < p.every || p.len > 0 && p.pos >= p.len && !p.printed && p.every > Duration::ZERO
        {
            return;
        }
        p.last = now;
        p.printed = true;
        let line = plain_line(&p);
        let _ = writeln!(p.out, "{line}");
    }
}

fn bar(len: u64, what: &str, unit: Unit) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let template = match unit {
        Unit::Items(_) => "{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({eta})",
        Unit::Bytes => "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg} ({eta})",
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_string());
    bar
}

/// `train: 12/60 steps (20%), 35s elapsed, ETA 2m20s — loss 1.2345`
fn plain_line(p: &Plain) -> String {
    let pct = if p.len > 0 { format!(" ({:.0}%)", 100.0 * p.pos as f64 / p.len as f64) } else { String::new() };
    let elapsed = p.start.elapsed();
    let eta = match eta(elapsed, p.pos.saturating_sub(p.start_pos), p.len.saturating_sub(p.pos)) {
        Some(e) if p.len > 0 => format!(", ETA {}", duration(e)),
        _ => String::new(),
    };
    // A length of 0 is unknown (a download without Content-Length): the amount alone.
    let done = match (p.unit, p.len) {
        (Unit::Items(noun), 0) => format!("{} {noun}", p.pos),
        (Unit::Items(noun), len) => format!("{}/{len} {noun}", p.pos),
        (Unit::Bytes, 0) => bytes(p.pos),
        (Unit::Bytes, len) => format!("{}/{}", bytes(p.pos), bytes(len)),
    };
    let msg = if p.message.is_empty() { String::new() } else { format!(" — {}", p.message) };
    format!("{}: {done}{pct}, {} elapsed{eta}{msg}", p.what, duration(elapsed))
}

fn eta(elapsed: Duration, done: u64, left: u64) -> Option<Duration> {
    (done > 0).then(|| elapsed.mul_f64(left as f64 / done as f64))
}

/// `512 B`, `12.3 MB`, `4.56 GB` (decimal units, as download sizes are quoted).
pub fn bytes(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2} GB", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1} MB", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} kB", x / 1e3)
    } else {
        format!("{n} B")
    }
}

/// `7s`, `2m05s`, `1h02m`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}
