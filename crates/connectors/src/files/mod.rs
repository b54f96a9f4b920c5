//! Files: the one-shot CSV source (framing and validation in `scan`, parsing with arrow-csv in
//! `csv`), the live file source over folders and buckets (`live`, with its `manifest`s and
//! `store`), and the JSON-lines sink that is the embedded default.

pub mod csv;
pub mod jsonl;
pub mod live;
pub mod manifest;
pub mod scan;
pub mod store;

use crate::error::ConnectorError;
use std::path::{Path, PathBuf};

/// An input file and the name it is known by in IDs and dead letters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct InputFile {
    pub path: PathBuf,
    /// The path relative to the input root (the directory, or the glob's fixed prefix).
    pub name: String,
}

/// Expands a file, a glob or a directory (its `*.csv`, recursively) into a sorted file list. A
/// bad pattern, or one that names no file, is a configuration error.
pub fn expand(spec: &str) -> Result<Vec<InputFile>, ConnectorError> {
    let path = Path::new(spec);
    let mut files = Vec::new();
    if path.is_dir() {
        let pattern = format!("{}/**/*.csv", spec.trim_end_matches('/'));
        for entry in glob::glob(&pattern).map_err(|e| ConnectorError::config(format!("bad directory pattern {pattern}: {e}")))?.flatten() {
            let name = entry.strip_prefix(path).unwrap_or(&entry).display().to_string();
            files.push(InputFile { path: entry, name });
        }
    } else if path.is_file() {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| spec.to_string());
        files.push(InputFile { path: path.to_path_buf(), name });
    } else {
        let root: PathBuf = Path::new(spec).components().take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '['])).collect();
        for entry in glob::glob(spec).map_err(|e| ConnectorError::config(format!("bad glob `{spec}`: {e}")))?.flatten() {
            if entry.is_file() {
                let name = entry.strip_prefix(&root).unwrap_or(&entry).display().to_string();
                files.push(InputFile { path: entry, name });
            }
        }
    }
    if files.is_empty() {
        return Err(ConnectorError::config(format!("no CSV files at `{spec}`")));
    }
    files.sort();
    Ok(files)
}
