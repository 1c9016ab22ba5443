//! A reader of SentencePiece's `tokenizer.model`: the serialized `ModelProto` of
//! google/sentencepiece's `src/sentencepiece_model.proto`, decoded by hand from the protobuf
//! wire format (varint / 64-bit / length-delimited / 32-bit records; the field numbers are the
//! proto's). Only what a GGUF vocabulary needs is kept:
//!
//! - `pieces` (field 1): `piece` (1, string), `score` (2, float), `type` (3, enum; NORMAL 1,
//!   UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6; NORMAL when absent);
//! - `trainer_spec` (2): `model_type` (3; UNIGRAM 1 when absent, BPE 2, WORD 3, CHAR 4),
//!   `byte_fallback` (35), `unk_id` / `bos_id` / `eos_id` / `pad_id` (40-43; 0, 1, 2, -1 when
//!   absent);
//! - `normalizer_spec` (3): `name` (1), `add_dummy_prefix` (3, true when absent),
//!   `remove_extra_whitespaces` (4, true when absent).
//!
//! Every other field is skipped by its wire type. A truncated or malformed file is an error
//! that names the path; nothing here panics on bad input.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

/// A piece's type (`ModelProto.SentencePiece.Type`); the numbers are also GGUF's token types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece.
    Normal = 1,
    /// The unknown piece.
    Unknown = 2,
    /// A control symbol (`<s>`, `</s>`, ...): never produced from text.
    Control = 3,
    /// A user-defined symbol: always one piece when it occurs in text.
    UserDefined = 4,
    /// An unused piece.
    Unused = 5,
    /// A byte-fallback piece (`<0x41>`).
    Byte = 6,
}

impl PieceType {
    fn from_proto(v: u64) -> Option<PieceType> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }
}

/// The segmentation algorithm (`TrainerSpec.ModelType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpmModelType {
    /// Unigram language model (the proto's default).
    Unigram,
    /// Byte-pair encoding.
    Bpe,
    /// Whitespace-delimited words.
    Word,
    /// Characters.
    Char,
}

impl SpmModelType {
    /// The proto's name.
    pub fn name(self) -> &'static str {
        match self {
            SpmModelType::Unigram => "UNIGRAM",
            SpmModelType::Bpe => "BPE",
            SpmModelType::Word => "WORD",
            SpmModelType::Char => "CHAR",
        }
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece (`▁` stands for a space).
    pub piece: String,
    /// Its score (BPE: minus its merge order; Unigram: its log probability).
    pub score: f32,
    /// Its type.
    pub kind: PieceType,
}

/// The parts of a `tokenizer.model` a GGUF vocabulary uses.
#[derive(Debug, Clone, PartialEq)]
pub struct SpmModel {
    /// The vocabulary, in id order.
    pub pieces: Vec<Piece>,
    /// The segmentation algorithm.
    pub model_type: SpmModelType,
    /// Whether unknown characters become `<0xXX>` byte pieces.
    pub byte_fallback: bool,
    /// The trainer's special ids (-1: none).
    pub unk_id: i32,
    /// See `unk_id`.
    pub bos_id: i32,
    /// See `unk_id`.
    pub eos_id: i32,
    /// See `unk_id`.
    pub pad_id: i32,
    /// The normalization rule's name (`identity`, `nmt_nfkc`, ...; empty when absent).
    pub normalizer_name: String,
    /// Whether a `▁` is put in front of the text.
    pub add_dummy_prefix: bool,
    /// Whether runs of spaces are collapsed and leading/trailing ones removed.
    pub remove_extra_whitespaces: bool,
}

impl SpmModel {
    /// Read and decode the `tokenizer.model` at `path`.
    pub fn read(path: &Path) -> Result<SpmModel> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        SpmModel::parse(&bytes).with_context(|| {
            format!(
                "{} is not a valid SentencePiece model (a serialized ModelProto); replace it with the model repo's own tokenizer.model",
                path.display()
            )
        })
    }

    /// Decode a serialized `ModelProto`.
    pub fn parse(bytes: &[u8]) -> Result<SpmModel> {
        let mut m = SpmModel {
            pieces: Vec::new(),
            model_type: SpmModelType::Unigram,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            normalizer_name: String::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
        };
        let mut r = Reader::new(bytes);
        while let Some((field, value)) = r.next_field()? {
            match (field, value) {
                (1, Value::Bytes(b)) => {
                    let i = m.pieces.len();
                    m.pieces.push(parse_piece(b).with_context(|| format!("piece {i}"))?);
                }
                (2, Value::Bytes(b)) => parse_trainer_spec(b, &mut m).context("trainer_spec")?,
                (3, Value::Bytes(b)) => parse_normalizer_spec(b, &mut m).context("normalizer_spec")?,
                (1..=3, _) => bail!("field {field} has the wrong wire type"),
                _ => {}
            }
        }
        if m.pieces.is_empty() {
            bail!("it has no pieces");
        }
        Ok(m)
    }

    /// The id of the first piece of type `kind`.
    pub fn first_of(&self, kind: PieceType) -> Option<usize> {
        self.pieces.iter().position(|p| p.kind == kind)
    }
}

fn parse_piece(bytes: &[u8]) -> Result<Piece> {
    let mut piece = None;
    let mut score = 0.0f32;
    let mut kind = PieceType::Normal;
    let mut r = Reader::new(bytes);
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => {
                piece = Some(String::from_utf8(b.to_vec()).map_err(|_| anyhow!("its text is not UTF-8"))?);
            }
            (2, Value::Fixed32(v)) => score = f32::from_bits(v),
            (3, Value::Varint(v)) => {
                kind = PieceType::from_proto(v).ok_or_else(|| anyhow!("unknown piece type {v}"))?;
            }
            (1..=3, _) => bail!("field {field} has the wrong wire type"),
            _ => {}
        }
    }
    let piece = piece.ok_or_else(|| anyhow!("it has no text"))?;
    Ok(Piece { piece, score, kind })
}

/// A varint holding a proto `int32` (negative values are sign-extended to 64 bits).
fn int32(v: u64) -> i32 {
    v as i64 as i32
}

fn parse_trainer_spec(bytes: &[u8], m: &mut SpmModel) -> Result<()> {
    let mut r = Reader::new(bytes);
    while let Some((field, value)) = r.next_field()? {
        let Value::Varint(v) = value else { continue };
        match field {
            3 => {
                m.model_type = match v {
                    1 => SpmModelType::Unigram,
                    2 => SpmModelType::Bpe,
                    3 => SpmModelType::Word,
                    4 => SpmModelType::Char,
                    _ => bail!("unknown model_type {v}"),
                }
            }
            35 => m.byte_fallback = v != 0,
            40 => m.unk_id = int32(v),
            41 => m.bos_id = int32(v),
            42 => m.eos_id = int32(v),
            43 => m.pad_id = int32(v),
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer_spec(bytes: &[u8], m: &mut SpmModel) -> Result<()> {
    let mut r = Reader::new(bytes);
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => m.normalizer_name = String::from_utf8_lossy(b).into_owned(),
            (3, Value::Varint(v)) => m.add_dummy_prefix = v != 0,
            (4, Value::Varint(v)) => m.remove_extra_whitespaces = v != 0,
            _ => {}
        }
    }
    Ok(())
}

/// One record's payload.
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// A cursor over protobuf records.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64> {
        let start = self.pos;
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or_else(|| anyhow!("truncated varint at byte {start}"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint at byte {start} is longer than 10 bytes")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or_else(|| {
            anyhow!("truncated: a {n}-byte record at byte {} runs past the end ({} bytes)", self.pos, self.buf.len())
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next (field number, value), or `None` at the end.
    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let at = self.pos;
        let key = self.varint()?;
        let field = key >> 3;
        if field == 0 {
            bail!("field number 0 at byte {at}");
        }
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = self.varint()?;
                let n = usize::try_from(n).map_err(|_| anyhow!("record length {n} at byte {at} is too large"))?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => bail!("wire type {w} (field {field}) at byte {at} is not one a ModelProto uses"),
        };
        Ok(Some((field, value)))
    }
}
