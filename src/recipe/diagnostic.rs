//! What recipe checks share: a located [`Diagnostic`], where each key was written
//! ([`Locations`]), the keys each section allows (read off the serde structs) and did-you-mean.
//! `validate.rs` and `aliases.rs` both use these; neither imports the other's checks.

use super::schema::*;
use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::collections::BTreeMap;
use std::fmt;

/// One problem found in a recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// `file:line`, or `--set key` for a command-line override.
    pub location: String,
    /// The message, starting with the dotted key where there is one.
    pub text: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.text)
    }
}

/// The field names of a serde struct, read through a deserializer that only
/// records what `deserialize_struct` is asked for.
pub(crate) fn struct_fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("probe"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probe"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// The keys allowed in a section, or None for an unknown section.
pub fn section_keys(section: &str) -> Option<&'static [&'static str]> {
    Some(match section {
        "run" => struct_fields::<RunSection>(),
        "model" => struct_fields::<ModelSection>(),
        "quantization" => struct_fields::<QuantizationSection>(),
        "lora" => struct_fields::<LoraSection>(),
        "prompt" => struct_fields::<PromptSection>(),
        "dataset" => struct_fields::<DatasetSection>(),
        "train" => struct_fields::<TrainSection>(),
        "eval" => struct_fields::<EvalSection>(),
        "export" => struct_fields::<ExportSection>(),
        _ => return None,
    })
}

/// The closest candidate by edit distance, if it is close enough to be a typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Where each dotted key was written: `file:line` or `--set key`.
pub type Locations = BTreeMap<String, String>;
