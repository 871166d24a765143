//! The file layer under the journal: a directory of segment files, seen
//! through [`Disk`] so that tests and the cluster simulation can run the
//! journal on [`MemDisk`], a disk that loses what was not synced when it
//! "crashes" and can be told to fail `fsync` (in the manner of LazyFS).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// What the journal needs of a directory of files.
pub trait Disk {
    /// The names of the files in the directory (any order).
    fn list(&self) -> io::Result<Vec<String>>;
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Appends to `name`, creating it if needed. Not durable before
    /// [`Disk::sync`].
    fn append(&mut self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// Makes everything appended to `name` durable (`fdatasync`), and the
    /// file's existence too when it is new.
    fn sync(&mut self, name: &str) -> io::Result<()>;
    /// Cuts `name` to `len` bytes, durably.
    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()>;
    /// Renames `from` to `to`, durably.
    fn rename(&mut self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&mut self, name: &str) -> io::Result<()>;
}

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("data directory {dir} is in use by another process ({holder}); stop it, or give this node another directory")]
    Locked { dir: PathBuf, holder: String },
    #[error("data directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A real directory. It holds an exclusive lock on `LOCK` (with the
/// holder's pid written in it) for as long as it lives, so a second
/// process on the same directory fails at once.
pub struct DirDisk {
    dir: PathBuf,
    _lock: File,
    /// The file being appended to, kept open.
    open: Option<(String, File)>,
    /// Files created since the directory was last synced.
    unsynced_entries: bool,
}

/// The lock file's name; never a segment.
pub const LOCK_FILE: &str = "LOCK";

impl DirDisk {
    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens (creating) `dir` and locks it.
    pub fn open(dir: &Path) -> Result<DirDisk, DirError> {
        let io_err = |source| DirError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_err)?;
        let path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        // Fully qualified: std's own `File::try_lock` is newer than this
        // crate's minimum Rust version.
        if fs4::FileExt::try_lock(&lock).is_err() {
            let holder = fs::read_to_string(&path)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .map_or_else(|| "unknown pid".to_string(), |pid| format!("pid {pid}"));
            return Err(DirError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        lock.set_len(0).map_err(io_err)?;
        writeln!(lock, "{}", std::process::id()).map_err(io_err)?;
        Ok(DirDisk {
            dir: dir.to_path_buf(),
            _lock: lock,
            open: None,
            unsynced_entries: false,
        })
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()?;
        self.unsynced_entries = false;
        Ok(())
    }

    fn file(&mut self, name: &str) -> io::Result<&mut File> {
        if self.open.as_ref().is_none_or(|(n, _)| n != name) {
            let path = self.dir.join(name);
            let existed = path.exists();
            let f = OpenOptions::new().append(true).create(true).open(path)?;
            self.unsynced_entries |= !existed;
            self.open = Some((name.to_string(), f));
        }
        match &mut self.open {
            Some((_, f)) => Ok(f),
            None => Err(io::Error::other("no open file")),
        }
    }
}

impl Disk for DirDisk {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_string());
                }
            }
        }
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        fs::read(self.dir.join(name))
    }

    fn append(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.file(name)?.write_all(bytes)
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        self.file(name)?.sync_data()?;
        if self.unsynced_entries {
            self.sync_dir()?;
        }
        Ok(())
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        self.open = None;
        let f = OpenOptions::new().write(true).open(self.dir.join(name))?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        self.open = None;
        fs::rename(self.dir.join(from), self.dir.join(to))?;
        self.sync_dir()
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        if self.open.as_ref().is_some_and(|(n, _)| n == name) {
            self.open = None;
        }
        fs::remove_file(self.dir.join(name))?;
        self.sync_dir()
    }
}

/// A disk in memory that remembers what was synced: [`MemDisk::crash`]
/// keeps only that, as a power cut would, and [`MemDisk::fail_syncs`]
/// makes `sync` fail from then on.
#[derive(Default, Clone)]
pub struct MemDisk {
    /// Per file: the bytes written, and how many of them are durable
    /// (`None`: the file itself is not durable yet).
    files: BTreeMap<String, (Vec<u8>, Option<usize>)>,
    failing: bool,
    /// `sync` calls that succeeded.
    pub syncs: u64,
}

impl MemDisk {
    /// What survives a power cut: the synced part of every synced file.
    pub fn crash(&mut self) {
        self.files.retain(|_, (_, synced)| synced.is_some());
        for (bytes, synced) in self.files.values_mut() {
            bytes.truncate(synced.unwrap_or(0));
        }
    }

    /// Every `sync` fails from now on.
    pub fn fail_syncs(&mut self) {
        self.failing = true;
    }

    /// A file's bytes, for tests that damage them.
    pub fn bytes_mut(&mut self, name: &str) -> Option<&mut Vec<u8>> {
        self.files.get_mut(name).map(|(b, _)| b)
    }
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, name.to_string())
}

impl Disk for MemDisk {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.files.keys().cloned().collect())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        self.files
            .get(name)
            .map(|(b, _)| b.clone())
            .ok_or_else(|| not_found(name))
    }

    fn append(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.files
            .entry(name.to_string())
            .or_default()
            .0
            .extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&mut self, name: &str) -> io::Result<()> {
        if self.failing {
            return Err(io::Error::other("injected fsync failure"));
        }
        let (bytes, synced) = self.files.get_mut(name).ok_or_else(|| not_found(name))?;
        *synced = Some(bytes.len());
        self.syncs += 1;
        Ok(())
    }

    fn truncate(&mut self, name: &str, len: u64) -> io::Result<()> {
        let (bytes, synced) = self.files.get_mut(name).ok_or_else(|| not_found(name))?;
        bytes.truncate(len as usize);
        *synced = Some(bytes.len());
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        let file = self.files.remove(from).ok_or_else(|| not_found(from))?;
        self.files.insert(to.to_string(), file);
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        self.files
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| not_found(name))
    }
}
