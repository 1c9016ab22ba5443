//! Tokenized shards: Arrow IPC files with columns `input_ids` (list<int32>),
//! `labels` (list<int32>, -100 where not trained) and `length` (uint32).
//! Writing is deterministic: the same rows give the same bytes.

use anyhow::{Context, Result};
use arrow::array::{AsArray, ListArray, RecordBatch, UInt32Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Int32Type, Schema};
use std::path::Path;
use std::sync::Arc;

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
}

fn list_field(name: &str) -> Field {
    Field::new(name, DataType::List(Arc::new(Field::new("item", DataType::Int32, false))), false)
}

/// The shard schema.
pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        list_field("input_ids"),
        list_field("labels"),
        Field::new("length", DataType::UInt32, false),
    ]))
}

fn list_array(rows: &[&[i32]]) -> ListArray {
    let values: Vec<i32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    let offsets = OffsetBuffer::from_lengths(rows.iter().map(|r| r.len()));
    ListArray::new(
        Arc::new(Field::new("item", DataType::Int32, false)),
        offsets,
        Arc::new(arrow::array::Int32Array::from(values)),
        None,
    )
}

/// Encode examples as Arrow IPC file bytes.
pub fn encode(examples: &[Example]) -> Result<Vec<u8>> {
    let ids: Vec<&[i32]> = examples.iter().map(|e| e.input_ids.as_slice()).collect();
    let labels: Vec<&[i32]> = examples.iter().map(|e| e.labels.as_slice()).collect();
    let lengths = UInt32Array::from(examples.iter().map(|e| e.input_ids.len() as u32).collect::<Vec<_>>());
    let batch = RecordBatch::try_new(
        schema(),
        vec![Arc::new(list_array(&ids)), Arc::new(list_array(&labels)), Arc::new(lengths)],
    )?;
    let mut buf = Vec::new();
    {
        let mut w = arrow::ipc::writer::FileWriter::try_new(&mut buf, &batch.schema())?;
        w.write(&batch)?;
        w.finish()?;
    }
    Ok(buf)
}

/// Read every example of a shard file.
pub fn read(path: &Path) -> Result<Vec<Example>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
    let reader = arrow::ipc::reader::FileReader::try_new(f, None)
        .with_context(|| format!("{}: not an Arrow IPC file", path.display()))?;
    let mut out = vec![];
    for batch in reader {
        let batch = batch.with_context(|| format!("{}: corrupt shard", path.display()))?;
        let col = |name: &str| -> Result<ListArray> {
            Ok(batch
                .column_by_name(name)
                .with_context(|| format!("{}: no `{name}` column", path.display()))?
                .as_list::<i32>()
                .clone())
        };
        let (ids, labels) = (col("input_ids")?, col("labels")?);
        for i in 0..batch.num_rows() {
            let get = |l: &ListArray| l.value(i).as_primitive::<Int32Type>().values().to_vec();
            out.push(Example { input_ids: get(&ids), labels: get(&labels) });
        }
    }
    Ok(out)
}
