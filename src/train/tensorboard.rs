//! TensorBoard event files, written by hand: TFRecord framing (u64 length, masked CRC-32C of
//! the length, the record, masked CRC-32C of the record) around protobuf-encoded `Event`
//! messages with scalar summaries, following tensorflow/core/util/event.proto and
//! tensorflow/core/lib/io/record_writer.cc. Enough for `tensorboard --logdir runs`.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise table.
fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    const T: [u32; 256] = table();
    let mut c = !0u32;
    for &b in data {
        c = T[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The masked CRC TFRecord stores.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(out, ((field as u64) << 3) | 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// An `Event`: wall_time (1, double), step (2, int64), then file_version (3) or summary (5).
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut e = vec![(1 << 3) | 1];
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(&mut e, 2 << 3);
    varint(&mut e, step as u64);
    if let Some(v) = file_version {
        bytes_field(&mut e, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = vec![];
        for (tag, value) in scalars {
            let mut v = vec![];
            bytes_field(&mut v, 1, tag.as_bytes());
            v.push((2 << 3) | 5);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        bytes_field(&mut e, 5, &summary);
    }
    e
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// An open event file; every write is flushed so a running TensorBoard sees it.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl EventWriter {
    /// A new `events.out.tfevents.<unix secs>.<hostname>` in `dir` (created), starting with
    /// the `brain.Event:2` version record.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let t = now();
        let path = dir.join(format!("events.out.tfevents.{}.{host}", t as u64));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut w = EventWriter { file, path };
        w.write(&record(&event(t, 0, Some("brain.Event:2"), &[])))?;
        Ok(w)
    }

    /// The scalars of one step, as one event.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f32)]) -> Result<()> {
        self.write(&record(&event(now(), step as i64, None, values)))
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}
