//! Where the live file source's files are: a local folder (or one file), an S3 bucket (AWS or any
//! S3-compatible store) or a Google Cloud Storage bucket, through the `object_store` crate. It
//! lists files with a version tag (ETag or generation, size and modification time together) and
//! reads them in ranges. Credentials come from the environment or a file and are never logged.
//! A location that cannot be opened is a configuration error; a listing or a read that fails
//! once it is open is transient (the file system or the bucket is an outside system, and the
//! next listing tries again).

use crate::error::ConnectorError;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One file as a listing sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// The path relative to the location's root (`2024/q.csv`): the file's name in IDs.
    pub name: String,
    pub size: u64,
    /// Changes whenever the file does: the store's version tag (ETag or generation), the size
    /// and the modification time, joined.
    pub tag: String,
}

/// Settings for an object store, from the topology.
#[derive(Clone, Debug, Default)]
pub struct StoreSettings {
    /// An S3-compatible endpoint (`http://127.0.0.1:19000`), or a GCS base URL.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// A GCS service-account file (or, for S3, nothing: keys come from `AWS_*` variables).
    pub credentials_file: Option<String>,
}

/// A location files are listed and read from.
pub enum Store {
    Local {
        root: PathBuf,
        /// The location names a single file.
        single: bool,
    },
    Object {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        url: String,
        runtime: Arc<tokio::runtime::Runtime>,
    },
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Splits `s3://bucket/some/prefix` into its scheme, bucket and prefix.
pub fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return None;
    }
    Some((scheme, bucket, prefix.trim_matches('/')))
}

impl Store {
    /// Opens `location`: a local path, or `s3://bucket/prefix` or `gs://bucket/prefix`. A
    /// missing path, a bad URL or bad bucket settings are configuration errors.
    pub fn open(location: &str, settings: &StoreSettings) -> Result<Store, ConnectorError> {
        if !location.contains("://") || location.starts_with("file://") {
            let path = PathBuf::from(location.trim_start_matches("file://"));
            if !path.exists() {
                return Err(ConnectorError::config(format!("`{}` does not exist", path.display())));
            }
            let single = path.is_file();
            return Ok(Store::Local { root: path, single });
        }
        let Some((scheme, bucket, prefix)) = split_url(location) else {
            return Err(ConnectorError::config(format!("`{location}` is not a bucket URL; use s3://bucket/prefix or gs://bucket/prefix")));
        };
        let store: Arc<dyn ObjectStore> = match scheme {
            "s3" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
                if let Some(e) = &settings.endpoint {
                    b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
                }
                if let Some(r) = &settings.region {
                    b = b.with_region(r);
                }
                Arc::new(b.build().map_err(|e| ConnectorError::config(format!("cannot set up S3 for bucket {bucket}: {}", redact(&e.to_string()))))?)
            }
            "gs" => {
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
                if let Some(f) = &settings.credentials_file {
                    b = b.with_service_account_path(f);
                }
                if let Some(e) = &settings.endpoint {
                    b = b.with_base_url(e);
                }
                Arc::new(b.build().map_err(|e| ConnectorError::config(format!("cannot set up GCS for bucket {bucket}: {}", redact(&e.to_string()))))?)
            }
            other => return Err(ConnectorError::config(format!("`{other}://` is not a store sluice reads; use a local path, s3:// or gs://"))),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ConnectorError::internal(format!("cannot start an I/O runtime: {e}")))?;
        Ok(Store::Object { store, prefix: ObjectPath::from(prefix), url: location.trim_end_matches('/').to_string(), runtime: Arc::new(runtime) })
    }

    /// The location, for people and for checkpoint scopes (no credentials in it).
    pub fn describe(&self) -> String {
        match self {
            Store::Local { root, .. } => root.display().to_string(),
            Store::Object { url, .. } => url.clone(),
        }
    }

    /// Every file under the location whose name ends with `suffix`, sorted by name. A listing
    /// that fails cannot be trusted now: transient.
    pub fn list(&self, suffix: &str) -> Result<Vec<Listed>, ConnectorError> {
        let mut out = match self {
            Store::Local { root, single } => list_local(root, *single, suffix)?,
            Store::Object { store, prefix, runtime, url } => {
                use futures_util::TryStreamExt;
                let prefix_opt = if prefix.as_ref().is_empty() { None } else { Some(prefix) };
                let metas: Vec<object_store::ObjectMeta> = runtime
                    .block_on(store.list(prefix_opt).try_collect())
                    .map_err(|e| ConnectorError::unreachable(format!("cannot list {url}: {}", redact(&e.to_string()))))?;
                let strip = if prefix.as_ref().is_empty() { String::new() } else { format!("{}/", prefix.as_ref()) };
                metas
                    .into_iter()
                    .filter(|m| m.location.as_ref().ends_with(suffix))
                    .map(|m| {
                        let name = m.location.as_ref().strip_prefix(&strip).unwrap_or(m.location.as_ref()).to_string();
                        let version = m.version.or(m.e_tag).unwrap_or_default();
                        Listed { name, size: m.size, tag: format!("{version}|{}|{}", m.size, m.last_modified.timestamp_millis()) }
                    })
                    .collect()
            }
        };
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The local path of `name`, for a local location.
    pub fn local_path(&self, name: &str) -> Option<PathBuf> {
        match self {
            Store::Local { root, single } => Some(if *single { root.clone() } else { root.join(name) }),
            Store::Object { .. } => None,
        }
    }

    /// The whole of `name`, fetched in ranges (formats that need random access, from a bucket).
    /// Errors as for [`Store::reader`] and [`FileReader::read_into`].
    pub fn read_all(&self, name: &str, size: u64) -> Result<Vec<u8>, ConnectorError> {
        let mut reader = self.reader(name, size)?;
        let mut buf = Vec::new();
        while reader.read_into(&mut buf)? > 0 {}
        Ok(buf)
    }

    /// Opens `name` (a name from [`Store::list`]) for reading from its start; an object is read
    /// up to the `size` its listing gave. A listed file that cannot be opened changed or went
    /// away since: transient, the next listing decides.
    pub fn reader(&self, name: &str, size: u64) -> Result<FileReader, ConnectorError> {
        match self {
            Store::Local { root, single } => {
                let path = if *single { root.clone() } else { root.join(name) };
                let file = std::fs::File::open(&path).map_err(|e| ConnectorError::unreachable(format!("cannot open {}: {e}", path.display())))?;
                Ok(FileReader::Local(file))
            }
            Store::Object { store, prefix, runtime, .. } => {
                let location = if prefix.as_ref().is_empty() { ObjectPath::from(name) } else { ObjectPath::from(format!("{}/{name}", prefix.as_ref())) };
                Ok(FileReader::Object { store: store.clone(), location, runtime: runtime.clone(), at: 0, size })
            }
        }
    }
}

/// The local listing behind [`Store::list`]; every failure is transient.
fn list_local(root: &Path, single: bool, suffix: &str) -> Result<Vec<Listed>, ConnectorError> {
    let failed = |what: &str, path: &Path, e: std::io::Error| ConnectorError::unreachable(format!("cannot {what} {}: {e}", path.display()));
    let tag = |m: &std::fs::Metadata| {
        use std::os::unix::fs::MetadataExt;
        format!("{}:{}|{}|{}.{}", m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec())
    };
    if single {
        let m = std::fs::metadata(root).map_err(|e| failed("read", root, e))?;
        let name = root.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        return Ok(vec![Listed { name, size: m.len(), tag: tag(&m) }]);
    }
    // Folders are followed through symbolic links only inside the root, and each folder once
    // (by device and inode): a link to `..` or to the root itself is not a loop.
    use std::os::unix::fs::MetadataExt;
    let canonical = std::fs::canonicalize(root).map_err(|e| failed("list", root, e))?;
    let mut visited: std::collections::HashSet<(u64, u64)> = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let m = std::fs::metadata(&dir).map_err(|e| failed("list", &dir, e))?;
        if !visited.insert((m.dev(), m.ino())) {
            continue;
        }
        let entries = std::fs::read_dir(&dir).map_err(|e| failed("list", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| failed("list", &dir, e))?;
            let path = entry.path();
            let m = match std::fs::metadata(&path) {
                Ok(m) => m,
                // Removed since the folder was read, or a link to nothing: not a file here.
                // A file that stays missing is removed once that has settled.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // Anything else (permissions, I/O): the listing cannot be trusted.
                Err(e) => return Err(failed("read", &path, e)),
            };
            if m.is_dir() {
                let linked = entry.file_type().map(|t| t.is_symlink()).unwrap_or(false);
                if linked && !std::fs::canonicalize(&path).is_ok_and(|target| target.starts_with(&canonical) && target != canonical) {
                    continue;
                }
                dirs.push(path);
            } else if m.is_file() && path.to_string_lossy().ends_with(suffix) {
                let name = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().to_string();
                out.push(Listed { name, size: m.len(), tag: tag(&m) });
            }
        }
    }
    Ok(out)
}

/// Takes anything that looks like a secret out of an error message.
pub fn redact(message: &str) -> String {
    let mut out = message.to_string();
    for key in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"] {
        if let Ok(v) = std::env::var(key) {
            if v.len() >= 4 {
                out = out.replace(&v, "***");
            }
        }
    }
    out
}

/// Bytes fetched from an object store per request.
const RANGE: u64 = 8 << 20;

/// Reads one file in chunks.
pub enum FileReader {
    Local(std::fs::File),
    Object {
        store: Arc<dyn ObjectStore>,
        location: ObjectPath,
        runtime: Arc<tokio::runtime::Runtime>,
        at: u64,
        size: u64,
    },
    /// Nothing to read (a file that went away).
    Empty,
}

impl FileReader {
    /// Appends the next chunk to `buf`; `Ok(0)` at the end of the file. A failed read is
    /// transient (the file changed under the reader, or the bucket did not answer).
    pub fn read_into(&mut self, buf: &mut Vec<u8>) -> Result<usize, ConnectorError> {
        match self {
            FileReader::Local(f) => {
                let len = buf.len();
                buf.resize(len + (1 << 20), 0);
                let n = f.read(&mut buf[len..]).map_err(|e| ConnectorError::unreachable(format!("read failed: {e}")));
                buf.truncate(len + *n.as_ref().unwrap_or(&0));
                n
            }
            FileReader::Empty => Ok(0),
            FileReader::Object { store, location, runtime, at, size } => {
                if *at >= *size {
                    return Ok(0);
                }
                let end = (*at + RANGE).min(*size);
                let bytes = runtime
                    .block_on(store.get_range(location, *at..end))
                    .map_err(|e| ConnectorError::unreachable(format!("read failed: {}", redact(&e.to_string()))))?;
                if bytes.is_empty() {
                    *at = *size;
                    return Ok(0);
                }
                *at += bytes.len() as u64;
                buf.extend_from_slice(&bytes);
                Ok(bytes.len())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_loop_or_a_link_out_of_the_root_is_not_followed_and_a_dangling_link_is_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("watched");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(dir.path().join("outside.csv"), "x\n1\n").unwrap();
        std::fs::write(root.join("a.csv"), "x\n1\n").unwrap();
        std::fs::write(root.join("sub/b.csv"), "x\n2\n").unwrap();
        std::os::unix::fs::symlink("..", root.join("up")).unwrap();
        std::os::unix::fs::symlink(&root, root.join("self")).unwrap();
        std::os::unix::fs::symlink(root.join("sub"), root.join("sub-again")).unwrap();
        std::os::unix::fs::symlink(root.join("gone.csv"), root.join("dangling.csv")).unwrap();
        let store = Store::open(root.to_str().unwrap(), &StoreSettings::default()).unwrap();
        let started = std::time::Instant::now();
        let listed = store.list(".csv").unwrap();
        let names: Vec<&str> = listed.iter().map(|l| l.name.as_str()).collect();
        // `sub` is listed once, through itself or its link, whichever comes first.
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"a.csv"));
        assert!(names.iter().any(|n| n.ends_with("b.csv")));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn bucket_urls_split_into_scheme_bucket_and_prefix() {
        assert_eq!(split_url("s3://b/x/y/"), Some(("s3", "b", "x/y")));
        assert_eq!(split_url("gs://b"), Some(("gs", "b", "")));
        assert_eq!(split_url("s3:///x"), None);
    }

    #[test]
    fn a_local_folder_lists_recursively_with_tags_that_change_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("2024")).unwrap();
        std::fs::write(dir.path().join("a.csv"), "x\n1\n").unwrap();
        std::fs::write(dir.path().join("2024/b.csv"), "x\n2\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "skip").unwrap();
        let store = Store::open(dir.path().to_str().unwrap(), &StoreSettings::default()).unwrap();
        let listed = store.list(".csv").unwrap();
        assert_eq!(listed.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), vec!["2024/b.csv", "a.csv"]);
        std::fs::write(dir.path().join("a.csv"), "x\n1\n3\n").unwrap();
        let again = store.list(".csv").unwrap();
        assert_ne!(again[1].tag, listed[1].tag, "a changed file has a new tag");
        assert_eq!(again[0].tag, listed[0].tag, "an unchanged one keeps its tag");
        let mut r = store.reader("a.csv", 0).unwrap();
        let mut buf = Vec::new();
        while r.read_into(&mut buf).unwrap() > 0 {}
        assert_eq!(buf, b"x\n1\n3\n");
    }
}
