//! The per-layer key/value cache for incremental decoding, and the attention mask of new
//! queries over cached + new keys.
//!
//! Reference: transformers `cache_utils.py` (`DynamicCache`: per layer, K and V after RoPE
//! `[B, n_kv, S, d]`, concatenated along the sequence) and `masking_utils.py`
//! (`causal_mask_function`, `sliding_window_overlay`, `padding_mask_function`: the query at
//! cache index q sees key k when `k ≤ q`, `k > q − W` with a window, and the key is not padding).
//! Unlike HF's sliding-window cache, keys older than the window are kept and masked.

use tch::{Device, Kind, Tensor};

/// One layer's cached pair: two tensors with the batch on dim 0 and the sequence on `time_dim`.
struct Slot {
    a: Tensor,
    b: Tensor,
    time_dim: i64,
}

/// Cached state of every decoder layer, filled by [`super::CausalLm::layer_cached`].
///
/// The built-in families store K and V after RoPE, `[B, n_kv, S, head_dim]`; a family without
/// its own cache path stores its layer inputs `[B, S, H]` and positions `[B, S]` instead.
pub struct KvCache {
    layers: Vec<Option<Slot>>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> KvCache {
        KvCache { layers: (0..num_layers).map(|_| None).collect() }
    }

    /// Number of layers the cache was made for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Positions cached for layer `i` (0 when empty).
    pub fn len(&self, i: usize) -> i64 {
        match self.layers.get(i) {
            Some(Some(s)) => s.a.size()[s.time_dim as usize],
            _ => 0,
        }
    }

    /// Whether nothing is cached in any layer.
    pub fn is_empty(&self) -> bool {
        self.layers.iter().all(Option::is_none)
    }

    /// Layer `i`'s cached pair, if any.
    pub fn get(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(i).and_then(Option::as_ref).map(|s| (&s.a, &s.b))
    }

    /// Append `a` and `b` along `time_dim` to layer `i`'s pair; returns the whole pair
    /// (cached + new). Panics when `i` is out of range (a caller bug).
    pub fn append(&mut self, i: usize, a: &Tensor, b: &Tensor, time_dim: i64) -> (Tensor, Tensor) {
        let slot = match self.layers[i].take() {
            None => Slot { a: a.shallow_clone(), b: b.shallow_clone(), time_dim },
            Some(s) => Slot {
                a: Tensor::cat(&[&s.a, a], s.time_dim),
                b: Tensor::cat(&[&s.b, b], s.time_dim),
                time_dim: s.time_dim,
            },
        };
        let out = (slot.a.shallow_clone(), slot.b.shallow_clone());
        self.layers[i] = Some(slot);
        out
    }

    /// Keep only the batch rows `rows` (i64 indices, in the new order) in every layer, e.g. to
    /// drop finished sequences.
    pub fn select_rows(&mut self, rows: &Tensor) {
        for s in self.layers.iter_mut().flatten() {
            let idx = rows.to_device(s.a.device());
            s.a = s.a.index_select(0, &idx);
            s.b = s.b.index_select(0, &idx);
        }
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|s| *s = None);
    }
}

/// Boolean mask `[B, 1, T, S]` (true = attend) for `t` new queries at cache indices `S − t..S`
/// over `s` keys: causal, `k > q − window` when sliding, keys with `key_mask == 0` (`[B, S]`,
/// `None`: all real) hidden. A query left with no key (a left-padded prompt position) keeps its
/// own key so softmax has no NaN; its output is don't-care.
pub(crate) fn cached_attention_mask(
    key_mask: Option<&Tensor>,
    b: i64,
    t: i64,
    s: i64,
    window: Option<i64>,
    device: Device,
) -> Tensor {
    let q = Tensor::arange_start(s - t, s, (Kind::Int64, device)).unsqueeze(1); // (T, 1)
    let k = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0); // (1, S)
    let mut allowed = k.le_tensor(&q);
    if let Some(w) = window {
        allowed = allowed.logical_and(&k.gt_tensor(&(&q - w)));
    }
    let mut allowed = allowed.unsqueeze(0).expand([b, t, s], true);
    if let Some(m) = key_mask {
        allowed = allowed.logical_and(&m.to_device(device).ne(0).unsqueeze(1));
    }
    let empty = allowed.any_dim(-1, true).logical_not(); // (B, T, 1)
    allowed.logical_or(&q.eq_tensor(&k).unsqueeze(0).logical_and(&empty)).unsqueeze(1)
}
