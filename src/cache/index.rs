//! The SQLite index beside the objects: stage records, what each config last saw per stage name
//! (for stale reasons), runs, metrics, and the size+mtime fast path for file hashes.

use super::CacheError;
use crate::hash::{hash_file, Digest};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};

pub struct Index {
    conn: Connection,
    path: PathBuf,
}

/// One stage as recorded when it was built or found fresh: everything its key hashed.
#[derive(Debug, Clone, PartialEq)]
pub struct StageRecord {
    pub key: String,
    pub name: String,
    pub kind: String,
    pub version: u32,
    pub params: serde_json::Value,
    pub inputs: serde_json::Value,
    pub upstream: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: i64,
    pub config: String,
    /// The sweep variant(s) the run covered ("" for a plain config).
    pub variant: String,
    pub started: i64,
    pub finished: Option<i64>,
    pub outcome: String,
    pub built: i64,
    pub reused: i64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stages(
  key TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, version INTEGER NOT NULL,
  params TEXT NOT NULL, inputs TEXT NOT NULL, upstream TEXT NOT NULL, digest TEXT NOT NULL,
  created INTEGER NOT NULL, duration_ms INTEGER NOT NULL, size INTEGER NOT NULL, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS seen(
  config TEXT NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL,
  version INTEGER NOT NULL, params TEXT NOT NULL, inputs TEXT NOT NULL, upstream TEXT NOT NULL,
  at INTEGER NOT NULL, PRIMARY KEY(config, name));
CREATE TABLE IF NOT EXISTS runs(
  id INTEGER PRIMARY KEY AUTOINCREMENT, config TEXT NOT NULL, variant TEXT NOT NULL DEFAULT '',
  started INTEGER NOT NULL, finished INTEGER, outcome TEXT NOT NULL, built INTEGER NOT NULL DEFAULT 0,
  reused INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS edges(
  key TEXT NOT NULL, upstream TEXT NOT NULL, PRIMARY KEY(key, upstream));
CREATE INDEX IF NOT EXISTS edges_up ON edges(upstream);
CREATE TABLE IF NOT EXISTS metrics(
  stage_key TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, value REAL NOT NULL);
CREATE INDEX IF NOT EXISTS metrics_key ON metrics(stage_key, name, step);
CREATE TABLE IF NOT EXISTS file_hashes(
  path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, blake3 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS verified(
  path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
  ino INTEGER NOT NULL, blake3 TEXT NOT NULL);
";

/// What a file looked like when its digest was checked: a write, truncation, chmod, touch or a
/// file renamed over it changes at least one of these (ctime cannot be set from user space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub size: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: i64,
}

impl Stamp {
    pub fn of(md: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            size: md.len() as i64,
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            ino: md.ino() as i64,
        }
    }

    /// Changed in the last two seconds: it may change again within the same timestamp tick
    /// ("racily clean", as git calls it), so a check of it is not remembered.
    fn racy(&self) -> bool {
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        now_ns - self.mtime_ns.max(self.ctime_ns) < 2_000_000_000
    }
}

pub(crate) fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Index {
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let sql = |source| CacheError::Sql {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(sql)?;
        // Switching to WAL and creating the schema take locks for which SQLite does not always
        // call the busy handler (two kiln processes opening a new cache at once): retry those.
        let mut attempt = 0;
        loop {
            let setup = conn
                .pragma_update(None, "journal_mode", "WAL")
                .and_then(|_| conn.pragma_update(None, "synchronous", "NORMAL"))
                .and_then(|_| conn.execute_batch(SCHEMA));
            match setup {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && attempt < 300 =>
                {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10 + attempt % 20));
                }
                Err(e) => return Err(sql(e)),
            }
        }
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// The digest a file had when last verified, if it is unchanged since (same [`Stamp`]).
    pub fn verified_digest(&self, path: &Path, stamp: Stamp) -> Result<Option<String>, CacheError> {
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT blake3 FROM verified WHERE path=?1 AND size=?2 AND mtime_ns=?3 AND ctime_ns=?4 AND ino=?5",
            )
            .map_err(self.sql())?;
        q.query_row(
            params![
                path.to_string_lossy(),
                stamp.size,
                stamp.mtime_ns,
                stamp.ctime_ns,
                stamp.ino
            ],
            |r| r.get(0),
        )
        .optional()
        .map_err(self.sql())
    }

    /// Remembers that the file at `path`, as `stamp` describes it, has `digest` (not for a
    /// racily clean file).
    pub fn record_verified(
        &self,
        path: &Path,
        stamp: Stamp,
        digest: &str,
    ) -> Result<(), CacheError> {
        if stamp.racy() {
            return Ok(());
        }
        self.record_own(path, stamp, digest)
    }

    /// As [`Index::record_verified`] for a file kiln itself has just written from verified
    /// bytes (no racy-clean wait: nothing else has had the chance to change it).
    pub fn record_own(&self, path: &Path, stamp: Stamp, digest: &str) -> Result<(), CacheError> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO verified VALUES(?1, ?2, ?3, ?4, ?5, ?6)")
            .and_then(|mut q| {
                q.execute(params![
                    path.to_string_lossy(),
                    stamp.size,
                    stamp.mtime_ns,
                    stamp.ctime_ns,
                    stamp.ino,
                    digest
                ])
            })
            .map_err(self.sql())?;
        Ok(())
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> CacheError + '_ {
        |source| CacheError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    pub fn record_stage(
        &self,
        rec: &StageRecord,
        digest: &str,
        duration_ms: u64,
        size: u64,
        config: &str,
    ) -> Result<(), CacheError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO stages VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)",
                params![
                    rec.key,
                    rec.name,
                    rec.kind,
                    rec.version,
                    rec.params.to_string(),
                    rec.inputs.to_string(),
                    rec.upstream.to_string(),
                    digest,
                    now_secs(),
                    duration_ms as i64,
                    size as i64,
                    config
                ],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    /// Remembers what `config` last used for stage `name`, so the next plan can say what changed.
    pub fn record_seen(&self, config: &str, rec: &StageRecord) -> Result<(), CacheError> {
        self.conn
            .execute(
                // A no-op run sees what the last one saw: leave the row alone (no page is
                // written) unless something changed, or its time is a day old.
                "INSERT INTO seen VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9)
                 ON CONFLICT(config, name) DO UPDATE SET key=excluded.key, kind=excluded.kind,
                   version=excluded.version, params=excluded.params, inputs=excluded.inputs,
                   upstream=excluded.upstream, at=excluded.at
                 WHERE seen.key IS NOT excluded.key OR seen.kind IS NOT excluded.kind
                   OR seen.version IS NOT excluded.version OR seen.params IS NOT excluded.params
                   OR seen.inputs IS NOT excluded.inputs OR seen.upstream IS NOT excluded.upstream
                   OR excluded.at - seen.at > 86400",
                params![
                    config,
                    rec.name,
                    rec.key,
                    rec.kind,
                    rec.version,
                    rec.params.to_string(),
                    rec.inputs.to_string(),
                    rec.upstream.to_string(),
                    now_secs()
                ],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    pub fn last_seen(&self, config: &str, name: &str) -> Result<Option<StageRecord>, CacheError> {
        self.conn
            .query_row(
                "SELECT key, name, kind, version, params, inputs, upstream FROM seen WHERE config=?1 AND name=?2",
                params![config, name],
                row_to_record,
            )
            .optional()
            .map_err(self.sql())
    }

    pub fn stage(&self, key: &str) -> Result<Option<(StageRecord, i64, i64, i64)>, CacheError> {
        self.conn
            .query_row(
                "SELECT key, name, kind, version, params, inputs, upstream, created, duration_ms, size FROM stages WHERE key=?1",
                params![key],
                |r| Ok((row_to_record(r)?, r.get(7)?, r.get(8)?, r.get(9)?)),
            )
            .optional()
            .map_err(self.sql())
    }

    /// Keys that any config's last plan referenced.
    pub fn seen_keys(&self) -> Result<Vec<(String, String, String)>, CacheError> {
        let mut st = self
            .conn
            .prepare("SELECT config, name, key FROM seen")
            .map_err(self.sql())?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.sql())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sql())
    }

    pub fn forget_stage(&self, key: &str) -> Result<(), CacheError> {
        self.conn
            .execute("DELETE FROM stages WHERE key=?1", params![key])
            .map_err(self.sql())?;
        Ok(())
    }

    pub fn start_run(&self, config: &str, variant: &str) -> Result<i64, CacheError> {
        self.conn
            .execute(
                "INSERT INTO runs(config, variant, started, outcome) VALUES(?1, ?2, ?3, 'running')",
                params![config, variant, now_secs()],
            )
            .map_err(self.sql())?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn finish_run(
        &self,
        id: i64,
        outcome: &str,
        built: u64,
        reused: u64,
    ) -> Result<(), CacheError> {
        self.conn
            .execute(
                "UPDATE runs SET finished=?2, outcome=?3, built=?4, reused=?5 WHERE id=?1",
                params![id, now_secs(), outcome, built as i64, reused as i64],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, CacheError> {
        let mut st = self
            .conn
            .prepare("SELECT id, config, variant, started, finished, outcome, built, reused FROM runs ORDER BY id DESC LIMIT ?1")
            .map_err(self.sql())?;
        let rows = st
            .query_map(params![limit as i64], |r| {
                Ok(RunRecord {
                    id: r.get(0)?,
                    config: r.get(1)?,
                    variant: r.get(2)?,
                    started: r.get(3)?,
                    finished: r.get(4)?,
                    outcome: r.get(5)?,
                    built: r.get(6)?,
                    reused: r.get(7)?,
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sql())
    }

    pub fn add_metric(
        &self,
        stage_key: &str,
        step: i64,
        name: &str,
        value: f64,
    ) -> Result<(), CacheError> {
        self.conn
            .execute(
                "INSERT INTO metrics VALUES(?1, ?2, ?3, ?4)",
                params![stage_key, step, name, value],
            )
            .map_err(self.sql())?;
        Ok(())
    }
}

impl Index {
    /// Which entries a stage key was built from (lineage).
    pub fn record_edges(&self, key: &str, upstream: &[String]) -> Result<(), CacheError> {
        for u in upstream {
            self.conn
                .execute(
                    "INSERT OR IGNORE INTO edges VALUES(?1, ?2)",
                    params![key, u],
                )
                .map_err(self.sql())?;
        }
        Ok(())
    }

    /// Keys `key` was built from.
    pub fn upstream_of(&self, key: &str) -> Result<Vec<String>, CacheError> {
        self.strings(
            "SELECT upstream FROM edges WHERE key = ?1 ORDER BY rowid",
            key,
        )
    }

    /// Keys built from `key`.
    pub fn downstream_of(&self, key: &str) -> Result<Vec<String>, CacheError> {
        self.strings(
            "SELECT key FROM edges WHERE upstream = ?1 ORDER BY rowid",
            key,
        )
    }

    /// Configs whose last plan used `key`, with the stage name there.
    pub fn configs_using(&self, key: &str) -> Result<Vec<(String, String)>, CacheError> {
        let mut st = self
            .conn
            .prepare("SELECT config, name FROM seen WHERE key = ?1 ORDER BY config")
            .map_err(self.sql())?;
        let rows = st
            .query_map(params![key], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.sql())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sql())
    }

    fn strings(&self, sql: &str, arg: &str) -> Result<Vec<String>, CacheError> {
        let mut st = self.conn.prepare(sql).map_err(self.sql())?;
        let rows = st
            .query_map(params![arg], |r| r.get(0))
            .map_err(self.sql())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sql())
    }

    /// Every metric recorded for a stage key, in insertion order: (step, name, value).
    pub fn metrics(&self, stage_key: &str) -> Result<Vec<(i64, String, f64)>, CacheError> {
        let mut st = self
            .conn
            .prepare("SELECT step, name, value FROM metrics WHERE stage_key = ?1 ORDER BY rowid")
            .map_err(self.sql())?;
        let rows = st
            .query_map(params![stage_key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(self.sql())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sql())
    }
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<StageRecord> {
    let parse = |s: String| serde_json::from_str(&s).unwrap_or(serde_json::Value::Null);
    Ok(StageRecord {
        key: r.get(0)?,
        name: r.get(1)?,
        kind: r.get(2)?,
        version: r.get(3)?,
        params: parse(r.get(4)?),
        inputs: parse(r.get(5)?),
        upstream: parse(r.get(6)?),
    })
}

/// blake3 of a file with a size+mtime fast path stored in the index. The fast path only skips
/// re-reading an unchanged file; a changed size or mtime always re-hashes.
pub struct FileHashCache<'a> {
    pub index: &'a Index,
}

impl FileHashCache<'_> {
    pub fn hash(&self, path: &Path) -> Result<Digest, CacheError> {
        let md = std::fs::metadata(path).map_err(super::io_err(path))?;
        let size = md.len() as i64;
        let mtime_ns = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let key = path.to_string_lossy().to_string();
        let hit: Option<String> = self
            .index
            .conn
            .query_row(
                "SELECT blake3 FROM file_hashes WHERE path=?1 AND size=?2 AND mtime_ns=?3",
                params![key, size, mtime_ns],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.index.sql())?;
        if let Some(h) = hit {
            return Ok(h);
        }
        let h = hash_file(path).map_err(super::io_err(path))?;
        // A file modified in the last two seconds may change again within the same mtime tick
        // ("racily clean", as git calls it): do not remember its hash.
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        if now_ns - mtime_ns < 2_000_000_000 {
            return Ok(h);
        }
        self.index
            .conn
            .execute(
                "INSERT OR REPLACE INTO file_hashes VALUES(?1, ?2, ?3, ?4)",
                params![key, size, mtime_ns, h],
            )
            .map_err(self.index.sql())?;
        Ok(h)
    }
}
