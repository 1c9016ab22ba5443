//! Streaming text of one sequence: which part of the decoded text can be shown now, and
//! where a stop string cuts it.
//!
//! Reference: the incremental detokenization of HF `TextStreamer` and vLLM's stop-string
//! handling: text ending in an incomplete UTF-8 sequence (U+FFFD from a lossy decode) is held
//! back until the next token completes it, and so is a suffix that could be the start of a stop
//! string; a stop string found in the text ends the sequence, the output stops just before it.

/// What [`TextStream::update`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Update {
    /// New text to show (may be empty).
    pub delta: String,
    /// A stop string was found; the text is final.
    pub stopped: bool,
}

/// The shown part of one sequence's text.
#[derive(Debug, Clone)]
pub(crate) struct TextStream {
    stop: Vec<String>,
    longest_stop: usize,
    /// Text shown so far (a prefix of the decoded text).
    shown: String,
    /// The final text once a stop string was found.
    cut: Option<String>,
}

impl TextStream {
    /// A stream that stops at any of `stop` (non-empty strings).
    pub fn new(stop: &[String]) -> TextStream {
        let longest_stop = stop.iter().map(String::len).max().unwrap_or(0);
        TextStream { stop: stop.to_vec(), longest_stop, shown: String::new(), cut: None }
    }

    /// Feed the whole decoded text so far; returns what can be shown beyond what was.
    pub fn update(&mut self, text: &str) -> Update {
        if self.cut.is_some() {
            return Update { delta: String::new(), stopped: true };
        }
        if let Some(at) = self.find_stop(text) {
            let delta = self.advance(text, at);
            self.cut = Some(text[..at].to_string());
            return Update { delta, stopped: true };
        }
        let base = text.trim_end_matches('\u{FFFD}').len();
        // The longest proper prefix of a stop string that the text ends with is held back.
        let held = self
            .stop
            .iter()
            .filter_map(|s| (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && text[..base].ends_with(&s[..k])))
            .max()
            .unwrap_or(0);
        Update { delta: self.advance(text, base - held), stopped: false }
    }

    /// The sequence ended (EOS, length, cancel): show everything that was held back, unless a
    /// stop string already cut the text. Returns the remaining delta.
    pub fn finish(&mut self, text: &str) -> String {
        match &self.cut {
            Some(_) => String::new(),
            None => self.advance(text, text.len()),
        }
    }

    /// The final text: cut before the stop string, or all of `text`.
    pub fn final_text(&self, text: &str) -> String {
        self.cut.clone().unwrap_or_else(|| text.to_string())
    }

    /// The earliest stop string occurrence in the part of `text` not yet shown (plus the
    /// longest stop's length before it, for occurrences that straddle).
    fn find_stop(&self, text: &str) -> Option<usize> {
        if self.stop.is_empty() {
            return None;
        }
        let mut from = self.shown.len().saturating_sub(self.longest_stop).min(text.len());
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        self.stop.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i)).min()
    }

    /// Show `text[..end]`; returns the newly shown part. Shows nothing when the decoded text no
    /// longer extends what was shown (a decoder that rewrote earlier text).
    fn advance(&mut self, text: &str, end: usize) -> String {
        if end <= self.shown.len() || !text.is_char_boundary(end) || !text.starts_with(self.shown.as_str()) {
            return String::new();
        }
        let delta = text[self.shown.len()..end].to_string();
        self.shown.push_str(&delta);
        delta
    }
}
