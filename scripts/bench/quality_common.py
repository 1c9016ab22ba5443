"""Shared pieces of the quality comparison (scripts/bench/quality.sh): tuner's data order and
LoRA initialisation re-done in Python, and a reader for tuner's tokenized Arrow shards.

Nothing here is run directly; `python3 quality_common.py RUN_DIR` prints a self-check (the
shard reader against pyarrow when pyarrow is there, the first micro-batches' token counts).

What is mirrored, and from where:
- SplitMix64 and its Fisher-Yates shuffle with rejection sampling: src/data/mod.rs.
- The epoch order (seed ^ 0x5EED… ^ epoch·golden) and the micro-batches (rows in the epoch's
  permutation, micro_batch_size at a time; with packing, examples concatenated up to
  max_seq_length, a later document's first label masked): src/train/data.rs (Loader).
- The LoRA A init, U(-1/sqrt(in), 1/sqrt(in)) from one SplitMix64 stream seeded with run.seed,
  in module order (layer by layer; q, k, v, o, then gate, up, down), as f32:
  src/model/lora.rs (attach). B starts at zero.
- The learning rate of optimizer step s (0-based): src/train/schedule.rs.
- The shards (Arrow IPC files, columns input_ids/labels list<int32>, length uint32):
  src/data/shards.rs; the list of them: <run>/tokenize/shards.json.
"""
import json
import math
import os
import struct

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


class SplitMix64:
    def __init__(self, state):
        self.state = state & MASK64

    def next_u64(self):
        self.state = (self.state + GOLDEN) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n):
        zone = MASK64 - (MASK64 % n)
        while True:
            x = self.next_u64()
            if x < zone:
                return x % n


def shuffle(v, seed):
    rng = SplitMix64(seed)
    for i in range(len(v) - 1, 0, -1):
        j = rng.below(i + 1)
        v[i], v[j] = v[j], v[i]


def splitmix_units(seed, start, count):
    """rng.unit() for draws start..start+count of SplitMix64(seed), vectorised: the state after k
    draws is seed + k·golden, so every draw can be computed independently (uint64 wraps)."""
    with np.errstate(over="ignore"):
        k = np.arange(start + 1, start + count + 1, dtype=np.uint64)
        z = np.uint64(seed & MASK64) + k * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / float(1 << 53))


def lora_a_init(seed, modules):
    """tuner's initial lora_A for each (path, in_features) of `modules`, in the given order
    (which must be tuner's module order): {path: float32 array [r, in]}; `modules` items are
    (path, r, in_features)."""
    out, pos = {}, 0
    for path, r, in_f in modules:
        n = r * in_f
        u = splitmix_units(seed, pos, n)
        pos += n
        bound = 1.0 / math.sqrt(in_f)
        out[path] = ((u * 2.0 - 1.0) * bound).astype(np.float32).reshape(r, in_f)
    return out


def lr_at(kind, base, step, warmup, total):
    if step < warmup:
        return base * step / warmup
    decay = max(total - warmup, 1)
    progress = min(max((step - warmup) / decay, 0.0), 1.0)
    if kind == "constant":
        return base
    if kind == "linear":
        return base * (1.0 - progress)
    if kind == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler {kind!r}")


# ---- Arrow IPC (file format), just enough for tuner's shards: one schema, uncompressed record
# batches of list<int32>, list<int32>, uint32 columns. Flatbuffers are read by hand.

class _Table:
    def __init__(self, buf, pos):
        self.buf, self.pos = buf, pos
        self.vt = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vt_len = struct.unpack_from("<H", buf, self.vt)[0]

    def _field(self, i):
        o = 4 + 2 * i
        if o >= self.vt_len:
            return 0
        return struct.unpack_from("<H", self.buf, self.vt + o)[0]

    def scalar(self, i, fmt, default=0):
        f = self._field(i)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + f)[0] if f else default

    def table(self, i):
        f = self._field(i)
        if not f:
            return None
        p = self.pos + f
        return _Table(self.buf, p + struct.unpack_from("<I", self.buf, p)[0])

    def struct_vector(self, i, fmt):
        f = self._field(i)
        if not f:
            return []
        p = self.pos + f
        p += struct.unpack_from("<I", self.buf, p)[0]
        n = struct.unpack_from("<I", self.buf, p)[0]
        size = struct.calcsize("<" + fmt)
        return [struct.unpack_from("<" + fmt, self.buf, p + 4 + k * size) for k in range(n)]


def read_shard(path):
    """[(input_ids, labels)] of one tuner shard, as lists of ints. The record batches are found
    through the file footer (Footer.recordBatches: Block{offset, metaDataLength, bodyLength})."""
    data = open(path, "rb").read()
    if data[:6] != b"ARROW1" or data[-6:] != b"ARROW1":
        raise ValueError(f"{path}: not an Arrow IPC file")
    flen, = struct.unpack_from("<i", data, len(data) - 10)
    fstart = len(data) - 10 - flen
    footer = data[fstart:fstart + flen]
    ft = _Table(footer, struct.unpack_from("<I", footer, 0)[0])
    out = []
    for offset, meta_len, _pad, body_len in ft.struct_vector(3, "qiiq"):
        pos = offset
        cont, = struct.unpack_from("<I", data, pos)
        if cont == 0xFFFFFFFF:
            mlen, = struct.unpack_from("<i", data, pos + 4)
            mstart = pos + 8
        else:  # pre-0.15 format: no continuation marker
            mlen, mstart = cont, pos + 4
        meta = data[mstart:mstart + mlen]
        msg = _Table(meta, struct.unpack_from("<I", meta, 0)[0])
        if msg.scalar(1, "B") != 3:  # MessageHeader.RecordBatch
            raise ValueError(f"{path}: a footer block that is not a record batch")
        body = offset + meta_len
        rb = msg.table(2)
        if rb.table(3) is not None:
            raise ValueError(f"{path}: compressed record batches are not supported")
        n = rb.scalar(0, "q")
        bufs = rb.struct_vector(2, "qq")  # (offset, length)
        # buffers: ids validity, ids offsets, ids.item validity, ids.item values, the same for
        # labels, then length validity, length values
        if len(bufs) < 8:
            raise ValueError(f"{path}: unexpected record batch layout ({len(bufs)} buffers)")

        def col(k):
            off = np.frombuffer(data, "<i4", n + 1, body + bufs[4 * k + 1][0])
            vals = np.frombuffer(data, "<i4", bufs[4 * k + 3][1] // 4, body + bufs[4 * k + 3][0])
            return [vals[off[i]:off[i + 1]].tolist() for i in range(n)]

        out.extend(zip(col(0), col(1)))
    return out


def read_split(run_dir, split):
    """The examples of `split` in shard order, as tuner's train::read_split reads them."""
    tok = os.path.join(run_dir, "tokenize")
    infos = json.load(open(os.path.join(tok, "shards.json")))
    out = []
    for info in infos:
        if info["split"] == split:
            ex = read_shard(os.path.join(tok, info["file"]))
            if len(ex) != info["rows"]:
                raise ValueError(f"{info['file']}: read {len(ex)} rows, shards.json says {info['rows']}")
            out.extend(ex)
    return out


class Loader:
    """src/train/data.rs Loader: the same micro-batches in the same order."""

    def __init__(self, examples, micro_batch_size, seed, packing, max_len):
        self.examples = examples
        self.mbs = max(1, micro_batch_size)
        self.seed = seed
        self.packing = packing
        self.max_len = max_len
        self.epoch, self.index = 0, 0
        self._rows_cache = {}

    def order(self, epoch):
        idx = list(range(len(self.examples)))
        mix = SplitMix64(self.seed ^ 0x5EED000000000000 ^ ((epoch * GOLDEN) & MASK64))
        shuffle(idx, mix.next_u64())
        return idx

    def rows(self, epoch):
        if epoch in self._rows_cache:
            return self._rows_cache[epoch]
        order = self.order(epoch)
        if not self.packing:
            rows = [[i] for i in order]
        else:
            rows, cur, n = [], [], 0
            for i in order:
                k = len(self.examples[i][0])
                if n + k > self.max_len and cur:
                    rows.append(cur)
                    cur, n = [], 0
                cur.append(i)
                n += k
            if cur:
                rows.append(cur)
        self._rows_cache = {epoch: rows}
        return rows

    def next(self):
        """(input_ids rows, labels rows, seq_ids rows or None): one micro-batch, unpadded."""
        rows = self.rows(self.epoch)
        start = self.index * self.mbs
        if start >= len(rows):
            self.epoch += 1
            self.index = 0
            rows = self.rows(self.epoch)
            start = 0
        end = min(start + self.mbs, len(rows))
        self.index += 1
        ids_b, lab_b, seq_b = [], [], []
        for row in rows[start:end]:
            ids, labels, seq = [], [], []
            for doc, i in enumerate(row):
                e_ids, e_lab = self.examples[i]
                ids.extend(e_ids)
                labels.extend(-100 if (k == 0 and doc > 0) else x for k, x in enumerate(e_lab))
                seq.extend([doc] * len(e_ids))
            ids_b.append(ids[: self.max_len])
            lab_b.append(labels[: self.max_len])
            seq_b.append(seq[: self.max_len])
        return ids_b, lab_b, (seq_b if self.packing else None)


def pad_batch(ids_rows, lab_rows, pad_id, dev, multiple=1):
    """A micro-batch as tensors on `dev`: right padding to the longest row rounded up to `multiple`
    (tuner's dynamic padding at 1), mask 0 and labels -100 there. Returns (ids, labels, mask,
    padded token count)."""
    import torch

    longest = max(1, max(len(r) for r in ids_rows))
    t = -(-longest // max(1, multiple)) * max(1, multiple)
    b = len(ids_rows)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    lab = torch.full((b, t), -100, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, (r, l) in enumerate(zip(ids_rows, lab_rows)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    nb = dev.type == "cuda"
    return ids.to(dev, non_blocking=nb), lab.to(dev, non_blocking=nb), mask.to(dev, non_blocking=nb), b * t


def trained_tokens(labels_rows):
    return sum(sum(1 for x in r[1:] if x != -100) for r in labels_rows)


def read_recipe(run_dir):
    import tomllib

    with open(os.path.join(run_dir, "recipe.resolved.toml"), "rb") as f:
        return tomllib.load(f)


if __name__ == "__main__":
    import sys

    run = sys.argv[1]
    for split in ("train", "eval"):
        ex = read_split(run, split)
        print(f"{split}: {len(ex)} examples, {sum(len(e[0]) for e in ex)} tokens")
        try:
            import pyarrow.ipc as ipc

            infos = json.load(open(os.path.join(run, "tokenize", "shards.json")))
            ref = []
            for info in infos:
                if info["split"] == split:
                    t = ipc.open_file(os.path.join(run, "tokenize", info["file"])).read_all()
                    ref.extend(zip(t.column("input_ids").to_pylist(), t.column("labels").to_pylist()))
            same = [(list(a), list(b)) for a, b in ref] == [(list(a), list(b)) for a, b in ex]
            print(f"  pyarrow reads the same examples: {same}")
        except ImportError:
            print("  (no pyarrow to check against)")
    rec = read_recipe(run)
    t = rec["train"]
    ld = Loader(read_split(run, "train"), t["micro_batch_size"], rec["run"]["seed"], t["packing"], t["max_seq_length"])
    for s in range(3):
        mbs = [ld.next() for _ in range(t["gradient_accumulation_steps"])]
        print(f"step {s + 1}: tokens {sum(len(r) for m in mbs for r in m[0])}, "
              f"trained {sum(trained_tokens(m[1]) for m in mbs)}")
