//! The caching proxy's local copy of one proxied export: a sparse data file
//! of the image's size (`NAME.cache`), a map file (`NAME.map`) that says
//! which chunks of it are present, each with the CRC32C of its bytes, and
//! a copy of the upstream's checksum sidecar (`NAME.crc`) the cache was
//! filled under. The cache is kept across opens only if the upstream now
//! serves a sidecar byte for byte the same (a CRC of it could collide);
//! without upstream checksums nothing ties the cache to the image (another
//! image of the same size looks the same), so it starts empty each time.
//!
//! Nothing is synced per chunk: every read of a cached chunk reads the whole
//! chunk and checks it against its CRC in the map, so data that did not
//! reach the disk before a crash (or was changed since, by anything) fails
//! the check and is fetched again; it is never served. The formats are in
//! `Documentation/server.md`, "The caching proxy".

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

/// Bytes per chunk: the unit of the map, of a fetch without upstream
/// checksums, and of the check of every cached read.
pub const CHUNK: u64 = 128 << 10;

/// Largest image the proxy caches: its map takes 8 bytes per chunk in
/// memory (64 MiB per TiB), so an upstream that announces an absurd size
/// cannot make the proxy allocate without bound.
pub const MAX_IMAGE: u64 = 16 << 40;

pub const MAGIC: [u8; 8] = *b"ENBDMAP\0";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 64;
const ENTRY_LEN: u64 = 8;
const PRESENT: u64 = 1 << 32;

/// A map file's header: what the cache holds a copy of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub chunk: u32,
    pub image_size: u64,
    /// CRC32C of the upstream's checksum sidecar (`NAME.crc`), 0 without.
    pub sums_digest: u32,
}

impl Header {
    pub fn chunks(&self) -> u64 {
        self.image_size.div_ceil(u64::from(self.chunk))
    }

    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk.to_le_bytes());
        b[16..24].copy_from_slice(&self.image_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.chunks().to_le_bytes());
        b[32..36].copy_from_slice(&self.sums_digest.to_le_bytes());
        let own = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&own.to_le_bytes());
        b
    }

    /// Parses a header; the reason it is refused otherwise.
    pub fn decode(b: &[u8]) -> std::result::Result<Self, String> {
        let b: &[u8; HEADER_LEN as usize] = b
            .get(..HEADER_LEN as usize)
            .and_then(|h| h.try_into().ok())
            .ok_or("shorter than its header")?;
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        if b[0..8] != MAGIC {
            return Err("not a map file (bad magic)".into());
        }
        let (stored, computed) = (u32_at(60), crc32c::crc32c(&b[..60]));
        if stored != computed {
            return Err(format!(
                "header checksum 0x{stored:08x}, computed 0x{computed:08x}"
            ));
        }
        if u32_at(8) != VERSION {
            return Err(format!("version {}, expected {VERSION}", u32_at(8)));
        }
        let h = Header {
            chunk: u32_at(12),
            image_size: u64_at(16),
            sums_digest: u32_at(32),
        };
        if h.chunk == 0 || u64_at(24) != h.chunks() {
            return Err("chunk count does not fit the image size".into());
        }
        Ok(h)
    }
}

/// The cache of one export: data file, map file, and the map in memory.
#[derive(Debug)]
pub struct Cache {
    data: File,
    map: File,
    data_path: PathBuf,
    header: Header,
    /// Per chunk: 0 when absent, `PRESENT | crc` when present.
    entries: Vec<AtomicU64>,
}

/// The files of export `name`'s cache in `dir`.
pub fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.cache")),
        dir.join(format!("{name}.map")),
    )
}

/// The copy of the upstream's sidecar kept with export `name`'s cache.
pub fn sidecar_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.crc"))
}

/// The header of export `name`'s map in `dir`, if there is a valid one:
/// what the cache was last filled under.
pub fn recorded(dir: &Path, name: &str) -> Option<Header> {
    let f = File::open(paths(dir, name).1).ok()?;
    let mut hb = [0u8; HEADER_LEN as usize];
    f.read_exact_at(&mut hb, 0).ok()?;
    Header::decode(&hb).ok()
}

/// One map entry's bytes: the chunk's CRC32C and its complement, so a
/// zeroed or torn entry reads as absent.
fn entry_bytes(crc: Option<u32>) -> [u8; 8] {
    let mut b = [0u8; 8];
    if let Some(crc) = crc {
        b[..4].copy_from_slice(&crc.to_le_bytes());
        b[4..].copy_from_slice(&(!crc).to_le_bytes());
    }
    b
}

fn decode_entry(b: &[u8]) -> Option<u32> {
    let crc = u32::from_le_bytes(b.get(..4)?.try_into().ok()?);
    let check = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?);
    (check == !crc).then_some(crc)
}

impl Cache {
    /// Opens export `name`'s cache in `dir` for an image described by
    /// `want` and the upstream's `sidecar` bytes, keeping what it holds if
    /// its map matches and the kept sidecar is `sidecar` byte for byte,
    /// starting empty (with a log line saying why) otherwise, and always
    /// without a sidecar. Locks both files so that two proxies cannot
    /// share one cache.
    pub fn open(dir: &Path, name: &str, want: Header, sidecar: Option<&[u8]>) -> Result<Self> {
        if want.image_size > MAX_IMAGE {
            anyhow::bail!(
                "export '{name}': the upstream announces {} bytes, more than the proxy caches \
                 ({MAX_IMAGE} bytes)",
                want.image_size
            );
        }
        let (data_path, map_path) = paths(dir, name);
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .with_context(|| format!("cannot open the cache file {}", p.display()))
        };
        let (data, map) = (open(&data_path)?, open(&map_path)?);
        for (f, p) in [(&data, &data_path), (&map, &map_path)] {
            crate::backend::lock_image(f, false)
                .with_context(|| format!("cannot use the cache file {}", p.display()))?;
        }
        let n = want.chunks();
        let side_path = sidecar_path(dir, name);
        let loaded = match sidecar {
            None => Err(
                "the upstream serves no checksums, so nothing ties the cache to its \
                         image: it starts empty"
                    .to_owned(),
            ),
            Some(want_side) => match std::fs::read(&side_path) {
                Ok(b) if b == want_side => Self::load(&map, want),
                Ok(_) => Err(
                    "the upstream's checksums differ from those it was filled under \
                              (another image)"
                        .to_owned(),
                ),
                Err(e) => Err(format!("no copy of the checksums it was filled under: {e}")),
            },
        };
        let kept = match loaded {
            Ok(entries) => Some(entries),
            Err(why) => {
                if map.metadata()?.len() > 0 {
                    tracing::warn!(
                        export = name,
                        map = %map_path.display(),
                        "cache discarded: {why}"
                    );
                }
                None
            }
        };
        let entries = match kept {
            Some(e) => e,
            None => {
                // Start over: no map (so a crash in between leaves no
                // cache), empty data (the old bytes are not ours any more),
                // the sidecar, then a map of absent chunks.
                let len = (n * ENTRY_LEN) + HEADER_LEN;
                map.set_len(0)?;
                map.sync_all()?;
                data.set_len(0)?;
                match sidecar {
                    Some(b) => write_synced(&side_path, b).with_context(|| {
                        format!("cannot write the sidecar copy {}", side_path.display())
                    })?,
                    None => match std::fs::remove_file(&side_path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("cannot remove {}", side_path.display()))
                        }
                    },
                }
                map.set_len(len)?;
                map.write_all_at(&want.encode(), 0)?;
                map.sync_all()?;
                (0..n).map(|_| AtomicU64::new(0)).collect()
            }
        };
        data.set_len(want.image_size)
            .with_context(|| format!("cannot size the cache file {}", data_path.display()))?;
        let present = entries
            .iter()
            .filter(|e| e.load(Ordering::Relaxed) != 0)
            .count();
        tracing::info!(
            export = name,
            cache = %data_path.display(),
            chunks = n,
            present,
            "proxy cache opened"
        );
        Ok(Self {
            data,
            map,
            data_path,
            header: want,
            entries,
        })
    }

    /// The entries of an existing map, if it matches `want`.
    fn load(map: &File, want: Header) -> std::result::Result<Vec<AtomicU64>, String> {
        let mut hb = [0u8; HEADER_LEN as usize];
        map.read_exact_at(&mut hb, 0)
            .map_err(|e| format!("cannot read its header: {e}"))?;
        let h = Header::decode(&hb)?;
        if h != want {
            return Err(format!(
                "it holds {} bytes in {}-byte chunks with sidecar 0x{:08x}; the upstream has \
                 {} bytes with sidecar 0x{:08x}",
                h.image_size, h.chunk, h.sums_digest, want.image_size, want.sums_digest
            ));
        }
        let len = map.metadata().map_err(|e| e.to_string())?.len();
        if len != HEADER_LEN + h.chunks() * ENTRY_LEN {
            return Err(format!("length {len} does not fit its chunk count"));
        }
        let mut raw = vec![0u8; (h.chunks() * ENTRY_LEN) as usize];
        map.read_exact_at(&mut raw, HEADER_LEN)
            .map_err(|e| format!("cannot read it: {e}"))?;
        Ok(raw
            .chunks_exact(ENTRY_LEN as usize)
            .map(|e| AtomicU64::new(decode_entry(e).map_or(0, |c| PRESENT | u64::from(c))))
            .collect())
    }

    pub fn path(&self) -> &Path {
        &self.data_path
    }

    pub fn chunks(&self) -> u64 {
        self.entries.len() as u64
    }

    /// The byte range of chunk `i`.
    pub fn range(&self, i: u64) -> std::ops::Range<u64> {
        let start = i * CHUNK;
        start..(start + CHUNK).min(self.header.image_size)
    }

    /// The CRC of chunk `i` if it is present.
    pub fn get(&self, i: u64) -> Option<u32> {
        let v = self
            .entries
            .get(usize::try_from(i).ok()?)?
            .load(Ordering::Acquire);
        (v & PRESENT != 0).then_some(v as u32)
    }

    /// Records chunk `i` present with `crc` or absent: a chunk is present
    /// in memory only once its map entry is written, absent at once.
    fn set(&self, i: u64, crc: Option<u32>) -> io::Result<()> {
        let e = usize::try_from(i)
            .ok()
            .and_then(|i| self.entries.get(i))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if crc.is_none() {
            e.store(0, Ordering::Release);
        }
        self.map
            .write_all_at(&entry_bytes(crc), HEADER_LEN + i * ENTRY_LEN)?;
        if let Some(c) = crc {
            e.store(PRESENT | u64::from(c), Ordering::Release);
        }
        Ok(())
    }

    /// Reads chunk `i` into `buf` (its length) and checks it against its
    /// CRC: `Ok(true)` if present and good, `Ok(false)` if absent or bad.
    pub fn read_chunk(&self, i: u64, buf: &mut [u8]) -> io::Result<Option<bool>> {
        let Some(crc) = self.get(i) else {
            return Ok(None);
        };
        self.data.read_exact_at(buf, i * CHUNK)?;
        Ok(Some(crc32c::crc32c(buf) == crc))
    }

    /// Stores chunk `i`'s bytes, then marks it present with their CRC.
    pub fn store_chunk(&self, i: u64, bytes: &[u8]) -> io::Result<()> {
        self.data.write_all_at(bytes, i * CHUNK)?;
        self.set(i, Some(crc32c::crc32c(bytes)))
    }

    /// Marks chunk `i` absent (it failed its check).
    pub fn drop_chunk(&self, i: u64) -> io::Result<()> {
        self.set(i, None)
    }
}

/// Writes `path` whole and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let f = File::create(path)?;
    f.write_all_at(bytes, 0)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "enbd-cache-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Sidecar bytes (the cache does not parse them).
    const A: Option<&[u8]> = Some(b"sidecar a");
    const B: Option<&[u8]> = Some(b"sidecar b");

    fn header(size: u64) -> Header {
        Header {
            chunk: CHUNK as u32,
            image_size: size,
            sums_digest: 7,
        }
    }

    #[test]
    fn the_header_round_trips_and_refuses_corruption() {
        let h = header(5 * CHUNK + 3);
        assert_eq!(h.chunks(), 6);
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        for i in [0, 9, 13, 17, 33, 61] {
            let mut c = b;
            c[i] ^= 1;
            assert!(Header::decode(&c).is_err(), "byte {i}");
        }
        assert!(Header::decode(&b[..10]).is_err());
    }

    #[test]
    fn the_map_survives_a_reopen_and_a_mismatch_discards_it() {
        let d = dir();
        let size = 3 * CHUNK + 100;
        let data = vec![5u8; CHUNK as usize];
        {
            let c = Cache::open(&d, "x", header(size), A).unwrap();
            assert_eq!(c.chunks(), 4);
            c.store_chunk(1, &data).unwrap();
            c.store_chunk(3, &data[..100]).unwrap();
        }
        let c = Cache::open(&d, "x", header(size), A).unwrap();
        assert_eq!(c.get(0), None);
        assert_eq!(c.get(1), Some(crc32c::crc32c(&data)));
        let mut buf = vec![0u8; CHUNK as usize];
        assert_eq!(c.read_chunk(1, &mut buf).unwrap(), Some(true));
        assert_eq!(c.read_chunk(0, &mut buf).unwrap(), None);
        let mut short = vec![0u8; 100];
        assert_eq!(c.read_chunk(3, &mut short).unwrap(), Some(true));
        // A flipped byte in the data fails the chunk's check.
        c.data.write_all_at(&[6], CHUNK + 17).unwrap();
        assert_eq!(c.read_chunk(1, &mut buf).unwrap(), Some(false));
        c.drop_chunk(1).unwrap();
        assert_eq!(c.get(1), None);
        drop(c);
        // A torn entry reads as absent.
        let (_, map) = paths(&d, "x");
        let f = OpenOptions::new().write(true).open(&map).unwrap();
        f.write_all_at(&[1], HEADER_LEN + 3 * ENTRY_LEN).unwrap();
        let c = Cache::open(&d, "x", header(size), A).unwrap();
        assert_eq!((c.get(1), c.get(3)), (None, None));
        c.store_chunk(0, &data).unwrap();
        drop(c);
        // Another sidecar (the upstream image changed): all is discarded.
        let other = Header {
            sums_digest: 8,
            ..header(size)
        };
        let c = Cache::open(&d, "x", other, B).unwrap();
        assert_eq!(c.get(0), None);
        drop(c);
        // As is a map with a corrupt header.
        let c = Cache::open(&d, "x", other, B).unwrap();
        c.store_chunk(0, &data).unwrap();
        drop(c);
        f.write_all_at(&[0xff], 20).unwrap();
        let c = Cache::open(&d, "x", other, B).unwrap();
        assert_eq!(c.get(0), None);
        drop(c);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_cache_is_kept_only_under_the_same_sidecar_bytes() {
        let d = dir();
        let data = vec![5u8; CHUNK as usize];
        let fill = |side| {
            let c = Cache::open(&d, "x", header(2 * CHUNK), side).unwrap();
            c.store_chunk(0, &data).unwrap();
        };
        let kept = |side| {
            Cache::open(&d, "x", header(2 * CHUNK), side)
                .unwrap()
                .get(0)
        };
        fill(A);
        assert_eq!(std::fs::read(sidecar_path(&d, "x")).unwrap(), A.unwrap());
        assert!(kept(A).is_some());
        // Another sidecar under the same header (as if its CRC collided).
        assert_eq!(kept(B), None);
        // Without upstream checksums nothing is ever kept, not even a
        // cache filled without them.
        fill(A);
        assert_eq!(kept(None), None);
        assert!(!sidecar_path(&d, "x").exists());
        fill(None);
        assert_eq!(kept(None), None);
        // A lost sidecar copy loses the cache.
        fill(A);
        std::fs::remove_file(sidecar_path(&d, "x")).unwrap();
        assert_eq!(kept(A), None);
        assert_eq!(recorded(&d, "x"), Some(header(2 * CHUNK)));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn two_proxies_cannot_share_a_cache() {
        let d = dir();
        let _c = Cache::open(&d, "x", header(CHUNK), A).unwrap();
        let e = format!("{:#}", Cache::open(&d, "x", header(CHUNK), A).unwrap_err());
        assert!(e.contains("in use"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_absurd_size_is_refused() {
        let d = dir();
        let e = format!(
            "{:#}",
            Cache::open(&d, "x", header(u64::MAX), A).unwrap_err()
        );
        assert!(e.contains("more than the proxy caches"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
