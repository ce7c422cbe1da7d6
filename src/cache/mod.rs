//! The content-addressed object store: one immutable directory per finished stage, published
//! atomically, with a manifest of every file it holds, a lock per key, and the SQLite index.
//!
//! Knows nothing about what stages compute; it stores directories under keys.

mod index;

pub use index::{FileHashCache, Index, RunRecord, StageRecord, Stamp};

use crate::hash::{hash_file, Digest, KeyHasher};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{}", crate::ioerr::describe("cache I/O on", path, source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing into the cache failed (a full disk says so).
    #[error("{}", crate::ioerr::describe("cannot write", path, source))]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache manifest {path} is unreadable: {message}")]
    BadManifest { path: PathBuf, message: String },
    #[error("cache index {path}: {}", describe_sql(source))]
    Sql {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

pub(crate) fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// SQLite's errors, with a full disk or an I/O failure said as a failed write.
fn describe_sql(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
            format!("cannot write: {}", crate::ioerr::NO_SPACE)
        }
        rusqlite::Error::SqliteFailure(f, m) if f.code == rusqlite::ErrorCode::SystemIoFailure => {
            format!(
                "cannot write (I/O error{}); if the disk is full, {}",
                m.as_deref().map(|m| format!(": {m}")).unwrap_or_default(),
                crate::ioerr::NO_SPACE
            )
        }
        e => e.to_string(),
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file of a published entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestFile {
    pub path: String,
    pub size: u64,
    pub blake3: Digest,
}

/// What a finished entry holds. `digest` hashes the sorted file list (path, size, blake3): it is
/// the entry's output identity, which downstream keys hash (early cutoff).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub key: String,
    pub name: String,
    pub kind: String,
    pub files: Vec<ManifestFile>,
    pub digest: Digest,
}

impl Manifest {
    pub fn digest_of(files: &[ManifestFile]) -> Digest {
        let mut h = KeyHasher::new();
        h.u64(files.len() as u64);
        for f in files {
            h.str(&f.path).u64(f.size).str(&f.blake3);
        }
        h.finish()
    }

    /// Digest over a subset of the files (those whose path is in `names`, in sorted order).
    /// Used by stages that read only some of an upstream's files (tokenize reads the tokenizer,
    /// not the weights).
    pub fn digest_of_selected(&self, names: &[&str]) -> Digest {
        let sel: Vec<ManifestFile> = self
            .files
            .iter()
            .filter(|f| names.contains(&f.path.as_str()))
            .cloned()
            .collect();
        Self::digest_of(&sel)
    }

    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

pub const MANIFEST: &str = "manifest.json";

/// A cache rooted at a directory: `objects/<key>/`, `tmp/`, `locks/`, `kiln.db`.
pub struct Cache {
    root: PathBuf,
}

/// Exclusive hold on one key; released on drop.
pub struct KeyLock {
    _file: File,
}

/// A build directory for one key; becomes an entry on `publish`, is removed on drop otherwise.
pub struct Staging {
    dir: PathBuf,
    key: String,
    published: bool,
}

impl Staging {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The result of re-hashing an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    Missing(String),
    SizeChanged(String),
    HashChanged(String),
    ManifestUnreadable(String),
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Missing(p) => write!(f, "{p}: missing"),
            Damage::SizeChanged(p) => write!(f, "{p}: size changed"),
            Damage::HashChanged(p) => write!(f, "{p}: content changed (blake3 mismatch)"),
            Damage::ManifestUnreadable(m) => write!(f, "manifest unreadable: {m}"),
        }
    }
}

impl Cache {
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        for sub in ["objects", "tmp", "locks", "quarantine", "work"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn index(&self) -> Result<Index, CacheError> {
        Index::open(&self.root.join("kiln.db"))
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join("objects").join(key)
    }

    /// The manifest of a finished entry, or None when no entry is published under `key`.
    pub fn manifest(&self, key: &str) -> Result<Option<Manifest>, CacheError> {
        let path = self.entry_dir(key).join(MANIFEST);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| CacheError::BadManifest {
                        path,
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::Io { path, source: e }),
        }
    }

    /// Resumable state of a key's build (checkpoints). Kept across interrupted runs, so the next
    /// build of the same key continues; removed when the entry is published.
    pub fn work_dir(&self, key: &str) -> Result<PathBuf, CacheError> {
        let p = self.root.join("work").join(key);
        fs::create_dir_all(&p).map_err(io_err(&p))?;
        Ok(p)
    }

    pub fn remove_work_dir(&self, key: &str) {
        let _ = fs::remove_dir_all(self.root.join("work").join(key));
    }

    pub fn lock(&self, key: &str) -> Result<KeyLock, CacheError> {
        let path = self.root.join("locks").join(format!("{key}.lock"));
        let file = File::create(&path).map_err(io_err(&path))?;
        file.lock().map_err(io_err(&path))?;
        Ok(KeyLock { _file: file })
    }

    pub fn staging(&self, key: &str) -> Result<Staging, CacheError> {
        let dir = self
            .root
            .join("tmp")
            .join(format!("{key}.{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        fs::create_dir_all(&dir).map_err(write_err(&dir))?;
        Ok(Staging {
            dir,
            key: key.to_string(),
            published: false,
        })
    }

    /// Hashes every file in the staging directory, writes the manifest, fsyncs, and renames the
    /// directory into `objects/<key>`. An existing entry under the key (a forced rebuild) is moved
    /// aside first and removed after.
    pub fn publish(
        &self,
        mut staging: Staging,
        name: &str,
        kind: &str,
    ) -> Result<Manifest, CacheError> {
        let mut files = Vec::new();
        collect_files(&staging.dir, &staging.dir, &mut files)?;
        files.sort();
        let mut entries = Vec::with_capacity(files.len());
        for rel in files {
            let p = staging.dir.join(&rel);
            let f = File::open(&p).map_err(io_err(&p))?;
            f.sync_all().map_err(write_err(&p))?;
            let md = f.metadata().map_err(io_err(&p))?;
            let size = md.len();
            // Entries are immutable: their files are read-only, so a hard link to one from
            // `output_dir` cannot be edited in place by accident.
            let mut perm = md.permissions();
            if !perm.readonly() {
                perm.set_readonly(true);
                fs::set_permissions(&p, perm).map_err(io_err(&p))?;
            }
            entries.push(ManifestFile {
                blake3: hash_file(&p).map_err(io_err(&p))?,
                path: rel,
                size,
            });
        }
        let manifest = Manifest {
            key: staging.key.clone(),
            name: name.to_string(),
            kind: kind.to_string(),
            digest: Manifest::digest_of(&entries),
            files: entries,
        };
        let mpath = staging.dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| CacheError::BadManifest {
            path: mpath.clone(),
            message: e.to_string(),
        })?;
        let mut f = File::create(&mpath).map_err(write_err(&mpath))?;
        f.write_all(&json).map_err(write_err(&mpath))?;
        f.sync_all().map_err(write_err(&mpath))?;
        sync_dir(&staging.dir);

        let dest = self.entry_dir(&staging.key);
        let mut displaced = None;
        if dest.exists() {
            let aside =
                self.root
                    .join("tmp")
                    .join(format!("{}.old.{}", staging.key, std::process::id()));
            fs::rename(&dest, &aside).map_err(io_err(&dest))?;
            displaced = Some(aside);
        }
        fs::rename(&staging.dir, &dest).map_err(write_err(&dest))?;
        staging.published = true;
        sync_dir(&self.root.join("objects"));
        if let Some(old) = displaced {
            let _ = fs::remove_dir_all(old);
        }
        Ok(manifest)
    }

    /// Re-hashes every file of an entry against its manifest.
    pub fn verify(&self, key: &str) -> Vec<Damage> {
        let manifest = match self.manifest(key) {
            Ok(Some(m)) => m,
            Ok(None) => return vec![Damage::Missing(MANIFEST.into())],
            Err(e) => return vec![Damage::ManifestUnreadable(e.to_string())],
        };
        self.verify_files(key, &manifest, None)
    }

    /// Re-hashes the named files (all when `only` is None) of an entry.
    pub fn verify_files(&self, key: &str, m: &Manifest, only: Option<&[&str]>) -> Vec<Damage> {
        self.check_files(key, m, only, None)
    }

    /// As [`Cache::verify_files`], but a file whose [`Stamp`] (size, mtime, ctime, inode) is
    /// the one it had when last verified is not re-read: what consumers of an entry call (a
    /// stage reading its inputs, `output_dir`, a model loaded for chat), so an unchanged entry
    /// costs one `stat` and one index lookup per file.
    pub fn verify_files_stamped(
        &self,
        key: &str,
        m: &Manifest,
        only: Option<&[&str]>,
        index: &Index,
    ) -> Vec<Damage> {
        self.check_files(key, m, only, Some(index))
    }

    fn check_files(
        &self,
        key: &str,
        m: &Manifest,
        only: Option<&[&str]>,
        index: Option<&Index>,
    ) -> Vec<Damage> {
        let dir = self.entry_dir(key);
        let mut damage = Vec::new();
        for f in &m.files {
            if let Some(only) = only {
                if !only.contains(&f.path.as_str()) {
                    continue;
                }
            }
            let p = dir.join(&f.path);
            let md = match fs::metadata(&p) {
                Err(_) => {
                    damage.push(Damage::Missing(f.path.clone()));
                    continue;
                }
                Ok(md) if md.len() != f.size => {
                    damage.push(Damage::SizeChanged(f.path.clone()));
                    continue;
                }
                Ok(md) => md,
            };
            let abs = std::path::absolute(&p).unwrap_or_else(|_| p.clone());
            let stamp = Stamp::of(&md);
            if let Some(ix) = index {
                if ix.verified_digest(&abs, stamp).ok().flatten().as_deref() == Some(&f.blake3) {
                    continue;
                }
            }
            match hash_file(&p) {
                Ok(h) if h == f.blake3 => {
                    if let Some(ix) = index {
                        // Best effort: a failed write only means the next check re-reads.
                        let _ = ix.record_verified(&abs, stamp, &h);
                    }
                }
                _ => damage.push(Damage::HashChanged(f.path.clone())),
            }
        }
        damage
    }

    /// Moves a damaged entry out of `objects/` so the next run rebuilds it.
    pub fn quarantine(&self, key: &str) -> Result<(), CacheError> {
        let src = self.entry_dir(key);
        // Unique per quarantine: the same key can be quarantined twice within a second.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let dst = self.root.join("quarantine").join(format!(
            "{key}.{}.{:09}.{}",
            now.as_secs(),
            now.subsec_nanos(),
            std::process::id()
        ));
        fs::rename(&src, &dst).map_err(io_err(&src))
    }

    /// Every published key.
    pub fn keys(&self) -> Result<Vec<String>, CacheError> {
        let dir = self.root.join("objects");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            if let Some(name) = e.file_name().to_str() {
                out.push(name.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes one entry (gc).
    pub fn remove(&self, key: &str) -> Result<(), CacheError> {
        let _lock = self.lock(key)?;
        let dir = self.entry_dir(key);
        // Rename first so a reader never sees a half-deleted entry that still has a manifest.
        let doomed = self.root.join("tmp").join(format!("{key}.gc"));
        fs::rename(&dir, &doomed).map_err(io_err(&dir))?;
        fs::remove_dir_all(&doomed).map_err(io_err(&doomed))
    }

    /// Leftovers of interrupted builds: staging directories whose process is gone.
    pub fn clean_tmp(&self) -> Result<u64, CacheError> {
        let dir = self.root.join("tmp");
        let mut removed = 0;
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let name = e.file_name().to_string_lossy().to_string();
            let pid = name.rsplit('.').next().and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                let _ = fs::remove_dir_all(e.path());
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn collect_files(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), CacheError> {
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let p = e.path();
        if p.is_dir() {
            collect_files(base, &p, out)?;
        } else if let Ok(rel) = p.strip_prefix(base) {
            let rel = rel.to_string_lossy().replace('\\', "/");
            if rel != MANIFEST {
                out.push(rel);
            }
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Size of a directory tree in bytes.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += dir_size(&p);
            } else if let Ok(md) = e.metadata() {
                total += md.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_verify_and_detect_a_flipped_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let st = cache.staging("k1").unwrap();
        fs::write(st.dir().join("a.bin"), b"hello").unwrap();
        let m = cache.publish(st, "s", "pack").unwrap();
        assert_eq!(m.files.len(), 1);
        assert!(cache.verify("k1").is_empty());
        fs::write(cache.entry_dir("k1").join("a.bin"), b"hellp").unwrap();
        assert_eq!(
            cache.verify("k1"),
            vec![Damage::HashChanged("a.bin".into())]
        );
    }

    #[test]
    fn dropped_staging_leaves_no_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        {
            let st = cache.staging("k2").unwrap();
            fs::write(st.dir().join("a.bin"), b"x").unwrap();
        }
        assert!(cache.manifest("k2").unwrap().is_none());
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);
    }
}
