//! Dataset rows from local files: JSON Lines, JSON arrays (both also gzipped: `.jsonl.gz`,
//! `.json.gz`), CSV, Parquet and Arrow IPC. Each row keeps where it came from (file and line, or
//! row number) so that a bad row can be named precisely, and the format its source is read in.

use crate::data::formats::RowFormat;
use anyhow::{bail, Context, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::DataType;
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::Arc;

/// One dataset row, or why it could not be read.
#[derive(Debug, Clone)]
pub struct Row {
    /// The file it came from.
    pub file: Arc<str>,
    /// "line N" for text formats, "row N" for columnar ones.
    pub place: String,
    /// The fields, or a message saying why the row is malformed.
    pub fields: Result<Map<String, Value>, String>,
    /// How the row is read (its source's `format`); set by the caller, `Auto` as read.
    pub format: RowFormat,
}

impl Row {
    /// `file:line N`, for messages.
    pub fn location(&self) -> String {
        format!("{}:{}", self.file, self.place)
    }
}

/// Read every row of a file, by extension.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let file: Arc<str> = Arc::from(path.display().to_string());
    match crate::recipe::data_file_kind(path).unwrap_or("") {
        "jsonl" => read_jsonl(&read_text(path)?, file),
        "json" => read_json_array(path, &read_text(path)?, file),
        "jsonl.gz" => read_jsonl(&read_gzip(path)?, file),
        "json.gz" => read_json_array(path, &read_gzip(path)?, file),
        "csv" => read_csv(path, file),
        "parquet" => {
            let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
                .with_context(|| format!("{}: not a valid Parquet file", path.display()))?
                .build()?;
            let mut rows = vec![];
            for batch in reader {
                let batch = batch.with_context(|| format!("{}: cannot read Parquet data", path.display()))?;
                batch_rows(&batch, &file, &mut rows);
            }
            Ok(rows)
        }
        "arrow" => {
            let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            let mut rows = vec![];
            // Arrow IPC comes as the file format or the stream format (as HF datasets saves it).
            match arrow::ipc::reader::FileReader::try_new(f, None) {
                Ok(reader) => {
                    for batch in reader {
                        batch_rows(&batch?, &file, &mut rows);
                    }
                }
                Err(_) => {
                    let f = std::fs::File::open(path)?;
                    let reader = arrow::ipc::reader::StreamReader::try_new(f, None)
                        .with_context(|| format!("{}: not an Arrow IPC file or stream", path.display()))?;
                    for batch in reader {
                        batch_rows(&batch?, &file, &mut rows);
                    }
                }
            }
            Ok(rows)
        }
        _ => bail!(
            "{}: unsupported dataset file; expected .{}",
            path.display(),
            crate::recipe::dataset::DATA_EXTENSIONS.join(", .")
        ),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// A gzip file's text (several gzip members are read one after another, as `gunzip` does).
fn read_gzip(path: &Path) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f))
        .read_to_string(&mut text)
        .with_context(|| format!("{}: not a readable gzip file of UTF-8 text", path.display()))?;
    Ok(text)
}

fn read_jsonl(text: &str, file: Arc<str>) -> Result<Vec<Row>> {
    let mut rows = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err("expected a JSON object".to_string()),
            Err(e) => Err(format!("invalid JSON: {e}")),
        };
        rows.push(Row { file: file.clone(), place: format!("{}", i + 1), fields, format: RowFormat::Auto });
    }
    Ok(rows)
}

fn read_json_array(path: &Path, text: &str, file: Arc<str>) -> Result<Vec<Row>> {
    let v: Value = serde_json::from_str(text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let Value::Array(items) = v else {
        bail!("{}: expected a JSON array of objects (use .jsonl for one object per line)", path.display());
    };
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, item)| Row {
            file: file.clone(),
            place: format!("row {}", i + 1),
            fields: match item {
                Value::Object(m) => Ok(m),
                _ => Err("expected a JSON object".into()),
            },
            format: RowFormat::Auto,
        })
        .collect())
}

fn read_csv(path: &Path, file: Arc<str>) -> Result<Vec<Row>> {
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let headers = rdr.headers().with_context(|| format!("{}: cannot read the header line", path.display()))?.clone();
    let mut rows = vec![];
    for rec in rdr.records() {
        let (line, fields) = match rec {
            Ok(r) => {
                let line = r.position().map(|p| p.line()).unwrap_or(0);
                if r.len() != headers.len() {
                    (line, Err(format!("expected {} columns as in the header, found {}", headers.len(), r.len())))
                } else {
                    let m = headers
                        .iter()
                        .zip(r.iter())
                        .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
                        .collect();
                    (line, Ok(m))
                }
            }
            Err(e) => (e.position().map(|p| p.line()).unwrap_or(0), Err(format!("invalid CSV: {e}"))),
        };
        rows.push(Row { file: file.clone(), place: format!("{line}"), fields, format: RowFormat::Auto });
    }
    Ok(rows)
}

/// Convert a record batch into JSON rows (strings, numbers, booleans, lists and structs).
fn batch_rows(batch: &RecordBatch, file: &Arc<str>, out: &mut Vec<Row>) {
    let schema = batch.schema();
    let start = out.len();
    for r in 0..batch.num_rows() {
        let mut m = Map::new();
        for (c, field) in schema.fields().iter().enumerate() {
            m.insert(field.name().clone(), cell(batch.column(c).as_ref(), r));
        }
        out.push(Row {
            file: file.clone(),
            place: format!("row {}", start + r + 1),
            fields: Ok(m),
            format: RowFormat::Auto,
        });
    }
}

fn cell(a: &dyn Array, i: usize) -> Value {
    if a.is_null(i) {
        return Value::Null;
    }
    match a.data_type() {
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int64 => Value::from(a.as_primitive::<arrow::datatypes::Int64Type>().value(i)),
        DataType::Int32 => Value::from(a.as_primitive::<arrow::datatypes::Int32Type>().value(i)),
        DataType::Float64 => Value::from(a.as_primitive::<arrow::datatypes::Float64Type>().value(i)),
        DataType::Float32 => Value::from(a.as_primitive::<arrow::datatypes::Float32Type>().value(i) as f64),
        DataType::List(_) => {
            let l = a.as_list::<i32>().value(i);
            Value::Array((0..l.len()).map(|j| cell(l.as_ref(), j)).collect())
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>().value(i);
            Value::Array((0..l.len()).map(|j| cell(l.as_ref(), j)).collect())
        }
        DataType::Struct(fields) => {
            let s = a.as_struct();
            Value::Object(
                fields.iter().enumerate().map(|(k, f)| (f.name().clone(), cell(s.column(k).as_ref(), i))).collect(),
            )
        }
        other => Value::String(format!("<unsupported {other}>")),
    }
}
