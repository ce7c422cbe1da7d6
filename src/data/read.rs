//! Reads dataset files into JSON records: `.jsonl`, `.json` (an array, or `{"data": [...]}`),
//! either gzip-compressed (`.jsonl.gz`, `.json.gz`), and Parquet (rows become JSON objects;
//! nested lists and structs, e.g. `messages`, become arrays and objects).

use super::DataError;
use serde_json::Value;
use std::io::Read;
use std::path::Path;

/// A record and where it came from (1-based line for JSONL, 0 otherwise).
pub struct Record {
    pub value: Value,
    pub line: usize,
}

pub fn read_records(path: &Path) -> Result<Vec<Record>, DataError> {
    read_records_as(path, path)
}

/// Reads `path`, naming it `shown` in errors (the user's file, not the cache copy).
pub fn read_records_as(path: &Path, shown: &Path) -> Result<Vec<Record>, DataError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let io = |source| DataError::Io {
        path: shown.to_path_buf(),
        source,
    };
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(s) => (s, true),
        None => (name, false),
    };
    if stem.ends_with(".parquet") {
        if gz {
            return Err(DataError::Unsupported {
                path: shown.to_path_buf(),
                message:
                    "a gzip-compressed Parquet file; Parquet compresses internally, decompress it"
                        .into(),
            });
        }
        return read_parquet(path, shown);
    }
    let raw = std::fs::read(path).map_err(io)?;
    let text = if gz {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut s)
            .map_err(io)?;
        s
    } else {
        String::from_utf8(raw).map_err(|e| DataError::BadJson {
            path: shown.to_path_buf(),
            message: format!("not UTF-8 text ({e})"),
        })?
    };
    if stem.ends_with(".json") {
        let trimmed = text.trim_start();
        // Some ".json" files are really JSON Lines; treat them so when they do not parse whole.
        if trimmed.starts_with('[') || trimmed.starts_with('{') {
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Array(items)) => {
                    return Ok(items
                        .into_iter()
                        .map(|value| Record { value, line: 0 })
                        .collect())
                }
                Ok(Value::Object(mut o)) => {
                    if let Some(Value::Array(items)) = o.remove("data") {
                        return Ok(items
                            .into_iter()
                            .map(|value| Record { value, line: 0 })
                            .collect());
                    }
                    return Ok(vec![Record {
                        value: Value::Object(o),
                        line: 0,
                    }]);
                }
                Ok(_) => {
                    return Err(DataError::BadJson {
                        path: shown.to_path_buf(),
                        message: "expected an array of records".into(),
                    })
                }
                Err(e) if trimmed.starts_with('[') => {
                    return Err(DataError::BadJson {
                        path: shown.to_path_buf(),
                        message: e.to_string(),
                    })
                }
                Err(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| DataError::BadJsonLine {
            path: shown.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push(Record { value, line: i + 1 });
    }
    Ok(out)
}

fn read_parquet(path: &Path, shown: &Path) -> Result<Vec<Record>, DataError> {
    use parquet::file::reader::SerializedFileReader;
    let bad = |message: String| DataError::BadJson {
        path: shown.to_path_buf(),
        message: format!("not a readable Parquet file: {message}"),
    };
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: shown.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::try_from(file).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for row in reader {
        let row = row.map_err(|e| bad(e.to_string()))?;
        out.push(Record {
            value: row.to_json_value(),
            line: 0,
        });
    }
    Ok(out)
}
