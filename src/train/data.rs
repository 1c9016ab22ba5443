//! Training batches from the tokenize shards, through a resumable cursor.
//!
//! Each epoch visits the examples in a permutation derived from (seed, epoch),
//! so the order is a pure function of the cursor and nothing else needs saving.
//! Batches are padded to their longest row (dynamic padding), optionally to a
//! multiple; with packing, examples are concatenated into rows of
//! `max_seq_length` with document ids, so attention stays inside a document and
//! positions restart per document.

use crate::data::shards::Example;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Where the data stream stands: the next unit of `epoch` to read.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u64,
    pub index: u64,
}

/// One micro-batch on the host; `to_device` builds the tensors.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub input_ids: Vec<Vec<i64>>,
    pub labels: Vec<Vec<i64>>,
    /// Document id per token for packed rows.
    pub seq_ids: Option<Vec<Vec<i64>>>,
}

impl MicroBatch {
    /// Tokens that are trained after the one-position shift (labels[t+1] != -100).
    pub fn trained_tokens(&self) -> i64 {
        self.labels.iter().map(|l| l.iter().skip(1).filter(|x| **x != -100).count() as i64).sum()
    }

    /// Non-padding tokens.
    pub fn tokens(&self) -> i64 {
        self.input_ids.iter().map(|r| r.len() as i64).sum()
    }

    /// (input_ids, labels, attention_mask, seq_ids) padded to the longest row (to a multiple of `multiple`).
    pub fn tensors(&self, pad_id: i64, multiple: usize, device: Device) -> (Tensor, Tensor, Tensor, Option<Tensor>) {
        let longest = self.input_ids.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let t = longest.div_ceil(multiple.max(1)) * multiple.max(1);
        let b = self.input_ids.len();
        let mut ids = vec![pad_id; b * t];
        let mut labels = vec![-100i64; b * t];
        let mut mask = vec![0i64; b * t];
        let mut seq = vec![-1i64; b * t];
        for (r, row) in self.input_ids.iter().enumerate() {
            for (c, x) in row.iter().enumerate() {
                ids[r * t + c] = *x;
                labels[r * t + c] = self.labels[r][c];
                mask[r * t + c] = 1;
                if let Some(s) = &self.seq_ids {
                    seq[r * t + c] = s[r][c];
                }
            }
        }
        let mk = |v: Vec<i64>| Tensor::from_slice(&v).view([b as i64, t as i64]).to_device(device);
        let seq_ids = self.seq_ids.as_ref().map(|_| mk(seq));
        (mk(ids), mk(labels), mk(mask).to_kind(Kind::Int64), seq_ids)
    }
}

/// The examples of the train split and how to batch them.
pub struct Loader {
    examples: Vec<Example>,
    pub micro_batch_size: usize,
    seed: u64,
    packing: bool,
    max_len: usize,
}

impl Loader {
    /// A loader over `examples` (in shard order).
    pub fn new(examples: Vec<Example>, micro_batch_size: usize, seed: u64, packing: bool, max_len: usize) -> Loader {
        Loader { examples, micro_batch_size: micro_batch_size.max(1), seed, packing, max_len }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    fn order(&self, epoch: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.examples.len()).collect();
        let mut mix =
            crate::data::SplitMix64(self.seed ^ 0x5EED_0000_0000_0000 ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        crate::data::shuffle(&mut idx, mix.next_u64());
        idx
    }

    /// The rows of one epoch: single examples, or packed rows of several.
    fn rows(&self, epoch: u64) -> Vec<Vec<usize>> {
        let order = self.order(epoch);
        if !self.packing {
            return order.into_iter().map(|i| vec![i]).collect();
        }
        let mut rows = vec![];
        let mut cur: Vec<usize> = vec![];
        let mut len = 0;
        for i in order {
            let l = self.examples[i].input_ids.len();
            if len + l > self.max_len && !cur.is_empty() {
                rows.push(std::mem::take(&mut cur));
                len = 0;
            }
            cur.push(i);
            len += l;
        }
        if !cur.is_empty() {
            rows.push(cur);
        }
        rows
    }

    /// Micro-batches per epoch.
    pub fn micro_batches_per_epoch(&self) -> u64 {
        (self.rows(0).len() as u64).div_ceil(self.micro_batch_size as u64)
    }

    /// The next micro-batch; advances the cursor (into the next epoch when one ends).
    pub fn next(&self, cur: &mut Cursor) -> MicroBatch {
        let mut rows = self.rows(cur.epoch);
        let mut start = cur.index as usize * self.micro_batch_size;
        if start >= rows.len() {
            cur.epoch += 1;
            cur.index = 0;
            rows = self.rows(cur.epoch);
            start = 0;
        }
        let end = (start + self.micro_batch_size).min(rows.len());
        cur.index += 1;
        let mut mb =
            MicroBatch { input_ids: vec![], labels: vec![], seq_ids: if self.packing { Some(vec![]) } else { None } };
        for row in &rows[start..end] {
            let (mut ids, mut labels, mut seq) = (vec![], vec![], vec![]);
            for (doc, &i) in row.iter().enumerate() {
                let ex = &self.examples[i];
                ids.extend(ex.input_ids.iter().map(|x| *x as i64));
                // The first token of a later document is never predicted from the previous one.
                labels.extend(
                    ex.labels.iter().enumerate().map(|(k, x)| if k == 0 && doc > 0 { -100 } else { *x as i64 }),
                );
                seq.extend(std::iter::repeat_n(doc as i64, ex.input_ids.len()));
            }
            ids.truncate(self.max_len);
            labels.truncate(self.max_len);
            seq.truncate(self.max_len);
            mb.input_ids.push(ids);
            mb.labels.push(labels);
            if let Some(s) = &mut mb.seq_ids {
                s.push(seq);
            }
        }
        mb
    }
}
