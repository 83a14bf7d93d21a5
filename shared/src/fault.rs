//! A storage backend that fails like a full disk while a marker file exists: the chaos suite and
//! the e2e tests use it to take space away from a running store or journal and give it back. Only
//! in builds with the `fault-injection` feature; packaged binaries never have it.
//!
//! Two kinds of full, chosen by the marker's content: empty, every write, resize and sync fails
//! (the harshest case: a device that refuses everything); `grow`, only what needs new blocks
//! fails — writing past the length the file had when the disk filled, or growing it — which is
//! what a real full ext4 or tmpfs does to a file that already has its blocks.

use std::io;
use std::path::{Path, PathBuf};

/// A redb file whose writes fail with `StorageFull` while `marker` exists.
#[derive(Debug)]
pub struct FullDiskWhenMarked {
    inner: redb::backends::FileBackend,
    marker: PathBuf,
    /// The file's length when the disk filled (in `grow` mode), or `None` while there is space.
    filled_at: std::sync::Mutex<Option<u64>>,
}

impl FullDiskWhenMarked {
    /// Opens (or creates) `path`; `marker` is checked before every write.
    pub fn open(path: &Path, marker: &Path) -> io::Result<FullDiskWhenMarked> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let inner = redb::backends::FileBackend::new(file).map_err(io::Error::other)?;
        Ok(FullDiskWhenMarked {
            inner,
            marker: marker.to_path_buf(),
            filled_at: std::sync::Mutex::new(None),
        })
    }

    /// Fails when the disk is "full" for a write that ends at `end` (`None`: a sync).
    fn check(&self, end: Option<u64>) -> io::Result<()> {
        let mut filled = self.filled_at.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(mode) = std::fs::read(&self.marker) else {
            *filled = None;
            return Ok(());
        };
        let full = if mode.starts_with(b"grow") {
            let at = match *filled {
                Some(at) => at,
                None => *filled.insert(redb::StorageBackend::len(&self.inner)?),
            };
            end.is_some_and(|end| end > at)
        } else {
            true
        };
        if full {
            Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "No space left on device (injected while {} exists)",
                    self.marker.display()
                ),
            ))
        } else {
            Ok(())
        }
    }
}

impl redb::StorageBackend for FullDiskWhenMarked {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check(Some(len))?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.check(None)?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(Some(offset.saturating_add(data.len() as u64)))?;
        self.inner.write(offset, data)
    }
}
