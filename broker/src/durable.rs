//! The node's small files beside the journal (`STORAGE.md`): the Raft
//! state, which names the node's member id, written whole and atomically
//! (a temporary file, `fdatasync`, `rename`, then the directory synced),
//! with a checksum so that damage is told from a state.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::election::SavedRaft;

/// The Raft state's file in a node's directory.
pub const RAFT_FILE: &str = "raft.state";

/// Replaces `path` with `bytes`, durably, wrapped as `len: u32 LE`,
/// `crc32c: u32 LE`, then the bytes: a crash leaves the old file or the
/// new one, never a mix.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        let mut buf = Vec::with_capacity(bytes.len() + 8);
        buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(bytes).to_le_bytes());
        buf.extend_from_slice(bytes);
        f.write_all(&buf)?;
        f.sync_data()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads a file written by [`write_file`]: `Ok(None)` when there is
/// none, an error when it is damaged.
pub fn read_file(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let damaged = |why: &str| format!("{} is damaged ({why})", path.display());
    if bytes.len() < 8 {
        return Err(damaged("shorter than its header"));
    }
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let crc = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    let body = &bytes[8..];
    if body.len() != len {
        return Err(damaged("its length does not match"));
    }
    if crc32c::crc32c(body) != crc {
        return Err(damaged("checksum mismatch"));
    }
    Ok(Some(body.to_vec()))
}

/// The Raft state saved in `dir`, if any.
pub fn read_raft(dir: &Path) -> Result<Option<SavedRaft>, String> {
    let path = dir.join(RAFT_FILE);
    let Some(bytes) = read_file(&path)? else {
        return Ok(None);
    };
    let frames = [&[][..], &protocol::frames::header()[..], &bytes[..]];
    protocol::decode::<SavedRaft, _>(&frames)
        .map(Some)
        .map_err(|e| format!("{} cannot be read: {e}", path.display()))
}

/// Saves `state` in `dir`.
pub fn write_raft(dir: &Path, state: &SavedRaft) -> io::Result<()> {
    let bytes = protocol::encode(state).pop().unwrap_or_default();
    write_file(&dir.join(RAFT_FILE), &bytes)
}

/// Sets a damaged Raft state aside (renamed with `.damaged`); returns
/// the new name.
pub fn set_aside(dir: &Path) -> io::Result<PathBuf> {
    let from = dir.join(RAFT_FILE);
    let to = dir.join(format!("{RAFT_FILE}.damaged"));
    fs::rename(&from, &to)?;
    File::open(dir)?.sync_all()?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_state_round_trips_and_damage_is_told() {
        let dir = std::env::temp_dir().join(format!("miyamoto-durable-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(read_raft(&dir).unwrap(), None);
        let mut s = SavedRaft::fresh(42);
        s.epoch = 7;
        s.entries.push(serde_bytes::ByteBuf::from(vec![1, 2, 3]));
        write_raft(&dir, &s).unwrap();
        assert_eq!(read_raft(&dir).unwrap(), Some(s));
        let path = dir.join(RAFT_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let err = read_raft(&dir).unwrap_err();
        assert!(err.contains("damaged") && err.contains(RAFT_FILE), "{err}");
        fs::write(&path, &bytes[..5]).unwrap();
        assert!(read_raft(&dir).unwrap_err().contains("damaged"));
        set_aside(&dir).unwrap();
        assert_eq!(read_raft(&dir).unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
