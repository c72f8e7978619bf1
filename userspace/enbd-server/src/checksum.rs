//! Per-block checksums of an image (dnbd3's integrity check): the sidecar
//! file that holds them, and the `checksum` and `verify` subcommands that
//! write and check it. Serving with them is `verified.rs`.
//!
//! The sidecar, all integers little-endian (`Documentation/server.md`,
//! "Checksums"):
//!
//! | bytes       | field                                        |
//! |-------------|----------------------------------------------|
//! | 0..8        | magic `ENBDCRC\0`                            |
//! | 8..12       | version, 1                                   |
//! | 12..16      | algorithm, 1 = CRC32C (Castagnoli)           |
//! | 16..24      | block size in bytes (16 MiB)                 |
//! | 24..32      | image size in bytes                          |
//! | 32..40      | block count, ceil(image size / block size)   |
//! | 40..40+4n   | one CRC32C per block; the last block's over its real length |
//! | last 4      | CRC32C of every byte before it               |

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use tracing::info;

use crate::backend::{Backend, Storage};

/// The block size `checksum` writes: dnbd3's.
pub const BLOCK_SIZE: u64 = 16 << 20;
const MAGIC: [u8; 8] = *b"ENBDCRC\0";
const VERSION: u32 = 1;
const ALGORITHM_CRC32C: u32 = 1;
const HEADER_LEN: usize = 40;
/// Blocks are read and summed this much at a time, so checking one costs a
/// buffer of this size, not of a block.
pub const CHUNK: usize = 1 << 20;
/// Block sizes a sidecar may have (tests use small ones).
const BLOCK_SIZES: std::ops::RangeInclusive<u64> = 4096..=(1 << 30);

/// Why a sidecar is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SidecarError {
    #[error("not an enbd checksum file (bad magic)")]
    Magic,
    #[error("checksum file version {0}; this server reads version {VERSION}")]
    Version(u32),
    #[error("checksum algorithm {0} is unknown (1 is CRC32C)")]
    Algorithm(u32),
    #[error("block size {0} is not a power of two from 4 KiB to 1 GiB")]
    BlockSize(u64),
    #[error("{blocks} blocks do not fit an image of {size} bytes in blocks of {block_size}")]
    BlockCount {
        blocks: u64,
        size: u64,
        block_size: u64,
    },
    #[error("the file is {got} bytes long, its header says {expected}: truncated or extended")]
    Length { expected: u64, got: u64 },
    #[error("its own checksum is {stored:#010x}, its content sums to {computed:#010x}: corrupt")]
    SelfCheck { stored: u32, computed: u32 },
}

/// An image's block checksums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sums {
    block_size: u64,
    image_size: u64,
    sums: Vec<u32>,
}

impl Sums {
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    pub fn blocks(&self) -> usize {
        self.sums.len()
    }

    /// The checksum block `i` should have.
    pub fn get(&self, i: usize) -> Option<u32> {
        self.sums.get(i).copied()
    }

    /// The byte range of block `i` (the last one may be short).
    pub fn range(&self, i: usize) -> std::ops::Range<u64> {
        let start = (i as u64).saturating_mul(self.block_size);
        start.min(self.image_size)..start.saturating_add(self.block_size).min(self.image_size)
    }

    /// The sidecar's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + 4 * self.sums.len() + 4);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&ALGORITHM_CRC32C.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&self.image_size.to_le_bytes());
        b.extend_from_slice(&(self.sums.len() as u64).to_le_bytes());
        for s in &self.sums {
            b.extend_from_slice(&s.to_le_bytes());
        }
        let own = crc32c::crc32c(&b);
        b.extend_from_slice(&own.to_le_bytes());
        b
    }

    /// Parses and checks a sidecar's bytes.
    pub fn decode(b: &[u8]) -> Result<Self, SidecarError> {
        let u32_at = |o: usize| -> Option<u32> {
            Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
        };
        let u64_at = |o: usize| -> Option<u64> {
            Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
        };
        let too_short = |expected: u64| SidecarError::Length {
            expected,
            got: b.len() as u64,
        };
        if b.get(..8) != Some(&MAGIC[..]) {
            return Err(SidecarError::Magic);
        }
        let version = u32_at(8).ok_or(too_short(HEADER_LEN as u64 + 4))?;
        if version != VERSION {
            return Err(SidecarError::Version(version));
        }
        let header = (|| Some((u32_at(12)?, u64_at(16)?, u64_at(24)?, u64_at(32)?)))();
        let (algorithm, block_size, image_size, blocks) =
            header.ok_or(too_short(HEADER_LEN as u64 + 4))?;
        if algorithm != ALGORITHM_CRC32C {
            return Err(SidecarError::Algorithm(algorithm));
        }
        if !block_size.is_power_of_two() || !BLOCK_SIZES.contains(&block_size) {
            return Err(SidecarError::BlockSize(block_size));
        }
        if blocks != image_size.div_ceil(block_size) {
            return Err(SidecarError::BlockCount {
                blocks,
                size: image_size,
                block_size,
            });
        }
        // At most 2^64 / 4096 blocks, so this cannot overflow.
        let expected = HEADER_LEN as u64 + 4 * blocks + 4;
        if b.len() as u64 != expected {
            return Err(too_short(expected));
        }
        let (body, own) = b.split_at(b.len() - 4);
        let stored = u32::from_le_bytes([own[0], own[1], own[2], own[3]]);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(SidecarError::SelfCheck { stored, computed });
        }
        let sums = body[HEADER_LEN..]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Self {
            block_size,
            image_size,
            sums,
        })
    }

    /// Reads and checks the sidecar at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let b = std::fs::read(path)
            .with_context(|| format!("cannot read the checksum file {}", path.display()))?;
        Self::decode(&b).with_context(|| format!("checksum file {}", path.display()))
    }

    /// Writes the sidecar to `path` atomically: a temporary file beside it,
    /// synced, then renamed over it, so a crash leaves the old file or the
    /// new one, never half of one.
    pub fn store(&self, path: &Path) -> Result<()> {
        let name = path
            .file_name()
            .with_context(|| format!("{} is not a file name", path.display()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let write = || -> io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&self.encode())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            // The rename itself is durable once the directory is synced.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            anyhow::Error::new(e).context(format!("cannot write {}", path.display()))
        })
    }

    /// Sums every block of `storage`; `progress` is told each block done.
    pub fn compute(
        storage: &dyn Storage,
        block_size: u64,
        mut progress: impl FnMut(usize, usize),
    ) -> io::Result<Self> {
        let image_size = storage.size();
        let blocks = usize::try_from(image_size.div_ceil(block_size))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut sums = Self {
            block_size,
            image_size,
            sums: Vec::with_capacity(blocks),
        };
        let mut chunk = vec![0u8; CHUNK];
        for i in 0..blocks {
            let crc = block_crc(storage, sums.range(i), &mut chunk)?;
            sums.sums.push(crc);
            progress(i + 1, blocks);
        }
        Ok(sums)
    }
}

/// The CRC32C of `range` of `storage`, read a `chunk` at a time.
pub fn block_crc(
    storage: &dyn Storage,
    range: std::ops::Range<u64>,
    chunk: &mut [u8],
) -> io::Result<u32> {
    let mut crc = 0;
    let mut off = range.start;
    while off < range.end {
        let n = (range.end - off).min(chunk.len() as u64) as usize;
        let buf = chunk
            .get_mut(..n)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        storage.read_at(buf, off)?;
        crc = crc32c::crc32c_append(crc, buf);
        off += n as u64;
    }
    Ok(crc)
}

/// Where an image's sidecar is unless told otherwise: `IMAGE.crc`.
pub fn default_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".crc");
    p.into()
}

/// The subcommands that work on an image's checksums instead of serving.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Writes the checksum file of an image (a CRC32C per 16 MiB block), to
    /// serve it with `--export NAME=IMAGE,ro,crc`.
    Checksum {
        /// The image: a regular file or a block device. It is read with a
        /// shared lock, so a server writing it makes this fail.
        image: PathBuf,
        /// Where to write the checksums. Default: IMAGE.crc.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Checks an image against its checksum file and lists the bad blocks;
    /// exits with status 1 if there are any.
    Verify {
        image: PathBuf,
        /// The checksum file. Default: IMAGE.crc.
        #[arg(long, value_name = "FILE")]
        crc: Option<PathBuf>,
    },
}

/// Reports progress: on a terminal a line that updates itself, else a log
/// line per GiB or so.
struct Progress {
    tty: bool,
    start: Instant,
    verb: &'static str,
}

impl Progress {
    fn new(verb: &'static str) -> Self {
        Self {
            tty: io::stderr().is_terminal(),
            start: Instant::now(),
            verb,
        }
    }

    fn step(&self, done: usize, total: usize) {
        let pct = done * 100 / total.max(1);
        if self.tty {
            eprint!("\r{} block {done}/{total} ({pct}%)", self.verb);
            if done == total {
                eprintln!();
            }
        } else if done.is_multiple_of(64) && done < total {
            info!("{} block {done}/{total} ({pct}%)", self.verb);
        }
    }

    /// Seconds taken and MiB/s over `bytes`.
    fn rate(&self, bytes: u64) -> (f64, f64) {
        let s = self.start.elapsed().as_secs_f64();
        (s, bytes as f64 / (1 << 20) as f64 / s.max(1e-6))
    }
}

/// Runs a subcommand; `Ok(false)` when `verify` found bad blocks.
pub fn run(cmd: Command) -> Result<bool> {
    match cmd {
        Command::Checksum { image, output } => {
            let output = output.unwrap_or_else(|| default_path(&image));
            let storage = Backend::open(&image, true, false)?;
            let progress = Progress::new("summing");
            let sums = Sums::compute(&storage, BLOCK_SIZE, |d, t| progress.step(d, t))
                .with_context(|| format!("cannot read {}", image.display()))?;
            sums.store(&output)?;
            let (secs, rate) = progress.rate(sums.image_size);
            println!(
                "{}: {} blocks of {} MiB over {} bytes of {}, in {secs:.1} s ({rate:.0} MiB/s)",
                output.display(),
                sums.blocks(),
                BLOCK_SIZE >> 20,
                sums.image_size,
                image.display(),
            );
            Ok(true)
        }
        Command::Verify { image, crc } => {
            let crc = crc.unwrap_or_else(|| default_path(&image));
            let sums = Sums::load(&crc)?;
            let storage = Backend::open(&image, true, false)?;
            if storage.size() != sums.image_size {
                anyhow::bail!(
                    "{} is {} bytes, {} is for an image of {}",
                    image.display(),
                    storage.size(),
                    crc.display(),
                    sums.image_size
                );
            }
            let progress = Progress::new("checking");
            let now = Sums::compute(&storage, sums.block_size, |d, t| progress.step(d, t))
                .with_context(|| format!("cannot read {}", image.display()))?;
            let bad: Vec<usize> = (0..sums.blocks())
                .filter(|&i| now.get(i) != sums.get(i))
                .collect();
            for &i in &bad {
                let r = sums.range(i);
                println!("bad block {i}: bytes {}..{}", r.start, r.end);
            }
            let (secs, rate) = progress.rate(sums.image_size);
            println!(
                "{}: {} of {} blocks bad, in {secs:.1} s ({rate:.0} MiB/s)",
                image.display(),
                bad.len(),
                sums.blocks()
            );
            Ok(bad.is_empty())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempFile;

    /// An image of `len` bytes of varied content.
    fn image(len: usize) -> TempFile {
        let f = TempFile::new(0, 0);
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(f.path(), data).unwrap();
        f
    }

    fn sums_of(f: &TempFile, block: u64) -> Sums {
        let b = Backend::open(f.path(), true, true).unwrap();
        Sums::compute(&b, block, |_, _| {}).unwrap()
    }

    #[test]
    fn round_trip_and_last_block_partial() {
        let f = image(3 * 4096 + 100);
        let s = sums_of(&f, 4096);
        assert_eq!(s.blocks(), 4);
        let data = std::fs::read(f.path()).unwrap();
        assert_eq!(s.get(3), Some(crc32c::crc32c(&data[3 * 4096..])));
        assert_eq!(s.get(1), Some(crc32c::crc32c(&data[4096..8192])));
        let b = s.encode();
        assert_eq!(b.len(), 40 + 4 * 4 + 4);
        assert_eq!(&b[..8], b"ENBDCRC\0");
        assert_eq!(
            u64::from_le_bytes(b[24..32].try_into().unwrap()),
            3 * 4096 + 100
        );
        assert_eq!(Sums::decode(&b), Ok(s.clone()));

        let out = TempFile::new(0, 0);
        s.store(out.path()).unwrap();
        assert_eq!(Sums::load(out.path()).unwrap(), s);
    }

    #[test]
    fn the_algorithm_is_crc32c_summed_in_chunks() {
        // The check value of CRC-32C (Castagnoli), as the docs give it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let f = image(10_000);
        let b = Backend::open(f.path(), true, true).unwrap();
        let whole = crc32c::crc32c(&std::fs::read(f.path()).unwrap()[100..9_000]);
        for chunk in [1, 999, 4096, 8900, 20_000] {
            assert_eq!(
                block_crc(&b, 100..9_000, &mut vec![0; chunk]).unwrap(),
                whole
            );
        }
    }

    #[test]
    fn an_empty_image_has_no_blocks() {
        let s = sums_of(&image(0), 4096);
        assert_eq!(s.blocks(), 0);
        assert_eq!(Sums::decode(&s.encode()), Ok(s));
    }

    #[test]
    fn a_corrupt_sidecar_is_refused() {
        let good = sums_of(&image(10_000), 4096).encode();
        // Every single flipped bit is caught, header or list.
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            assert!(Sums::decode(&b).is_err(), "flip at byte {i} not caught");
        }
        let mut b = good.clone();
        b[44] ^= 1;
        assert!(matches!(
            Sums::decode(&b),
            Err(SidecarError::SelfCheck { .. })
        ));
        assert_eq!(
            Sums::decode(&good[..20]).err(),
            Some(SidecarError::Length {
                expected: 44,
                got: 20
            })
        );
        assert!(matches!(
            Sums::decode(&good[..good.len() - 4]),
            Err(SidecarError::Length { .. })
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(Sums::decode(&long).is_err());
        assert_eq!(Sums::decode(b"").err(), Some(SidecarError::Magic));
        // A header made consistent but for its own checksum still fails.
        let mut b = good.clone();
        b[8] = 2;
        assert_eq!(Sums::decode(&b).err(), Some(SidecarError::Version(2)));
    }

    #[test]
    fn a_huge_block_count_is_refused_not_allocated() {
        let mut s = Sums {
            block_size: 4096,
            image_size: u64::MAX - 5,
            sums: Vec::new(),
        }
        .encode();
        s[32..40].copy_from_slice(&(u64::MAX / 4096 + 1).to_le_bytes());
        assert!(matches!(Sums::decode(&s), Err(SidecarError::Length { .. })));
    }

    #[test]
    fn default_path_appends_crc() {
        assert_eq!(
            default_path(Path::new("/srv/disk.img")),
            PathBuf::from("/srv/disk.img.crc")
        );
    }

    #[test]
    fn checksum_then_verify_finds_the_bad_block() {
        let f = image(2 * BLOCK_SIZE as usize + 5);
        let out = default_path(f.path());
        let cmd = Command::Checksum {
            image: f.path().to_owned(),
            output: None,
        };
        assert!(run(cmd).unwrap());
        let verify = || {
            run(Command::Verify {
                image: f.path().to_owned(),
                crc: None,
            })
        };
        assert!(verify().unwrap());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"x", BLOCK_SIZE + 3).unwrap();
        assert!(!verify().unwrap());
        let _ = std::fs::remove_file(out);
    }
}
