//! RAID0 (striped) and linear (concatenated) exports, as ENBD's server
//! offered them: one export spread over several components, each a regular
//! file or a block device opened and locked like a single image.
//!
//! [`Layout`] is the pure arithmetic from export offsets to component
//! offsets; [`Raid`] is the [`Storage`] that runs requests through it.

use std::io;
use std::path::{Path, PathBuf};

use crate::backend::{Backend, Run, Storage};

/// Stripe size when `stripe=` is not given.
pub const DEFAULT_STRIPE: u64 = 64 << 10;

/// Most pieces one `extents` call looks at: with a small stripe a long
/// range has very many (a 4 GiB BLOCK_STATUS over 64 KiB stripes, 65536),
/// each one or two `lseek`s. Past them the answer is a shorter prefix,
/// which BLOCK_STATUS allows and READ treats as data.
pub const MAX_EXTENT_PIECES: usize = 4096;

/// Alignment kept on every component: a request aligned on the export stays
/// aligned on the components (block devices with 4 KiB sectors, and
/// `BLKDISCARD`/`BLKZEROOUT`, refuse unaligned ranges).
pub const ALIGN: u64 = 4096;

/// How an export is spread over its components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stripes of `stripe` bytes dealt round-robin to the components.
    Raid0 { stripe: u64 },
    /// The components one after the other.
    Linear,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Raid0 { .. } => "raid0",
            Mode::Linear => "linear",
        }
    }
}

/// Component sizes a mode cannot use. `index` counts from 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("needs at least two components, got {0}")]
    TooFewComponents(usize),
    #[error("{size} bytes, smaller than one stripe ({stripe} bytes)")]
    SmallerThanStripe {
        index: usize,
        size: u64,
        stripe: u64,
    },
    #[error("it is empty")]
    Empty { index: usize },
    #[error(
        "{size} bytes, not a multiple of {ALIGN} bytes; only the last component of a linear \
         export may be"
    )]
    Unaligned { index: usize, size: u64 },
    #[error("the export would be larger than 2^64 bytes")]
    TooLarge,
    #[error("stripe size {0} is not a power of two of at least {ALIGN} bytes")]
    BadStripe(u64),
}

/// A request range that does not fit in the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("range {off}+{len} is outside the export ({size} bytes)")]
pub struct OutOfRange {
    pub off: u64,
    pub len: u64,
    pub size: u64,
}

impl From<OutOfRange> for io::Error {
    fn from(e: OutOfRange) -> Self {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

/// The mapping from export offsets to component offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Stripe `k` lives on component `k % count`, at `(k / count) * stripe`;
    /// each component holds `per_component` bytes of the export.
    Striped {
        stripe: u64,
        count: usize,
        per_component: u64,
    },
    /// Component `i` holds export bytes `ends[i-1]..ends[i]` (from 0 for the
    /// first).
    Linear { ends: Vec<u64> },
}

/// One piece of a request on one component: `len` bytes at `offset` on
/// component `component`, which are bytes `at..at + len` of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub component: usize,
    pub offset: u64,
    pub at: u64,
    pub len: u64,
}

/// A contiguous range on one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub component: usize,
    pub offset: u64,
    pub len: u64,
}

impl Layout {
    /// A striped layout over components of `sizes` bytes: each gives the
    /// smallest size rounded down to the stripe. Also returns, per
    /// component, the bytes left unused.
    pub fn striped(stripe: u64, sizes: &[u64]) -> Result<(Self, Vec<u64>), LayoutError> {
        if !stripe.is_power_of_two() || stripe < ALIGN {
            return Err(LayoutError::BadStripe(stripe));
        }
        if sizes.len() < 2 {
            return Err(LayoutError::TooFewComponents(sizes.len()));
        }
        for (index, &size) in sizes.iter().enumerate() {
            if size < stripe {
                return Err(LayoutError::SmallerThanStripe {
                    index,
                    size,
                    stripe,
                });
            }
        }
        let smallest = sizes.iter().copied().min().unwrap_or(0);
        let per_component = smallest - smallest % stripe;
        u64::try_from(sizes.len())
            .ok()
            .and_then(|n| n.checked_mul(per_component))
            .ok_or(LayoutError::TooLarge)?;
        let unused = sizes.iter().map(|s| s - per_component).collect();
        let layout = Layout::Striped {
            stripe,
            count: sizes.len(),
            per_component,
        };
        Ok((layout, unused))
    }

    /// A linear layout: every byte of every component, in order.
    pub fn linear(sizes: &[u64]) -> Result<Self, LayoutError> {
        if sizes.len() < 2 {
            return Err(LayoutError::TooFewComponents(sizes.len()));
        }
        let mut ends = Vec::with_capacity(sizes.len());
        let mut end = 0u64;
        for (index, &size) in sizes.iter().enumerate() {
            if size == 0 {
                return Err(LayoutError::Empty { index });
            }
            if size % ALIGN != 0 && index + 1 < sizes.len() {
                return Err(LayoutError::Unaligned { index, size });
            }
            end = end.checked_add(size).ok_or(LayoutError::TooLarge)?;
            ends.push(end);
        }
        Ok(Layout::Linear { ends })
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        match self {
            // Checked in `striped`.
            Layout::Striped {
                count,
                per_component,
                ..
            } => (*count as u64).saturating_mul(*per_component),
            Layout::Linear { ends } => ends.last().copied().unwrap_or(0),
        }
    }

    #[cfg(test)]
    fn components(&self) -> usize {
        match self {
            Layout::Striped { count, .. } => *count,
            Layout::Linear { ends } => ends.len(),
        }
    }

    fn check(&self, off: u64, len: u64) -> Result<u64, OutOfRange> {
        let size = self.size();
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(end),
            _ => Err(OutOfRange { off, len, size }),
        }
    }

    /// Where export byte `pos` (below the size) lives: component, offset on
    /// it, and how many bytes from there on stay contiguous on it.
    fn locate(&self, pos: u64) -> Option<(usize, u64, u64)> {
        match self {
            Layout::Striped { stripe, count, .. } => {
                let k = pos / stripe;
                let within = pos % stripe;
                let n = *count as u64;
                let component = usize::try_from(k % n).ok()?;
                Some((component, (k / n) * stripe + within, stripe - within))
            }
            Layout::Linear { ends } => {
                let i = ends.partition_point(|&e| e <= pos);
                let end = *ends.get(i)?;
                let start = if i == 0 { 0 } else { *ends.get(i - 1)? };
                Some((i, pos - start, end - pos))
            }
        }
    }

    /// The pieces of request `off..off + len`, in request order: one per
    /// stripe touched (raid0) or per component touched (linear).
    pub fn pieces(&self, off: u64, len: u64) -> Result<Pieces<'_>, OutOfRange> {
        let end = self.check(off, len)?;
        Ok(Pieces {
            layout: self,
            start: off,
            pos: off,
            end,
        })
    }

    /// The range each component holds of `off..off + len`, one span per
    /// component touched, in component order: what TRIM and WRITE_ZEROES
    /// need, with no per-stripe loop however long the range.
    pub fn spans(&self, off: u64, len: u64) -> Result<Vec<Span>, OutOfRange> {
        let end = self.check(off, len)?;
        let mut v = Vec::new();
        match self {
            Layout::Striped { stripe, count, .. } => {
                for component in 0..*count {
                    let lo = first_on(*stripe, *count, component, off);
                    let hi = first_on(*stripe, *count, component, end);
                    if hi > lo {
                        v.push(Span {
                            component,
                            offset: lo,
                            len: hi - lo,
                        });
                    }
                }
            }
            Layout::Linear { ends } => {
                let mut start = 0;
                for (component, &e) in ends.iter().enumerate() {
                    let lo = off.clamp(start, e);
                    let hi = end.clamp(start, e);
                    if hi > lo {
                        v.push(Span {
                            component,
                            offset: lo - start,
                            len: hi - lo,
                        });
                    }
                    start = e;
                }
            }
        }
        Ok(v)
    }
}

/// The offset on `component` of the first byte it holds at or after export
/// offset `pos` (its whole size when there is none).
fn first_on(stripe: u64, count: usize, component: usize, pos: u64) -> u64 {
    let (n, c) = (count as u64, component as u64);
    let k = pos / stripe;
    let row = k / n;
    match (k % n).cmp(&c) {
        std::cmp::Ordering::Equal => row * stripe + pos % stripe,
        // This row's stripe of `component` is still ahead.
        std::cmp::Ordering::Less => row * stripe,
        // It is behind: the next row's.
        std::cmp::Ordering::Greater => (row + 1) * stripe,
    }
}

/// Iterator over a request's [`Piece`]s.
#[derive(Debug)]
pub struct Pieces<'a> {
    layout: &'a Layout,
    start: u64,
    pos: u64,
    end: u64,
}

impl Iterator for Pieces<'_> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.pos >= self.end {
            return None;
        }
        let (component, offset, run) = self.layout.locate(self.pos)?;
        let len = run.min(self.end - self.pos);
        if len == 0 {
            return None;
        }
        let piece = Piece {
            component,
            offset,
            at: self.pos - self.start,
            len,
        };
        self.pos += len;
        Some(piece)
    }
}

/// A striped or linear export's storage.
#[derive(Debug)]
pub struct Raid {
    layout: Layout,
    components: Vec<Box<dyn Storage>>,
    /// `raid0:PATH1,PATH2`, for logs.
    label: PathBuf,
    read_only: bool,
}

/// Something a component's identity can be compared by: a block device by
/// its device number (two nodes may name one disk), a file by its inode.
fn identity(path: &Path) -> anyhow::Result<(bool, u64, u64)> {
    use anyhow::Context;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(if m.file_type().is_block_device() {
        (true, m.rdev(), 0)
    } else {
        (false, m.dev(), m.ino())
    })
}

impl Raid {
    /// Opens and locks each component like a single image (see
    /// [`Backend::open`]) and lays the export out over them. `export`
    /// names the export in the warning about unused space.
    pub fn open(
        export: &str,
        mode: Mode,
        paths: &[PathBuf],
        read_only: bool,
        shared: bool,
    ) -> anyhow::Result<Self> {
        // One component twice would overlap itself: refused even when
        // `shared`, under whatever names it is given.
        let mut seen: Vec<((bool, u64, u64), &Path)> = Vec::new();
        for p in paths {
            let id = identity(p)?;
            if let Some((_, first)) = seen.iter().find(|(i, _)| *i == id) {
                anyhow::bail!(
                    "{} and {} are the same {}: a component may be given once",
                    first.display(),
                    p.display(),
                    if id.0 { "block device" } else { "file" }
                );
            }
            seen.push((id, p));
        }
        let components = paths
            .iter()
            .map(|p| Ok(Box::new(Backend::open(p, read_only, shared)?) as Box<dyn Storage>))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Self::new(export, mode, components)
    }

    /// Lays an export out over storages already open (tests use wrappers).
    pub fn new(
        export: &str,
        mode: Mode,
        components: Vec<Box<dyn Storage>>,
    ) -> anyhow::Result<Self> {
        let sizes: Vec<u64> = components.iter().map(|c| c.size()).collect();
        let name_of = |i: usize| {
            components
                .get(i)
                .map(|c| c.path().display().to_string())
                .unwrap_or_default()
        };
        let fail = |e: LayoutError| {
            let which = match &e {
                LayoutError::SmallerThanStripe { index, .. }
                | LayoutError::Empty { index }
                | LayoutError::Unaligned { index, .. } => {
                    format!("component {}: ", name_of(*index))
                }
                _ => String::new(),
            };
            anyhow::anyhow!("{} export: {which}{e}", mode.name())
        };
        let layout = match mode {
            Mode::Raid0 { stripe } => {
                let (layout, unused) = Layout::striped(stripe, &sizes).map_err(fail)?;
                for (i, &u) in unused.iter().enumerate() {
                    if u > 0 {
                        tracing::warn!(
                            export,
                            component = %name_of(i),
                            unused_bytes = u,
                            "raid0 uses the smallest component's size (rounded down to the \
                             stripe) on each component: {u} bytes at the end of this one are \
                             not part of the export"
                        );
                    }
                }
                layout
            }
            Mode::Linear => Layout::linear(&sizes).map_err(fail)?,
        };
        let label = format!(
            "{}:{}",
            mode.name(),
            components
                .iter()
                .map(|c| c.path().display().to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        Ok(Self {
            layout,
            read_only: components.iter().any(|c| c.read_only()),
            components,
            label: label.into(),
        })
    }

    fn component(&self, i: usize) -> io::Result<&dyn Storage> {
        self.components
            .get(i)
            .map(|c| &**c)
            .ok_or_else(|| io::Error::other(format!("no component {i}")))
    }

    /// Runs `op` on each component's span of the range (offset and length
    /// on that component), in component order; the first error ends it.
    fn each_span(
        &self,
        off: u64,
        len: u64,
        op: impl Fn(&dyn Storage, u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        for s in self.layout.spans(off, len)? {
            op(self.component(s.component)?, s.offset, s.len)?;
        }
        Ok(())
    }
}

/// The request bytes of a piece, without a panic on a bad mapping.
fn range(p: &Piece) -> io::Result<std::ops::Range<usize>> {
    let at = usize::try_from(p.at).map_err(io::Error::other)?;
    let len = usize::try_from(p.len).map_err(io::Error::other)?;
    Ok(at..at
        .checked_add(len)
        .ok_or_else(|| io::Error::other("piece overflows"))?)
}

fn bad_piece() -> io::Error {
    io::Error::other("piece outside the request buffer")
}

/// Pieces end early only on a broken layout: never succeed on half a
/// request.
fn covered(done: u64, len: usize) -> io::Result<()> {
    if done == len as u64 {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "layout covered {done} of {len} bytes"
        )))
    }
}

impl Storage for Raid {
    fn size(&self) -> u64 {
        self.layout.size()
    }

    fn path(&self) -> &Path {
        &self.label
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0;
        for p in self.layout.pieces(off, buf.len() as u64)? {
            let part = buf.get_mut(range(&p)?).ok_or_else(bad_piece)?;
            self.component(p.component)?.read_at(part, p.offset)?;
            done += p.len;
        }
        covered(done, buf.len())
    }

    fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
        let mut done = 0;
        for p in self.layout.pieces(off, buf.len() as u64)? {
            let part = buf.get(range(&p)?).ok_or_else(bad_piece)?;
            self.component(p.component)?.write_at(part, p.offset, fua)?;
            done += p.len;
        }
        covered(done, buf.len())
    }

    /// Flushes every component, even after one fails, and reports the
    /// first failure.
    fn flush(&self) -> io::Result<()> {
        let mut first = Ok(());
        for c in &self.components {
            if let Err(e) = c.flush() {
                tracing::warn!(component = %c.path().display(), "flush: {e}");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.each_span(off, len, |c, o, n| c.trim(o, n))
    }

    fn write_zeroes(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.each_span(off, len, |c, o, n| c.write_zeroes(o, n, may_trim))
    }

    /// Each piece's runs from its component, in export order, merged where
    /// neighbours agree. Stops early (a prefix of the range, as the
    /// contract allows) at `max` runs, after [`MAX_EXTENT_PIECES`] pieces,
    /// or where a component answered only the start of its piece.
    fn extents(&self, off: u64, len: u64, max: usize) -> io::Result<Vec<Run>> {
        let max = max.max(1);
        let mut runs: Vec<Run> = Vec::new();
        'pieces: for p in self.layout.pieces(off, len)?.take(MAX_EXTENT_PIECES) {
            // One more than is left: the first may merge with the last.
            let room = (max - runs.len()).saturating_add(1);
            let mut left = p.len;
            for r in self
                .component(p.component)?
                .extents(p.offset, p.len, room)?
            {
                // Never past the piece, whatever the component says.
                let n = r.len.min(left);
                if n == 0 {
                    continue;
                }
                let full = runs.len() == max;
                match runs.last_mut() {
                    Some(last) if last.hole == r.hole => last.len += n,
                    _ if full => break 'pieces,
                    _ => runs.push(Run {
                        len: n,
                        hole: r.hole,
                    }),
                }
                left -= n;
            }
            if left > 0 {
                // The component stopped short: what follows is unknown.
                break;
            }
        }
        if runs.is_empty() && len > 0 {
            runs.push(Run { len, hole: false });
        }
        Ok(runs)
    }

    /// Readahead on each component's span of the range.
    fn cache(&self, off: u64, len: u64) -> io::Result<()> {
        self.each_span(off, len, |c, o, n| c.cache(o, n))
    }

    /// Each component's span zeroed fast, in component order. Whether a
    /// component can is only known by trying, so a refusal after another
    /// component succeeded leaves zeroes there: still right, since zeroes
    /// are what the client asked for, and it writes the rest the slow way
    /// after the `EOPNOTSUPP`.
    fn write_zeroes_fast(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.each_span(off, len, |c, o, n| c.write_zeroes_fast(o, n, may_trim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{noise, TempFile};
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    const K: u64 = 1024;

    /// Where each export byte lives, built the slow way: stripes dealt out
    /// one by one, or components laid end to end.
    fn reference_map(layout: &Layout) -> Vec<(usize, u64)> {
        let mut map = Vec::new();
        match layout {
            Layout::Striped {
                stripe,
                count,
                per_component,
            } => {
                let mut next = vec![0u64; *count];
                let mut c = 0;
                while next[c] < *per_component {
                    for _ in 0..*stripe {
                        map.push((c, next[c]));
                        next[c] += 1;
                    }
                    c = (c + 1) % count;
                }
            }
            Layout::Linear { ends } => {
                let mut start = 0;
                for (c, &e) in ends.iter().enumerate() {
                    for b in 0..e - start {
                        map.push((c, b));
                    }
                    start = e;
                }
            }
        }
        map
    }

    /// Checks pieces and spans of one request against the reference map.
    fn check_request(layout: &Layout, map: &[(usize, u64)], off: u64, len: u64) {
        let pieces: Vec<Piece> = layout.pieces(off, len).unwrap().collect();
        let mut at = 0;
        for p in &pieces {
            assert_eq!(p.at, at, "pieces are in request order, without gaps");
            assert!(p.len > 0, "no empty pieces");
            for b in 0..p.len {
                assert_eq!(
                    map[(off + p.at + b) as usize],
                    (p.component, p.offset + b),
                    "byte {} of {off}+{len}",
                    p.at + b
                );
            }
            at += p.len;
        }
        assert_eq!(at, len, "pieces cover the request");
        // Spans: exactly the bytes the pieces touch, per component, as one
        // contiguous range each.
        let spans = layout.spans(off, len).unwrap();
        for c in 0..layout.components() {
            let mut on_c: Vec<u64> = (off..off + len)
                .map(|b| map[b as usize])
                .filter(|(cc, _)| *cc == c)
                .map(|(_, o)| o)
                .collect();
            on_c.sort_unstable();
            let span = spans.iter().find(|s| s.component == c);
            match (on_c.first(), span) {
                (None, None) => {}
                (Some(&lo), Some(s)) => {
                    assert_eq!(s.offset, lo, "span start on {c}");
                    assert_eq!(s.len, on_c.len() as u64, "span length on {c}");
                    assert_eq!(*on_c.last().unwrap(), lo + s.len - 1, "contiguous on {c}");
                }
                (a, b) => panic!("component {c}: bytes {a:?}, span {b:?}"),
            }
        }
    }

    #[test]
    fn striped_mapping_by_hand() {
        // Three components of 3, 4 and 5 stripes of 4 KiB: 3 stripes each.
        let (l, unused) = Layout::striped(4 * K, &[12 * K, 16 * K, 20 * K + 5]).unwrap();
        assert_eq!(l.size(), 36 * K);
        assert_eq!(unused, [0, 4 * K, 8 * K + 5]);
        // The smallest rounded down to the stripe.
        let (r, unused) = Layout::striped(4 * K, &[12 * K + 100, 16 * K]).unwrap();
        assert_eq!(r.size(), 24 * K);
        assert_eq!(unused, [100, 4 * K]);
        // Across stripes 2..=4: the end of component 2's first stripe, all
        // of component 0's second, the start of component 1's second.
        let p: Vec<Piece> = l.pieces(8 * K + 100, 8 * K).unwrap().collect();
        assert_eq!(
            p,
            [
                Piece {
                    component: 2,
                    offset: 100,
                    at: 0,
                    len: 4 * K - 100
                },
                Piece {
                    component: 0,
                    offset: 4 * K,
                    at: 4 * K - 100,
                    len: 4 * K
                },
                Piece {
                    component: 1,
                    offset: 4 * K,
                    at: 8 * K - 100,
                    len: 100
                },
            ]
        );
        // The last stripe is component 2's last.
        let p: Vec<Piece> = l.pieces(36 * K - 1, 1).unwrap().collect();
        assert_eq!(
            p,
            [Piece {
                component: 2,
                offset: 12 * K - 1,
                at: 0,
                len: 1
            }]
        );
        assert_eq!(
            l.spans(0, 36 * K).unwrap(),
            (0..3)
                .map(|component| Span {
                    component,
                    offset: 0,
                    len: 12 * K
                })
                .collect::<Vec<_>>()
        );
        // From the middle of component 1's first stripe to the middle of
        // component 0's third.
        assert_eq!(
            l.spans(6 * K, 20 * K).unwrap(),
            [
                Span {
                    component: 0,
                    offset: 4 * K,
                    len: 6 * K
                },
                Span {
                    component: 1,
                    offset: 2 * K,
                    len: 6 * K
                },
                Span {
                    component: 2,
                    offset: 0,
                    len: 8 * K
                },
            ]
        );
        assert!(l.pieces(0, 0).unwrap().next().is_none());
        assert!(l.spans(36 * K, 0).unwrap().is_empty());
    }

    #[test]
    fn linear_mapping_by_hand() {
        let l = Layout::linear(&[8 * K, 4 * K, 1000]).unwrap();
        assert_eq!(l.size(), 12 * K + 1000);
        let p: Vec<Piece> = l.pieces(8 * K - 10, 4 * K + 20).unwrap().collect();
        assert_eq!(
            p,
            [
                Piece {
                    component: 0,
                    offset: 8 * K - 10,
                    at: 0,
                    len: 10
                },
                Piece {
                    component: 1,
                    offset: 0,
                    at: 10,
                    len: 4 * K
                },
                Piece {
                    component: 2,
                    offset: 0,
                    at: 4 * K + 10,
                    len: 10
                },
            ]
        );
        assert_eq!(
            l.spans(12 * K, 1000).unwrap(),
            [Span {
                component: 2,
                offset: 0,
                len: 1000
            }]
        );
    }

    #[test]
    fn sizes_each_mode_refuses() {
        use LayoutError::*;
        assert_eq!(Layout::striped(4 * K, &[8 * K]), Err(TooFewComponents(1)));
        assert_eq!(Layout::linear(&[]), Err(TooFewComponents(0)));
        for bad in [0, 512, 6 * K, 4 * K + 1] {
            assert_eq!(Layout::striped(bad, &[64 * K; 2]), Err(BadStripe(bad)));
        }
        assert_eq!(
            Layout::striped(8 * K, &[64 * K, 4 * K]),
            Err(SmallerThanStripe {
                index: 1,
                size: 4 * K,
                stripe: 8 * K
            })
        );
        assert_eq!(Layout::linear(&[4 * K, 0]), Err(Empty { index: 1 }));
        assert_eq!(
            Layout::linear(&[4 * K + 512, 4 * K]),
            Err(Unaligned {
                index: 0,
                size: 4 * K + 512
            })
        );
        assert!(
            Layout::linear(&[4 * K, 4 * K + 512]).is_ok(),
            "the last may be ragged"
        );
        assert_eq!(Layout::linear(&[u64::MAX - 4095, 8 * K]), Err(TooLarge));
        assert_eq!(
            Layout::striped(1 << 62, &[1 << 62; 5]).map(|_| ()),
            Err(TooLarge)
        );
    }

    #[test]
    fn ranges_outside_are_errors_without_overflow() {
        // 2^63 bytes: offsets near the top of u64.
        let (l, _) = Layout::striped(1 << 20, &[1 << 62, 1 << 62]).unwrap();
        let size = 1u64 << 63;
        assert_eq!(l.size(), size);
        let p: Vec<Piece> = l.pieces(size - 10, 10).unwrap().collect();
        assert_eq!(
            p,
            [Piece {
                component: 1,
                offset: (1 << 62) - 10,
                at: 0,
                len: 10
            }]
        );
        assert!(l.pieces(size - 10, 11).is_err());
        assert!(l.pieces(u64::MAX, 1).is_err());
        assert!(l.spans(u64::MAX, u64::MAX).is_err());
        assert!(l.spans(size, 0).unwrap().is_empty());
        let lin = Layout::linear(&[4 * K, 4 * K]).unwrap();
        let e = lin.pieces(8 * K, 1).unwrap_err();
        assert_eq!(
            e,
            OutOfRange {
                off: 8 * K,
                len: 1,
                size: 8 * K
            }
        );
    }

    fn any_layout() -> impl Strategy<Value = Layout> {
        let striped = (0u32..3, prop::collection::vec(1u64..6, 2..5), 0u64..3).prop_map(
            |(shift, stripes, extra)| {
                let stripe = (4 * K) << shift;
                let sizes: Vec<u64> = stripes.iter().map(|s| s * stripe + extra * 512).collect();
                Layout::striped(stripe, &sizes).unwrap().0
            },
        );
        let linear = prop::collection::vec(1u64..5, 2..5)
            .prop_flat_map(|pages| (Just(pages), 1u64..4096))
            .prop_map(|(pages, last)| {
                let mut sizes: Vec<u64> = pages.iter().map(|p| p * 4 * K).collect();
                sizes.push(last);
                Layout::linear(&sizes).unwrap()
            });
        prop_oneof![striped, linear]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn mapping_matches_the_reference(
            layout in any_layout(),
            a in any::<prop::sample::Index>(),
            b in any::<prop::sample::Index>(),
        ) {
            let map = reference_map(&layout);
            prop_assert_eq!(map.len() as u64, layout.size());
            let (x, y) = (a.index(map.len() + 1), b.index(map.len() + 1));
            let (off, end) = (x.min(y) as u64, x.max(y) as u64);
            check_request(&layout, &map, off, end - off);
        }
    }

    /// Component files of the given sizes, each filled with its own byte.
    fn files(sizes: &[u64]) -> Vec<TempFile> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| TempFile::new(s, 0xa0 + i as u8))
            .collect()
    }

    fn open(mode: Mode, files: &[TempFile]) -> anyhow::Result<Raid> {
        let paths: Vec<PathBuf> = files.iter().map(|f| f.path().to_owned()).collect();
        Raid::open("test", mode, &paths, false, false)
    }

    /// Writes, zeroes and trims through the storage and a reference buffer
    /// alike, then compares every byte read back.
    fn exercise(s: &Raid) -> Vec<u8> {
        let size = s.size() as usize;
        let mut reference = vec![0u8; size];
        s.read_at(&mut reference, 0).unwrap();
        let ops: [(usize, usize); 5] = [
            (0, size),
            (100, 9000),
            (size - 5000, 5000),
            (4096 * 3 - 1, 4096 * 2 + 2),
            (size / 2, 1),
        ];
        for (i, &(off, len)) in ops.iter().enumerate() {
            let data = noise(len, i as u64 + 7);
            s.write_at(&data, off as u64, i % 2 == 1).unwrap();
            reference[off..off + len].copy_from_slice(&data);
        }
        s.write_zeroes(5000, 20000, false).unwrap();
        reference[5000..25000].fill(0);
        s.write_zeroes(26 * 1024, 8192, true).unwrap();
        reference[26 * 1024..34 * 1024].fill(0);
        // A hint: the data may stay or go (on a file, a hole punched).
        s.trim(0, 4096).unwrap();
        let mut trimmed = vec![0u8; 4096];
        s.read_at(&mut trimmed, 0).unwrap();
        assert!(trimmed == reference[..4096] || trimmed == [0; 4096], "trim");
        reference[..4096].copy_from_slice(&trimmed);
        let mut back = vec![0u8; size];
        s.read_at(&mut back, 0).unwrap();
        assert!(
            back == reference,
            "export content differs from the reference"
        );
        // Odd-sized reads across pieces.
        for (off, len) in [(1, 7000), (size - 3, 3), (4095, 4098)] {
            let mut b = vec![0u8; len];
            s.read_at(&mut b, off as u64).unwrap();
            assert!(b == reference[off..off + len], "read {off}+{len}");
        }
        s.flush().unwrap();
        reference
    }

    #[test]
    fn striped_export_content_and_on_disk_layout() {
        let stripe = 8 * K;
        // 5, 6 and 7 stripes (+ a ragged tail): 5 stripes of each are used.
        let f = files(&[40 * K, 48 * K, 56 * K + 100]);
        let s = open(Mode::Raid0 { stripe }, &f).unwrap();
        assert_eq!(s.size(), 3 * 40 * K);
        let data = exercise(&s);
        // Stripe k is on component k % 3 at (k / 3) * stripe.
        for k in 0..15u64 {
            let c = (k % 3) as usize;
            let piece = f[c].read((k / 3) * stripe, stripe as usize);
            assert!(
                piece == data[(k * stripe) as usize..((k + 1) * stripe) as usize],
                "stripe {k} on component {c}"
            );
        }
        // The unused tails are untouched.
        assert_eq!(f[1].read(40 * K, 8 * 1024), vec![0xa1; 8 * 1024]);
        assert_eq!(
            f[2].read(40 * K, 16 * 1024 + 100),
            vec![0xa2; 16 * 1024 + 100]
        );
    }

    #[test]
    fn linear_export_content_and_on_disk_layout() {
        let f = files(&[16 * K, 8 * K, 12 * K + 300]);
        let s = open(Mode::Linear, &f).unwrap();
        assert_eq!(s.size(), 36 * K + 300);
        let data = exercise(&s);
        assert!(f[0].read(0, 16 * 1024) == data[..16 * 1024]);
        assert!(f[1].read(0, 8 * 1024) == data[16 * 1024..24 * 1024]);
        assert!(f[2].read(0, 12 * 1024 + 300) == data[24 * 1024..]);
    }

    #[test]
    fn open_refuses_what_the_mode_cannot_use() {
        let f = files(&[16 * K, 4 * K]);
        let e = format!("{:#}", open(Mode::Raid0 { stripe: 8 * K }, &f).unwrap_err());
        assert!(
            e.contains("smaller than one stripe") && e.contains(&f[1].path().display().to_string()),
            "{e}"
        );
        let f = files(&[5000, 4 * K]);
        let e = format!("{:#}", open(Mode::Linear, &f).unwrap_err());
        assert!(e.contains("not a multiple of 4096"), "{e}");
        // One file under two names.
        let f = files(&[16 * K]);
        let dir = std::env::temp_dir();
        let name = f[0].path().file_name().unwrap();
        let other = dir.join(".").join(name);
        let paths = [f[0].path().to_owned(), other];
        let e = format!(
            "{:#}",
            Raid::open("t", Mode::Linear, &paths, false, true).unwrap_err()
        );
        assert!(e.contains("are the same file"), "{e}");
    }

    #[test]
    fn each_component_is_locked() {
        let f = files(&[16 * K, 16 * K]);
        let _held = Backend::open(f[1].path(), false, false).unwrap();
        let e = format!("{:#}", open(Mode::Linear, &f).unwrap_err());
        assert!(
            e.contains("in use") && e.contains(&f[1].path().display().to_string()),
            "{e}"
        );
        let paths: Vec<PathBuf> = f.iter().map(|f| f.path().to_owned()).collect();
        Raid::open("t", Mode::Linear, &paths, false, true).expect("shared overrides the lock");
    }

    /// A component that fails every request with `errno` (if not 0), and
    /// counts flushes and FUA writes.
    #[derive(Debug)]
    struct Fake {
        inner: Backend,
        errno: i32,
        flushes: Arc<AtomicU32>,
        fua_writes: Arc<AtomicU32>,
    }

    impl Fake {
        fn check(&self) -> io::Result<()> {
            match self.errno {
                0 => Ok(()),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        }
    }

    impl Storage for Fake {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn path(&self) -> &Path {
            self.inner.path()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.check()?;
            self.inner.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
            if fua {
                self.fua_writes.fetch_add(1, Ordering::SeqCst);
            }
            self.check()?;
            self.inner.write_at(buf, off, fua)
        }
        fn flush(&self) -> io::Result<()> {
            self.flushes.fetch_add(1, Ordering::SeqCst);
            self.check()?;
            self.inner.flush()
        }
        fn trim(&self, off: u64, len: u64) -> io::Result<()> {
            self.check()?;
            self.inner.trim(off, len)
        }
        fn write_zeroes(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
            self.check()?;
            self.inner.write_zeroes(off, len, may_trim)
        }
    }

    /// Fakes over `files`, failing with `errnos`, sharing two counters.
    fn fakes(
        files: &[TempFile],
        errnos: &[i32],
    ) -> (Vec<Box<dyn Storage>>, Arc<AtomicU32>, Arc<AtomicU32>) {
        let flushes = Arc::new(AtomicU32::new(0));
        let fua_writes = Arc::new(AtomicU32::new(0));
        let v = files
            .iter()
            .zip(errnos)
            .map(|(f, &errno)| {
                Box::new(Fake {
                    inner: Backend::open(f.path(), false, true).unwrap(),
                    errno,
                    flushes: flushes.clone(),
                    fua_writes: fua_writes.clone(),
                }) as Box<dyn Storage>
            })
            .collect();
        (v, flushes, fua_writes)
    }

    #[test]
    fn fua_reaches_each_piece_and_flush_each_component() {
        let f = files(&[16 * K, 16 * K]);
        let (c, flushes, fua) = fakes(&f, &[0, 0]);
        let s = Raid::new("t", Mode::Raid0 { stripe: 4 * K }, c).unwrap();
        s.write_at(&[1; 12 * 1024], 2 * K, true).unwrap();
        assert_eq!(
            fua.load(Ordering::SeqCst),
            4,
            "three stripes and a bit: four pieces"
        );
        s.write_at(&[1; 12 * 1024], 0, false).unwrap();
        assert_eq!(fua.load(Ordering::SeqCst), 4, "no FUA asked");
        s.flush().unwrap();
        assert_eq!(flushes.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failing_component_fails_only_requests_that_touch_it() {
        let f = files(&[16 * K, 16 * K, 16 * K]);
        let (c, flushes, _) = fakes(&f, &[0, libc::EIO, libc::ENOSPC]);
        let s = Raid::new("t", Mode::Raid0 { stripe: 4 * K }, c).unwrap();
        let errno = |r: io::Result<()>| r.unwrap_err().raw_os_error();
        let mut buf = vec![0u8; 4096];
        s.read_at(&mut buf, 0)
            .expect("stripe 0 is on the good component");
        s.write_at(&buf, 12 * K, true).expect("so is stripe 3");
        assert_eq!(errno(s.read_at(&mut buf, 4 * K)), Some(libc::EIO));
        assert_eq!(errno(s.write_at(&buf, 8 * K, false)), Some(libc::ENOSPC));
        assert_eq!(errno(s.write_zeroes(0, 8 * K, false)), Some(libc::EIO));
        assert_eq!(errno(s.trim(8 * K, 4 * K)), Some(libc::ENOSPC));
        s.trim(0, 4 * K).unwrap();
        // Flush: every component, the first error reported.
        assert_eq!(errno(s.flush()), Some(libc::EIO));
        assert_eq!(
            flushes.load(Ordering::SeqCst),
            3,
            "every component was flushed, past the failures"
        );
    }

    /// A file of `len` bytes, all hole but for the 4 KiB blocks in `data`
    /// (the last one clipped to the end), which hold `0x5d`.
    fn sparse(len: u64, data: &[u64]) -> TempFile {
        use std::os::unix::fs::FileExt;
        let f = TempFile::new(0, 0);
        f.truncate(len);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .unwrap();
        for &b in data {
            let n = (4 * K).min(len - b * 4 * K) as usize;
            file.write_all_at(&vec![0x5d; n], b * 4 * K).unwrap();
        }
        f
    }

    fn open_shared(mode: Mode, files: &[TempFile]) -> Raid {
        let paths: Vec<PathBuf> = files.iter().map(|f| f.path().to_owned()).collect();
        Raid::open("test", mode, &paths, false, true).unwrap()
    }

    /// Hole or not, byte by byte, of what `runs` cover.
    fn bytes_of(runs: &[Run]) -> Vec<bool> {
        runs.iter()
            .flat_map(|r| std::iter::repeat_n(r.hole, r.len as usize))
            .collect()
    }

    /// Checks `extents(off, len, max)` of `s` against `holes`, the hole
    /// status of every export byte: a prefix of the range (all of it
    /// unless `max` runs were reached), runs non-empty and merged.
    fn check_extents(s: &Raid, holes: &[bool], off: u64, len: u64, max: usize) {
        let runs = s.extents(off, len, max).unwrap();
        assert!(runs.len() <= max.max(1), "{} runs, max {max}", runs.len());
        assert!(runs.iter().all(|r| r.len > 0), "empty run: {runs:?}");
        assert!(
            runs.windows(2).all(|w| w[0].hole != w[1].hole),
            "unmerged: {runs:?}"
        );
        let got = bytes_of(&runs);
        assert!(got.len() as u64 <= len, "past the request: {runs:?}");
        if (got.len() as u64) < len {
            assert_eq!(runs.len(), max.max(1), "stopped short: {runs:?}");
        }
        let want = &holes[off as usize..off as usize + got.len()];
        assert!(got == want, "extents of {off}+{len} (max {max}): {runs:?}");
    }

    #[test]
    fn extents_by_hand() {
        // Two components, 4 KiB stripes: stripe k on component k % 2.
        // Component 0 has data in its blocks 1 and 2 (export stripes 2
        // and 4), component 1 in block 2 (stripe 5).
        let f = [sparse(32 * K, &[1, 2]), sparse(32 * K, &[2])];
        let s = open_shared(Mode::Raid0 { stripe: 4 * K }, &f);
        let run = |k: u64, hole| Run { len: k * K, hole };
        assert_eq!(
            s.extents(0, 64 * K, 100).unwrap(),
            [
                run(8, true),
                run(4, false),
                run(4, true),
                run(8, false),
                run(40, true)
            ]
        );
        // The bound: a prefix, merged across the pieces it spans; 0 is 1,
        // and no bound is no overflow.
        assert_eq!(s.extents(0, 64 * K, 1).unwrap(), [run(8, true)]);
        assert_eq!(s.extents(0, 64 * K, 0).unwrap(), [run(8, true)]);
        assert_eq!(s.extents(0, 64 * K, usize::MAX).unwrap().len(), 5);
        assert_eq!(
            s.extents(0, 64 * K, 2).unwrap(),
            [run(8, true), run(4, false)]
        );
        assert_eq!(
            s.extents(17 * K, 10 * K, 2).unwrap(),
            [
                Run {
                    len: 7 * K,
                    hole: false
                },
                run(3, true)
            ]
        );
        // At the end of the export, and inside one stripe.
        assert_eq!(s.extents(60 * K, 4 * K, 8).unwrap(), [run(4, true)]);
        assert_eq!(s.extents(21 * K, 2 * K, 8).unwrap(), [run(2, false)]);
        assert!(s.extents(64 * K, 1, 8).is_err(), "past the end");
        // Linear: the same files end to end.
        let l = open_shared(Mode::Linear, &f);
        assert_eq!(
            l.extents(0, 64 * K, 100).unwrap(),
            [
                run(4, true),
                run(8, false),
                run(28, true),
                run(4, false),
                run(20, true)
            ]
        );
        assert_eq!(
            l.extents(28 * K, 16 * K, 100).unwrap(),
            [run(12, true), run(4, false)],
            "a hole across the boundary is one run"
        );
        // A component that used up the bound answers only the start of
        // its piece: the next piece must not be merged across the gap
        // (component 1's hole at 8 KiB).
        let f = [
            sparse(4 * K, &[]),
            sparse(16 * K, &[1, 3]),
            sparse(16 * K, &[0]),
        ];
        let l = open_shared(Mode::Linear, &f);
        assert_eq!(
            l.extents(0, 36 * K, 2).unwrap(),
            [run(8, true), run(4, false)]
        );
    }

    #[test]
    fn extents_bound_the_pieces_looked_at() {
        // 64 MiB, all hole, over 4 KiB stripes: 16384 pieces.
        let f = [TempFile::new(32 << 20, 0), TempFile::new(32 << 20, 0)];
        let s = open_shared(Mode::Raid0 { stripe: 4 * K }, &f);
        let runs = s.extents(0, 64 << 20, 1024).unwrap();
        assert_eq!(
            runs,
            [Run {
                len: MAX_EXTENT_PIECES as u64 * 4 * K,
                hole: true
            }]
        );
        // The linear export of the same files has two pieces.
        let l = open_shared(Mode::Linear, &f);
        assert_eq!(
            l.extents(0, 64 << 20, 1024).unwrap(),
            [Run {
                len: 64 << 20,
                hole: true
            }]
        );
    }

    /// A layout's components as sparse files with data in the blocks the
    /// seed picks, and the hole status of every export byte.
    fn sparse_export(layout: &Layout, seed: u64) -> (Raid, Vec<TempFile>, Vec<bool>) {
        let map = reference_map(layout);
        let (mode, sizes) = match layout {
            Layout::Striped {
                stripe,
                count,
                per_component,
            } => (
                Mode::Raid0 { stripe: *stripe },
                vec![*per_component; *count],
            ),
            Layout::Linear { ends } => {
                let mut start = 0;
                let sizes = ends
                    .iter()
                    .map(|&e| {
                        let s = e - start;
                        start = e;
                        s
                    })
                    .collect();
                (Mode::Linear, sizes)
            }
        };
        let bits = noise(sizes.len() * 64, seed);
        let data: Vec<Vec<u64>> = sizes
            .iter()
            .enumerate()
            .map(|(c, &size)| {
                (0..size.div_ceil(4 * K))
                    .filter(|&b| bits[c * 64 + b as usize % 64].is_multiple_of(3))
                    .collect()
            })
            .collect();
        let files: Vec<TempFile> = sizes
            .iter()
            .zip(&data)
            .map(|(&size, d)| sparse(size, d))
            .collect();
        let holes = map
            .iter()
            .map(|&(c, o)| !data[c].contains(&(o / (4 * K))))
            .collect();
        (open_shared(mode, &files), files, holes)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(100))]

        #[test]
        fn extents_match_the_component_layout(
            layout in any_layout(),
            seed in any::<u64>(),
            a in any::<prop::sample::Index>(),
            b in any::<prop::sample::Index>(),
            max in prop_oneof![1usize..4, Just(1024usize)],
        ) {
            let (s, _files, holes) = sparse_export(&layout, seed);
            prop_assert_eq!(s.size(), holes.len() as u64);
            let (x, y) = (a.index(holes.len() + 1), b.index(holes.len() + 1));
            let (off, end) = (x.min(y) as u64, x.max(y) as u64);
            check_extents(&s, &holes, off, end - off, max);
            check_extents(&s, &holes, 0, s.size(), 1024);
        }
    }

    /// A component that records its readahead hints and can refuse fast
    /// zeroing.
    #[derive(Debug)]
    struct Hinted {
        inner: Backend,
        index: usize,
        refuse_fast: bool,
        caches: Arc<std::sync::Mutex<Vec<(usize, u64, u64)>>>,
    }

    impl Storage for Hinted {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn path(&self) -> &Path {
            self.inner.path()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.inner.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
            self.inner.write_at(buf, off, fua)
        }
        fn flush(&self) -> io::Result<()> {
            self.inner.flush()
        }
        fn trim(&self, off: u64, len: u64) -> io::Result<()> {
            self.inner.trim(off, len)
        }
        fn write_zeroes(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
            self.inner.write_zeroes(off, len, may_trim)
        }
        fn extents(&self, off: u64, len: u64, max: usize) -> io::Result<Vec<Run>> {
            self.inner.extents(off, len, max)
        }
        fn cache(&self, off: u64, len: u64) -> io::Result<()> {
            self.caches.lock().unwrap().push((self.index, off, len));
            self.inner.cache(off, len)
        }
        fn write_zeroes_fast(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
            if self.refuse_fast {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            self.inner.write_zeroes_fast(off, len, may_trim)
        }
    }

    type Caches = Arc<std::sync::Mutex<Vec<(usize, u64, u64)>>>;

    fn hinted(files: &[TempFile], refuse_fast: &[bool]) -> (Vec<Box<dyn Storage>>, Caches) {
        let caches = Caches::default();
        let v = files
            .iter()
            .zip(refuse_fast)
            .enumerate()
            .map(|(index, (f, &refuse_fast))| {
                Box::new(Hinted {
                    inner: Backend::open(f.path(), false, true).unwrap(),
                    index,
                    refuse_fast,
                    caches: caches.clone(),
                }) as Box<dyn Storage>
            })
            .collect();
        (v, caches)
    }

    #[test]
    fn cache_reaches_each_component_span() {
        let f = files(&[12 * K, 16 * K, 20 * K]);
        let (c, caches) = hinted(&f, &[false; 3]);
        let s = Raid::new("t", Mode::Raid0 { stripe: 4 * K }, c).unwrap();
        s.cache(6 * K, 20 * K).unwrap();
        assert_eq!(
            *caches.lock().unwrap(),
            [(0, 4 * K, 6 * K), (1, 2 * K, 6 * K), (2, 0, 8 * K)]
        );
        let f = files(&[8 * K, 8 * K]);
        let (c, caches) = hinted(&f, &[false; 2]);
        let l = Raid::new("t", Mode::Linear, c).unwrap();
        l.cache(4 * K, 8 * K).unwrap();
        assert_eq!(*caches.lock().unwrap(), [(0, 4 * K, 4 * K), (1, 0, 4 * K)]);
        assert!(l.cache(12 * K, 8 * K).is_err(), "past the end");
    }

    #[test]
    fn fast_zero_on_each_component_or_refused() {
        let errno = |r: io::Result<()>| r.unwrap_err().raw_os_error();
        // Punched on both: the data goes, as holes.
        let f = files(&[16 * K, 16 * K]);
        let (c, _) = hinted(&f, &[false, false]);
        let s = Raid::new("t", Mode::Raid0 { stripe: 4 * K }, c).unwrap();
        s.write_zeroes_fast(4 * K, 16 * K, true).unwrap();
        let mut buf = vec![1u8; 32 * 1024];
        s.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096] == [0xa0; 4096] && buf[20 * 1024..24 * 1024] == [0xa1; 4096]);
        assert!(buf[4096..20 * 1024].iter().all(|&b| b == 0), "zeroed");
        assert_eq!(
            s.extents(0, 32 * K, 100).unwrap(),
            [
                Run {
                    len: 4 * K,
                    hole: false
                },
                Run {
                    len: 16 * K,
                    hole: true
                },
                Run {
                    len: 12 * K,
                    hole: false
                },
            ]
        );
        // The first component refuses: nothing is written anywhere.
        let f = files(&[16 * K, 16 * K]);
        let (c, _) = hinted(&f, &[true, false]);
        let s = Raid::new("t", Mode::Linear, c).unwrap();
        assert_eq!(
            errno(s.write_zeroes_fast(8 * K, 16 * K, true)),
            Some(libc::EOPNOTSUPP)
        );
        assert_eq!(f[0].read(0, 16 * 1024), vec![0xa0; 16 * 1024]);
        assert_eq!(f[1].read(0, 16 * 1024), vec![0xa1; 16 * 1024]);
        // The second refuses: the first's span holds the zeroes asked for.
        let (c, _) = hinted(&f, &[false, true]);
        let s = Raid::new("t", Mode::Linear, c).unwrap();
        assert_eq!(
            errno(s.write_zeroes_fast(8 * K, 16 * K, false)),
            Some(libc::EOPNOTSUPP)
        );
        assert_eq!(f[0].read(8 * K, 8 * 1024), vec![0; 8 * 1024]);
        assert_eq!(f[1].read(0, 16 * 1024), vec![0xa1; 16 * 1024]);
        // Within the second only: refused, nothing changed.
        assert_eq!(
            errno(s.write_zeroes_fast(16 * K, 4 * K, true)),
            Some(libc::EOPNOTSUPP)
        );
        assert_eq!(f[1].read(0, 4 * 1024), vec![0xa1; 4 * 1024]);
    }
}
