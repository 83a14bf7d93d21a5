//! A storage backend that fails like a full disk while a marker file exists: the chaos suite and
//! the store's tests use it to take space away from a running store and give it back. Only in
//! builds with the `fault-injection` feature; packaged binaries never have it.

use std::io;
use std::path::{Path, PathBuf};

/// A redb file whose writes, resizes and syncs fail with `StorageFull` while `marker` exists.
#[derive(Debug)]
pub struct FullDiskWhenMarked {
    inner: redb::backends::FileBackend,
    marker: PathBuf,
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
        })
    }

    fn check(&self) -> io::Result<()> {
        if self.marker.exists() {
            Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "no space left on device (injected while {} exists)",
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
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
}
