//! Files and block devices as backends, with vblade's options: read-only (`-r`), O_DIRECT
//! (`-d`), O_SYNC (`-s`), and an offset/length window (`-o`/`-l`, in sectors).

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};

use aoe_sys::NoWait;

use crate::{check_range, Backend};

const SECTOR: u64 = 512;
/// Alignment O_DIRECT needs for memory, offsets and lengths (the logical block size of every
/// device we expect is at most 4096).
const DIRECT_ALIGN: usize = 4096;

/// How to open a backing file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open read-only; writes are refused.
    pub read_only: bool,
    /// O_DIRECT: bypass the page cache (vblade `-d`).
    pub direct: bool,
    /// O_SYNC: every write is durable before it is acknowledged (vblade `-s`).
    pub sync: bool,
    /// Start of the export in the file, in 512-byte sectors (vblade `-o`).
    pub offset_sectors: u64,
    /// Length of the export in sectors (vblade `-l`); `None`: to the end of the file.
    pub length_sectors: Option<u64>,
}

/// A file or block device, or a sector window of one.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    path: PathBuf,
    base: u64,
    len: u64,
    opts: OpenOptions,
    /// On tmpfs/ramfs: reads and writes copy pages and never wait for a device, so they
    /// are done inline.
    memory: bool,
    /// The file system refused `RWF_NOWAIT` once: stop trying.
    nowait_unsupported: AtomicBool,
}

impl FileBackend {
    /// Opens `path`. Refuses, with a message naming the problem: a missing file, a size that
    /// is not a multiple of 512, an empty export, and a window beyond the end of the file.
    pub fn open(path: &Path, opts: &OpenOptions) -> io::Result<FileBackend> {
        let named = |e: io::Error, what: &str| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
        };
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(!opts.read_only);
        let mut flags = 0;
        if opts.direct {
            flags |= libc_o_direct();
        }
        if opts.sync {
            flags |= libc_o_sync();
        }
        o.custom_flags(flags);
        let mut file = o.open(path).map_err(|e| named(e, "cannot open"))?;
        let meta = file.metadata().map_err(|e| named(e, "cannot stat"))?;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        // Block devices report size 0 in metadata; seeking to the end works for both.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| named(e, "cannot size"))?;
        if size % SECTOR != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "size {size} of {} is not a multiple of 512 bytes",
                    path.display()
                ),
            ));
        }
        let total = size / SECTOR;
        if opts.offset_sectors > total {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "offset {} sectors is beyond the end of {} ({total} sectors)",
                    opts.offset_sectors,
                    path.display()
                ),
            ));
        }
        let avail = total - opts.offset_sectors;
        let len = match opts.length_sectors {
            Some(l) if l > avail => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "length {l} sectors at offset {} exceeds {} ({total} sectors)",
                        opts.offset_sectors,
                        path.display()
                    ),
                ))
            }
            Some(l) => l,
            None => avail,
        };
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("export of {} would be empty", path.display()),
            ));
        }
        Ok(FileBackend {
            path: path.to_path_buf(),
            base: opts.offset_sectors * SECTOR,
            len: len * SECTOR,
            opts: opts.clone(),
            memory: aoe_sys::is_memory_fs(&file) && !opts.direct && !opts.sync,
            nowait_unsupported: AtomicBool::new(false),
            file,
        })
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options it was opened with.
    pub fn options(&self) -> &OpenOptions {
        &self.opts
    }

    /// Size in sectors.
    pub fn sectors(&self) -> u64 {
        self.len / SECTOR
    }

    /// O_DIRECT needs aligned memory, offset and length: go through an aligned bounce buffer
    /// covering the aligned superset of the range.
    fn direct_read(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let a = DIRECT_ALIGN as u64;
        let start = pos / a * a;
        let end = (pos + buf.len() as u64).div_ceil(a) * a;
        let mut bounce = AlignedBuf::new((end - start) as usize);
        self.file.read_exact_at(bounce.as_mut(), start)?;
        let skip = (pos - start) as usize;
        buf.copy_from_slice(&bounce.as_mut()[skip..skip + buf.len()]);
        Ok(())
    }

    fn direct_write(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        let a = DIRECT_ALIGN as u64;
        let start = pos / a * a;
        let end = (pos + buf.len() as u64).div_ceil(a) * a;
        let mut bounce = AlignedBuf::new((end - start) as usize);
        if start != pos || end != pos + buf.len() as u64 {
            // Read-modify-write of the partial blocks at the edges.
            self.file.read_exact_at(bounce.as_mut(), start)?;
        }
        let skip = (pos - start) as usize;
        bounce.as_mut()[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(bounce.as_mut(), start)
    }
}

impl Backend for FileBackend {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.len)?;
        let pos = self.base + offset;
        if self.opts.direct {
            self.direct_read(buf, pos)
        } else {
            self.file.read_exact_at(buf, pos)
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.opts.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "export is read-only",
            ));
        }
        check_range(offset, buf.len(), self.len)?;
        let pos = self.base + offset;
        if self.opts.direct {
            self.direct_write(buf, pos)
        } else {
            self.file.write_all_at(buf, pos)
        }
    }

    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if self.opts.direct {
            return Ok(false);
        }
        check_range(offset, buf.len(), self.len)?;
        let pos = self.base + offset;
        if self.memory {
            self.file.read_exact_at(buf, pos)?;
            return Ok(true);
        }
        if self.nowait_unsupported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match aoe_sys::pread_nowait(&self.file, buf, pos)? {
            NoWait::Done(n) => Ok(n == buf.len()),
            NoWait::WouldBlock => Ok(false),
            NoWait::Unsupported => {
                self.nowait_unsupported.store(true, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    fn try_write_at(&self, buf: &[u8], offset: u64) -> io::Result<bool> {
        // O_SYNC writes wait for the disk by definition; O_DIRECT needs the bounce buffer.
        if self.opts.direct || self.opts.sync || self.opts.read_only {
            return Ok(false);
        }
        check_range(offset, buf.len(), self.len)?;
        let pos = self.base + offset;
        if self.memory {
            self.file.write_all_at(buf, pos)?;
            return Ok(true);
        }
        if self.nowait_unsupported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match aoe_sys::pwrite_nowait(&self.file, buf, pos)? {
            NoWait::Done(n) => Ok(n == buf.len()),
            NoWait::WouldBlock => Ok(false),
            NoWait::Unsupported => {
                self.nowait_unsupported.store(true, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    fn flush(&self) -> io::Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn read_only(&self) -> bool {
        self.opts.read_only
    }
}

/// A heap buffer whose start is aligned to [`DIRECT_ALIGN`], made without `unsafe` by
/// over-allocating and starting at the first aligned byte.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let addr = raw.as_ptr() as usize;
        let start = (DIRECT_ALIGN - addr % DIRECT_ALIGN) % DIRECT_ALIGN;
        AlignedBuf { raw, start, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn libc_o_direct() -> i32 {
    libc::O_DIRECT
}

fn libc_o_sync() -> i32 {
    libc::O_SYNC
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        f.write_all(&data).unwrap();
        f
    }

    #[test]
    fn window_read_write() {
        let f = file_of(64 * 512);
        let b = FileBackend::open(
            f.path(),
            &OpenOptions {
                offset_sectors: 8,
                length_sectors: Some(16),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(b.len(), 16 * 512);
        let mut buf = [0u8; 512];
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf[0], ((8 * 512) % 253) as u8);
        b.write_at(&[0xaa; 512], 15 * 512).unwrap();
        assert!(b.write_at(&[0xaa; 512], 16 * 512).is_err());
        assert!(b.read_at(&mut buf, 16 * 512 - 1).is_err());
        b.flush().unwrap();
        let all = std::fs::read(f.path()).unwrap();
        assert!(all[23 * 512..24 * 512].iter().all(|x| *x == 0xaa));
        assert_eq!(all[24 * 512], ((24 * 512) % 253) as u8);
    }

    #[test]
    fn refuses_bad_files() {
        let odd = file_of(1000);
        let e = FileBackend::open(odd.path(), &OpenOptions::default()).unwrap_err();
        assert!(e.to_string().contains("not a multiple of 512"), "{e}");
        let e = FileBackend::open(Path::new("/nonexistent/x.img"), &OpenOptions::default())
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.img"), "{e}");
        let f = file_of(4 * 512);
        let e = FileBackend::open(
            f.path(),
            &OpenOptions {
                offset_sectors: 2,
                length_sectors: Some(3),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
        let empty = file_of(0);
        assert!(FileBackend::open(empty.path(), &OpenOptions::default()).is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(FileBackend::open(dir.path(), &OpenOptions::default()).is_err());
    }

    #[test]
    fn read_only_refuses_writes() {
        let f = file_of(8 * 512);
        let b = FileBackend::open(
            f.path(),
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(b.read_only());
        assert_eq!(
            b.write_at(&[0; 512], 0).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
    }

    #[test]
    fn direct_io_unaligned_ranges() {
        // O_DIRECT is not supported on tmpfs; use a file under the target dir if it is not.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let p = dir.path().join("direct.img");
        std::fs::write(&p, vec![0u8; 64 * 512]).unwrap();
        let b = match FileBackend::open(
            &p,
            &OpenOptions {
                direct: true,
                ..Default::default()
            },
        ) {
            Ok(b) => b,
            Err(e) => panic!("O_DIRECT open failed on {}: {e}", p.display()),
        };
        let data: Vec<u8> = (0..1024).map(|i| (i % 7) as u8).collect();
        b.write_at(&data, 3 * 512).unwrap();
        let mut back = vec![0u8; 1024];
        b.read_at(&mut back, 3 * 512).unwrap();
        assert_eq!(back, data);
        let all = std::fs::read(&p).unwrap();
        assert_eq!(&all[3 * 512..5 * 512], &data[..]);
        assert!(all[..3 * 512].iter().all(|x| *x == 0));
    }
}
