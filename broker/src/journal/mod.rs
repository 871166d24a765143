//! The journal (issue 15, first part): an append-only log of checksummed
//! records in segment files, with group commit and recovery. It knows
//! nothing of tasks: a record is bytes the store wrote. `STORAGE.md` says
//! why a journal of our own rather than a key-value engine, the record
//! format and the recovery rules; this file is the reference for them.
//!
//! * **Record**: `len: u32 LE`, `!len: u32 LE` (its complement, so a
//!   damaged length is told from a record cut short), `crc: u32 LE`
//!   (CRC-32C of the four length bytes and the payload), then `len` bytes
//!   of payload; `len` is 1 to [`MAX_RECORD`].
//! * **Segments**: files named `<16 hex digits>.journal`, the number
//!   counting up. A journal opened on a directory always appends to a new
//!   segment, so a torn tail is never written after.
//! * **Group commit**: [`Journal::append`] only buffers;
//!   [`Journal::commit`] writes what is buffered with one `write` and, in
//!   [`Fsync::Always`], one `fdatasync`, whatever the number of records.
//!   Whoever answers clients answers those whose records a commit covered.
//!   A failed `fdatasync` is returned and must end the process: the kernel
//!   may have dropped the data, and a retry can falsely succeed.
//! * **Recovery** ([`Journal::open`]): records are read in order. In the
//!   last segment, a bad record that no intact record follows (a crash in
//!   mid-write leaves a prefix of the last write, maybe zeros after it) is
//!   the torn tail: it is cut off and its bytes counted. Any other bad record stops the open with
//!   [`OpenError::Corrupt`], naming the segment and the offset, unless
//!   [`Options::salvage`] is set: then the journal keeps every record
//!   before the bad one, and sets the damaged segment and those after it
//!   aside (renamed `*.damaged`) rather than delete them.

mod disk;

pub use disk::{DirDisk, DirError, Disk, MemDisk, LOCK_FILE};

use std::io;

/// The largest payload of one record: a task's 1 MiB body and 2 MiB
/// message, with room.
pub const MAX_RECORD: usize = 4 << 20;
/// A segment is closed for appends past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const HEADER: usize = 12;
const SUFFIX: &str = ".journal";

/// When a commit is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After `fdatasync`: survives a power cut.
    Always,
    /// After `write`: survives a crash of the process, not of the machine.
    Never,
}

/// How to open a journal.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub fsync: Fsync,
    /// Start from the last good record past a damaged one.
    pub salvage: bool,
    pub segment_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fsync: Fsync::Always,
            salvage: false,
            segment_bytes: SEGMENT_BYTES,
        }
    }
}

/// Why a journal cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("journal segment {segment} is damaged at byte {offset} ({reason}); to start anyway from the last good record, set the damaged part aside with --salvage-journal")]
    Corrupt {
        segment: String,
        offset: u64,
        reason: &'static str,
    },
    #[error("journal: {0}")]
    Io(#[from] io::Error),
    /// The reader of the records refused one ([`Journal::open_with`]).
    #[error("{0}")]
    Replay(String),
}

/// What an open found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every good record's payload, in order ([`Journal::open`]; empty
    /// with [`Journal::open_with`], which hands them over one by one).
    pub records: Vec<Vec<u8>>,
    /// Good records read.
    pub count: u64,
    /// Bytes of a torn tail cut off the last segment.
    pub torn_bytes: u64,
    /// With `salvage`: where the damage was, and the files set aside.
    pub salvaged: Option<(String, u64, Vec<String>)>,
}

/// An append-only journal on a [`Disk`].
pub struct Journal<D: Disk> {
    disk: D,
    options: Options,
    /// The segment appended to, and its length so far.
    segment: u64,
    segment_len: u64,
    /// Records appended and not yet committed.
    buf: Vec<u8>,
    /// Records appended, and records covered by a commit.
    appended: u64,
    committed: u64,
    /// Every segment on disk and its length, the one appended to included
    /// once written.
    sizes: std::collections::BTreeMap<u64, u64>,
}

fn segment_name(n: u64) -> String {
    format!("{n:016x}{SUFFIX}")
}

fn segment_number(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(SUFFIX)?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// The checksum of a record: its length bytes, then its payload.
fn checksum(len: [u8; 4], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len), payload)
}

/// Where reading a segment stopped.
enum Stop {
    /// At the end of the file.
    End,
    /// At `offset`: a record cut short or zeros to the end of the file.
    Torn(u64),
    /// At `offset`: a record that is not one.
    Bad(u64, &'static str),
}

/// The record at the start of `rest`, if it is an intact one: its total
/// length and payload; else why not.
fn parse(rest: &[u8]) -> Result<(usize, &[u8]), &'static str> {
    if rest.len() < HEADER {
        return Err("a record cut short");
    }
    let len_bytes = [rest[0], rest[1], rest[2], rest[3]];
    let len32 = u32::from_le_bytes(len_bytes);
    let inv = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    let crc = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
    if inv != !len32 {
        return Err("record length damaged");
    }
    let len = len32 as usize;
    if len == 0 || len > MAX_RECORD {
        return Err("impossible record length");
    }
    if rest.len() < HEADER + len {
        return Err("a record cut short");
    }
    let payload = &rest[HEADER..HEADER + len];
    if checksum(len_bytes, payload) != crc {
        return Err("checksum mismatch");
    }
    Ok((HEADER + len, payload))
}

/// Reads the records of one segment into `out`. A bad record is a torn
/// tail when no intact record follows it anywhere in the segment: a crash
/// in mid-write leaves a prefix of the last write (and maybe zeros), never
/// a good record after a bad one. Damage in the middle leaves good records
/// after it.
fn read_segment(
    bytes: &[u8],
    visit: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    count: &mut u64,
) -> Result<Stop, String> {
    let mut at = 0usize;
    while at < bytes.len() {
        match parse(&bytes[at..]) {
            Ok((size, payload)) => {
                visit(payload)?;
                *count += 1;
                at += size;
            }
            Err(reason) => {
                let later = (at + 1..bytes.len()).any(|o| parse(&bytes[o..]).is_ok());
                return Ok(if later {
                    Stop::Bad(at as u64, reason)
                } else {
                    Stop::Torn(at as u64)
                });
            }
        }
    }
    Ok(Stop::End)
}

impl<D: Disk> Journal<D> {
    /// Opens the journal on `disk`, replaying what it holds into
    /// [`Recovered::records`].
    pub fn open(disk: D, options: Options) -> Result<(Journal<D>, Recovered), OpenError> {
        let mut records = Vec::new();
        let (journal, mut rec) = Journal::open_with(disk, options, |r| {
            records.push(r.to_vec());
            Ok(())
        })?;
        rec.records = records;
        Ok((journal, rec))
    }

    /// Opens the journal on `disk`, handing every good record to `visit`
    /// in order, one segment in memory at a time. An error from `visit`
    /// stops the open ([`OpenError::Replay`]).
    pub fn open_with(
        mut disk: D,
        options: Options,
        mut visit: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<(Journal<D>, Recovered), OpenError> {
        let mut segments: Vec<u64> = disk
            .list()?
            .iter()
            .filter_map(|n| segment_number(n))
            .collect();
        segments.sort_unstable();
        let mut rec = Recovered::default();
        let mut sizes = std::collections::BTreeMap::new();
        for (i, &n) in segments.iter().enumerate() {
            let name = segment_name(n);
            let bytes = disk.read(&name)?;
            sizes.insert(n, bytes.len() as u64);
            let last = i + 1 == segments.len();
            let stop =
                read_segment(&bytes, &mut visit, &mut rec.count).map_err(OpenError::Replay)?;
            match stop {
                Stop::End => {}
                Stop::Torn(at) if last => {
                    rec.torn_bytes = bytes.len() as u64 - at;
                    disk.truncate(&name, at)?;
                    sizes.insert(n, at);
                }
                Stop::Torn(at) | Stop::Bad(at, _) if options.salvage => {
                    let mut aside = Vec::new();
                    for &later in &segments[i..] {
                        sizes.remove(&later);
                        let from = segment_name(later);
                        let to = format!("{from}.damaged");
                        disk.rename(&from, &to)?;
                        aside.push(to);
                    }
                    // The good part of the damaged segment is kept in a
                    // segment of its own.
                    let good: Vec<u8> = bytes[..at as usize].to_vec();
                    if !good.is_empty() {
                        disk.append(&name, &good)?;
                        disk.sync(&name)?;
                        sizes.insert(n, at);
                    }
                    rec.salvaged = Some((name, at, aside));
                    break;
                }
                Stop::Torn(at) => {
                    return Err(OpenError::Corrupt {
                        segment: name,
                        offset: at,
                        reason: "a record cut short before the last segment",
                    })
                }
                Stop::Bad(at, reason) => {
                    return Err(OpenError::Corrupt {
                        segment: name,
                        offset: at,
                        reason,
                    })
                }
            }
        }
        let next = segments.last().map_or(1, |n| n + 1);
        let count = rec.count;
        let journal = Journal {
            disk,
            options,
            segment: next,
            segment_len: 0,
            buf: Vec::new(),
            appended: count,
            committed: count,
            sizes,
        };
        Ok((journal, rec))
    }

    /// Buffers one record; returns its number (from 1, counting every
    /// record the journal holds). Durable once a [`Journal::commit`]
    /// returns a number at least as high.
    pub fn append(&mut self, payload: &[u8]) -> u64 {
        debug_assert!(!payload.is_empty() && payload.len() <= MAX_RECORD);
        let len32 = payload.len() as u32;
        let len = len32.to_le_bytes();
        self.buf.extend_from_slice(&len);
        self.buf.extend_from_slice(&(!len32).to_le_bytes());
        self.buf
            .extend_from_slice(&checksum(len, payload).to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.appended += 1;
        self.appended
    }

    /// Writes every buffered record with one write and, with
    /// [`Fsync::Always`], one `fdatasync`; returns the number of the last
    /// record now durable. An error must end the process (see the module).
    pub fn commit(&mut self) -> io::Result<u64> {
        if let Some((name, _)) = self.write()? {
            if self.options.fsync == Fsync::Always {
                self.disk.sync(&name)?;
            }
        }
        Ok(self.committed)
    }

    /// Writes every buffered record with one write and no sync; returns
    /// the segment written to and whether this write made it (a new file,
    /// whose directory entry needs a sync too), for whoever syncs it (the
    /// scheduler's syncer thread, so that the next batch is applied while
    /// this one syncs). Durable only once synced.
    pub fn write(&mut self) -> io::Result<Option<(String, bool)>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        if self.segment_len >= self.options.segment_bytes {
            self.segment += 1;
            self.segment_len = 0;
        }
        let new = self.segment_len == 0;
        let name = segment_name(self.segment);
        self.disk.append(&name, &self.buf)?;
        self.segment_len += self.buf.len() as u64;
        self.sizes.insert(self.segment, self.segment_len);
        self.buf.clear();
        self.committed = self.appended;
        Ok(Some((name, new)))
    }

    /// Syncs the segment appended to (with [`Fsync::Never`], before old
    /// segments whose live records were written again go).
    pub fn sync_current(&mut self) -> io::Result<()> {
        if self.segment_len == 0 {
            return Ok(());
        }
        self.disk.sync(&segment_name(self.segment))
    }

    /// The options it was opened with.
    pub fn options(&self) -> Options {
        self.options
    }

    /// Starts a new segment for the next commit (unless the current one
    /// is still empty); returns its number. Every record committed from
    /// now on lies in it or after it.
    pub fn roll(&mut self) -> u64 {
        if self.segment_len > 0 {
            self.segment += 1;
            self.segment_len = 0;
        }
        self.segment
    }

    /// Deletes every segment numbered below `segment`, oldest first (so
    /// a crash half-way leaves a suffix of the journal, which replays to
    /// the same state). Call only once what they held that is still live
    /// was committed again at or after `segment`.
    pub fn remove_below(&mut self, segment: u64) -> io::Result<u64> {
        let old: Vec<u64> = self.sizes.range(..segment).map(|(n, _)| *n).collect();
        let mut freed = 0;
        for n in old {
            self.disk.remove(&segment_name(n))?;
            freed += self.sizes.remove(&n).unwrap_or(0);
        }
        Ok(freed)
    }

    /// Bytes of every segment.
    pub fn total_bytes(&self) -> u64 {
        self.sizes.values().sum()
    }

    /// Segments on disk.
    pub fn segment_count(&self) -> usize {
        self.sizes.len()
    }

    /// Records appended and not yet committed.
    pub fn pending(&self) -> u64 {
        self.appended - self.committed
    }

    pub fn disk(&self) -> &D {
        &self.disk
    }

    pub fn into_disk(self) -> D {
        self.disk
    }
}

#[cfg(test)]
mod tests;
