//! Named exports and how they are given on the command line.

use std::path::PathBuf;
use std::sync::Arc;

use enbd_core::wire::tx;

use crate::backend::{Backend, Storage};
use crate::raid::{Mode, Raid, ALIGN, DEFAULT_STRIPE};
use crate::verified::{Verified, SCRUB_RATE};

/// Largest request payload served (and announced in `INFO_BLOCK_SIZE`).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// What an export serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// One regular file or block device.
    Image(PathBuf),
    /// Several, striped or concatenated (`raid0:` or `linear:`).
    Raid {
        mode: Mode,
        components: Vec<PathBuf>,
    },
}

impl Source {
    /// Every file or device the export uses.
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            Source::Image(p) => std::slice::from_ref(p),
            Source::Raid { components, .. } => components,
        }
    }
}

/// `--export` as parsed from the command line:
/// `NAME=PATH[,OPTION...]`, `NAME=raid0:COMPONENT,COMPONENT...[,OPTION...]`
/// or `NAME=linear:COMPONENT,COMPONENT...[,OPTION...]`. See
/// `Documentation/server.md` for the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub source: Source,
    pub read_only: bool,
    /// Serve the image even while another process holds a lock on it.
    pub shared: bool,
    pub description: String,
    /// Serve with the block checksums in this sidecar file (`crc`).
    pub crc: Option<PathBuf>,
    /// Seconds between scrubs of a `crc` export; 0: none.
    pub scrub: u64,
}

/// Seconds between two scrubs of an export with checksums, unless `scrub=`.
pub const DEFAULT_SCRUB: u64 = 24 * 3600;

const SYNTAX: &str = "expected NAME=PATH, NAME=raid0:PATH,PATH...[,stripe=SIZE] or \
                      NAME=linear:PATH,PATH..., then [,ro][,shared][,crc[=FILE]][,scrub=SECS]\
                      [,desc=TEXT]";

/// Splits at single commas; `,,` stands for a literal comma (as in qemu's
/// option syntax), so paths and descriptions can hold one.
fn split_items(s: &str) -> Vec<String> {
    if s.is_empty() {
        return Vec::new();
    }
    let mut items = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let cur = items.last_mut();
        match (c, cur) {
            (',', Some(cur)) if chars.peek() == Some(&',') => {
                chars.next();
                cur.push(',');
            }
            (',', _) => items.push(String::new()),
            (c, Some(cur)) => cur.push(c),
            (_, None) => {}
        }
    }
    items
}

/// A `stripe=` size: bytes, or with a binary suffix (`64K`, `1M`, `1MiB`).
pub(crate) fn parse_stripe(v: &str) -> Result<u64, String> {
    let n = parse_size::Config::new()
        .with_binary()
        .parse_size(v)
        .map_err(|e| format!("stripe={v}: {e}"))?;
    if n == 0 || !n.is_power_of_two() || n % ALIGN != 0 {
        return Err(format!(
            "stripe={v}: the stripe must be a power of two and a multiple of {ALIGN} bytes \
             (4K, 8K, ... 64K, ... 1M)"
        ));
    }
    Ok(n)
}

impl std::str::FromStr for ExportSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': {SYNTAX}"))?;
        if name.len() > 4096 {
            return Err("export name longer than 4096 bytes".into());
        }
        // A plain image at a path that starts with a mode's prefix is
        // written `./raid0:...`.
        let (mode, rest) = if let Some(r) = rest.strip_prefix("raid0:") {
            (
                Some(Mode::Raid0 {
                    stripe: DEFAULT_STRIPE,
                }),
                r,
            )
        } else if let Some(r) = rest.strip_prefix("linear:") {
            (Some(Mode::Linear), r)
        } else {
            (None, rest)
        };
        let mut items = split_items(rest).into_iter();
        let mut components: Vec<PathBuf> = Vec::new();
        if mode.is_none() {
            match items.next() {
                Some(p) if !p.is_empty() => components.push(p.into()),
                _ => return Err(format!("'{s}': empty path")),
            }
        }
        let mut spec = ExportSpec {
            name: name.to_owned(),
            source: Source::Image(PathBuf::new()),
            read_only: false,
            shared: false,
            description: String::new(),
            crc: None,
            scrub: DEFAULT_SCRUB,
        };
        let mut stripe = None;
        let mut crc: Option<Option<PathBuf>> = None;
        let mut scrub = None;
        for item in items {
            if let Some(d) = item.strip_prefix("desc=") {
                spec.description = d.to_owned();
                continue;
            }
            if let Some(v) = item.strip_prefix("stripe=") {
                stripe = Some(parse_stripe(v)?);
                continue;
            }
            if let Some(v) = item.strip_prefix("crc=") {
                if v.is_empty() {
                    return Err(format!("'{s}': crc= needs a file"));
                }
                crc = Some(Some(v.into()));
                continue;
            }
            if let Some(v) = item.strip_prefix("scrub=") {
                scrub = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("'{s}': scrub={v}: give whole seconds (0: none)"))?,
                );
                continue;
            }
            match item.as_str() {
                "ro" => spec.read_only = true,
                "rw" => spec.read_only = false,
                "shared" => spec.shared = true,
                "crc" => crc = Some(None),
                // In a RAID spec, an item that is no option is a component
                // if it has a slash; so a typo in an option is an error,
                // and a component called `ro` is `./ro`.
                _ if mode.is_some() && item.contains('/') => {
                    let p = PathBuf::from(&item);
                    if components.contains(&p) {
                        return Err(format!("'{s}': component '{item}' listed twice"));
                    }
                    components.push(p);
                }
                "" => {
                    return Err(format!(
                        "'{s}': empty item (a literal comma is written ',,')"
                    ))
                }
                _ if mode.is_some() => {
                    return Err(format!(
                        "'{s}': unknown export option '{item}' (use ro, rw, shared, stripe=SIZE \
                         or desc=TEXT; a component path must contain a '/': ./{item})"
                    ))
                }
                _ => {
                    return Err(format!(
                        "'{s}': unknown export option '{item}' (use ro, rw, shared, crc, \
                         crc=FILE, scrub=SECS or desc=TEXT)"
                    ))
                }
            }
        }
        spec.source = match mode {
            None => {
                if stripe.is_some() {
                    return Err(format!("'{s}': stripe= applies to raid0 exports only"));
                }
                Source::Image(components.pop().unwrap_or_default())
            }
            Some(mode) => {
                let mode = match mode {
                    Mode::Raid0 { .. } => Mode::Raid0 {
                        stripe: stripe.unwrap_or(DEFAULT_STRIPE),
                    },
                    Mode::Linear if stripe.is_some() => {
                        return Err(format!("'{s}': stripe= applies to raid0 exports only"))
                    }
                    Mode::Linear => Mode::Linear,
                };
                if components.len() < 2 {
                    return Err(format!(
                        "'{s}': a {} export needs at least two components, got {}",
                        mode.name(),
                        components.len()
                    ));
                }
                Source::Raid { mode, components }
            }
        };
        (spec.crc, spec.scrub) = checksum_options(&spec.source, spec.read_only, crc, scrub)
            .map_err(|e| format!("'{s}': {e}"))?;
        Ok(spec)
    }
}

/// The checksum file and scrub interval of an export, from its `crc` or
/// `crc=FILE` (`Some(None)` and `Some(Some(FILE))`) and `scrub=` options;
/// also for the config file.
pub(crate) fn checksum_options(
    source: &Source,
    read_only: bool,
    crc: Option<Option<PathBuf>>,
    scrub: Option<u64>,
) -> Result<(Option<PathBuf>, u64), String> {
    let Some(crc) = crc else {
        if scrub.is_some() {
            return Err("scrub= applies to exports with checksums (crc) only".into());
        }
        return Ok((None, DEFAULT_SCRUB));
    };
    let Source::Image(image) = source else {
        return Err("checksums (crc) apply to single-image exports only".into());
    };
    if !read_only {
        return Err(
            "checksums (crc) need a read-only export (add ro): a write would invalidate them"
                .into(),
        );
    }
    let file = crc.unwrap_or_else(|| crate::checksum::default_path(image));
    Ok((Some(file), scrub.unwrap_or(DEFAULT_SCRUB)))
}

/// An open export.
#[derive(Debug)]
pub struct Export {
    name: String,
    description: String,
    /// Shared with the export that replaces this one on a reload when only
    /// its name or description changed: the image stays open (and locked).
    backend: Arc<dyn Storage>,
}

impl Export {
    pub fn open(spec: &ExportSpec) -> anyhow::Result<Self> {
        let backend: anyhow::Result<Box<dyn Storage>> = match &spec.source {
            Source::Image(path) => Backend::open(path, spec.read_only, spec.shared)
                .map(|b| Box::new(b) as Box<dyn Storage>),
            Source::Raid { mode, components } => {
                Raid::open(&spec.name, *mode, components, spec.read_only, spec.shared)
                    .map(|r| Box::new(r) as Box<dyn Storage>)
            }
        };
        let backend = backend.and_then(|b| match &spec.crc {
            Some(crc) => {
                let scrub = (spec.scrub > 0).then(|| std::time::Duration::from_secs(spec.scrub));
                Verified::open(b, crc, scrub, SCRUB_RATE).map(|v| Box::new(v) as Box<dyn Storage>)
            }
            None => Ok(b),
        });
        let backend = backend.map_err(|e| anyhow::anyhow!("export '{}': {e:#}", spec.name))?;
        Ok(Self::with_storage(&spec.name, &spec.description, backend))
    }

    /// An export over any storage (tests wrap a [`Backend`]).
    pub fn with_storage(name: &str, description: &str, backend: Box<dyn Storage>) -> Self {
        Self {
            name: name.to_owned(),
            description: description.to_owned(),
            backend: backend.into(),
        }
    }

    /// The same storage under another name and description.
    fn sharing_storage(&self, name: &str, description: &str) -> Self {
        Self {
            name: name.to_owned(),
            description: description.to_owned(),
            backend: self.backend.clone(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// Logs that the export is open, with what it serves.
    pub fn log_ready(&self) {
        tracing::info!(
            export = self.name(),
            path = %self.backend().path().display(),
            size = self.size(),
            ro = self.backend().read_only(),
            "export ready"
        );
    }

    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    pub fn backend(&self) -> &dyn Storage {
        &*self.backend
    }

    /// Transmission flags announced for this export. One backing file has no
    /// per-connection cache, so several connections see the same data.
    /// (`SEND_DF` is added by the handshake when structured replies are on.)
    pub fn tx_flags(&self) -> u16 {
        let mut f = tx::HAS_FLAGS
            | tx::SEND_FLUSH
            | tx::SEND_FUA
            | tx::SEND_TRIM
            | tx::SEND_WRITE_ZEROES
            | tx::CAN_MULTI_CONN
            | tx::SEND_CACHE
            | tx::SEND_FAST_ZERO;
        if self.backend.read_only() {
            f |= tx::READ_ONLY;
        }
        f
    }
}

/// Name suffix of the export that serves an export's checksum sidecar.
pub const CRC_SUFFIX: &str = ".crc";

/// Read-only storage over bytes in memory: the sidecar behind a
/// `NAME.crc` export.
#[derive(Debug)]
pub struct Bytes {
    bytes: Vec<u8>,
    path: PathBuf,
}

impl Bytes {
    pub fn new(bytes: Vec<u8>, path: PathBuf) -> Self {
        Self { bytes, path }
    }
}

fn read_only_error() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EPERM)
}

impl Storage for Bytes {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let src = usize::try_from(off)
            .ok()
            .and_then(|o| self.bytes.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, _: &[u8], _: u64, _: bool) -> std::io::Result<()> {
        Err(read_only_error())
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn trim(&self, _: u64, _: u64) -> std::io::Result<()> {
        Err(read_only_error())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Err(read_only_error())
    }
}

/// The `NAME.crc` export of `export`, which has checksums: the sums its
/// reads are checked against (not the file read again, which may have
/// changed since), read-only, for caching proxies (see
/// `Documentation/server.md`).
fn crc_export(export: &Export, crc: &std::path::Path) -> anyhow::Result<Export> {
    let sums = export
        .backend()
        .sums()
        .ok_or_else(|| anyhow::anyhow!("it is not served with its checksums"))?;
    let name = format!("{}{CRC_SUFFIX}", export.name);
    let desc = format!("block checksums of '{}'", export.name);
    let storage = Bytes::new(sums.encode(), crc.to_owned());
    Ok(Export::with_storage(&name, &desc, Box::new(storage)))
}

/// All exports; the first is the default one (empty name).
#[derive(Debug, Default)]
pub struct Exports {
    exports: Vec<Arc<Export>>,
    /// Exports not opened from a spec: the `NAME.crc` export of each export
    /// with checksums, then the proxied exports (kept across reloads).
    extra: Vec<Arc<Export>>,
    /// How many of `extra` are proxied exports (at its end).
    proxied: usize,
    /// Proxied exports opened when a client asks (`--proxy-any`).
    on_demand: Option<Arc<crate::proxy::OnDemand>>,
    /// What each export was opened from, and the (device, inode) of each
    /// of its images then, so a reload can tell an unchanged export from a
    /// changed one.
    opened: Vec<(ExportSpec, Vec<ImageId>)>,
}

/// An image's (device, inode), where it could be looked at.
type ImageId = Option<(u64, u64)>;

/// The [`ImageId`] of each image (component) of an export, then of its
/// checksum file if it has one: `checksum` writes a new file (a new inode),
/// so a reload picks up new checksums.
fn image_ids(spec: &ExportSpec) -> Vec<ImageId> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &PathBuf| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    spec.source
        .paths()
        .iter()
        .chain(&spec.crc)
        .map(id)
        .collect()
}

/// Whether two specs ask for the same storage but for the images' paths,
/// which the caller compares by (device, inode): they differ in name,
/// description and the spelling of the paths at most.
fn same_storage(a: &ExportSpec, b: &ExportSpec) -> bool {
    let mut b = b.clone();
    b.name.clone_from(&a.name);
    b.description.clone_from(&a.description);
    match (&a.source, &mut b.source) {
        (Source::Image(pa), Source::Image(pb)) => pb.clone_from(pa),
        (Source::Raid { components: ca, .. }, Source::Raid { components: cb, .. })
            if ca.len() == cb.len() =>
        {
            cb.clone_from(ca)
        }
        _ => return false,
    }
    *a == b
}

impl Exports {
    pub fn open(specs: &[ExportSpec]) -> anyhow::Result<Self> {
        Self::open_reusing(specs, &Self::default())
    }

    /// Opens `specs`, keeping the open storage of `old`'s exports whose
    /// spec differs at most in name and description and whose image is
    /// still the same file (by device and inode, however its path is
    /// spelt): opening it again would meet our own lock, and live
    /// connections go on using it. All or nothing: on an error, no
    /// export of `old` is touched.
    pub fn open_reusing(specs: &[ExportSpec], old: &Exports) -> anyhow::Result<Self> {
        let mut v: Vec<Arc<Export>> = Vec::new();
        let mut opened = Vec::new();
        // The images (components) of each export so far: two exports of
        // one image would otherwise meet each other's lock, worded as
        // another process. One export's own components are checked by
        // `Raid::open`.
        let mut images: Vec<((u64, u64), &str)> = Vec::new();
        for s in specs {
            if v.iter().any(|e| e.name == s.name) {
                anyhow::bail!("export '{}' given twice", s.name);
            }
            let ids = image_ids(s);
            let mut mine = Vec::new();
            for (path, id) in s.source.paths().iter().zip(&ids) {
                let Some(id) = *id else {
                    continue;
                };
                if let Some((_, first)) = images.iter().find(|(i, _)| *i == id) {
                    if !s.shared {
                        anyhow::bail!(
                            "exports '{first}' and '{}' serve the same image {}: add ',shared' \
                             to the second to allow it",
                            s.name,
                            path.display()
                        );
                    }
                } else {
                    mine.push((id, s.name.as_str()));
                }
            }
            images.extend(mine);
            let kept = old.opened.iter().zip(&old.exports).find(|((o, oids), _)| {
                same_storage(s, o) && oids.iter().all(Option::is_some) && *oids == ids
            });
            let export = match kept {
                Some((_, e)) => e.sharing_storage(&s.name, &s.description),
                None => Export::open(s)?,
            };
            v.push(Arc::new(export));
            opened.push((s.clone(), ids));
        }
        let mut extra = Vec::new();
        for (s, export) in specs.iter().zip(&v) {
            if let Some(crc) = &s.crc {
                let e = crc_export(export, crc)
                    .map_err(|e| anyhow::anyhow!("export '{}': {e:#}", s.name))?;
                if specs.iter().any(|o| o.name == e.name()) {
                    anyhow::bail!(
                        "export '{}' has checksums, so its sidecar is served as '{}': \
                         that name is taken by another export",
                        s.name,
                        e.name()
                    );
                }
                extra.push(Arc::new(e));
            }
        }
        let proxied = old.extra[old.extra.len() - old.proxied..].to_vec();
        let mut x = Self {
            exports: v,
            extra,
            proxied: 0,
            on_demand: old.on_demand.clone(),
            opened,
        };
        x.add_proxied(proxied)?;
        Ok(x)
    }

    /// Adds exports that are not opened from specs (proxied ones); they
    /// stay across reloads.
    pub fn add_proxied(&mut self, v: Vec<Arc<Export>>) -> anyhow::Result<()> {
        for e in v {
            if self.find_named(e.name().as_bytes()).is_some() {
                anyhow::bail!("export '{}' given twice", e.name());
            }
            self.extra.push(e);
            self.proxied += 1;
        }
        Ok(())
    }

    /// Serves any other name the proxy's upstreams have, opened when a
    /// client first asks for it; kept across reloads.
    pub fn set_on_demand(&mut self, d: Arc<crate::proxy::OnDemand>) {
        self.on_demand = Some(d);
    }

    fn find_named(&self, name: &[u8]) -> Option<Arc<Export>> {
        self.exports
            .iter()
            .chain(&self.extra)
            .find(|e| e.name.as_bytes() == name)
            .cloned()
    }

    /// The specs the exports were opened from, in order.
    pub fn specs(&self) -> impl Iterator<Item = &ExportSpec> {
        self.opened.iter().map(|(s, _)| s)
    }

    /// Whether two exports serve one storage, opened once for both.
    #[cfg(test)]
    pub fn shares_storage(a: &Export, b: &Export) -> bool {
        Arc::ptr_eq(&a.backend, &b.backend)
    }

    /// Finds an export by name; the empty name selects the first export.
    pub fn find(&self, name: &[u8]) -> Option<Arc<Export>> {
        if name.is_empty() {
            return self
                .exports
                .first()
                .or(self.extra[self.extra.len() - self.proxied..].first())
                .cloned();
        }
        self.find_named(name)
            .or_else(|| self.on_demand.as_ref()?.find(name))
    }

    /// Every export, those opened on demand so far included.
    pub fn iter(&self) -> impl Iterator<Item = Arc<Export>> + '_ {
        let on_demand = self.on_demand.iter().flat_map(|d| d.opened());
        self.exports
            .iter()
            .chain(&self.extra)
            .cloned()
            .chain(on_demand)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        let s: ExportSpec = "disk=/tmp/x,ro,desc=a test".parse().unwrap();
        assert_eq!(s.name, "disk");
        assert_eq!(s.source, Source::Image("/tmp/x".into()));
        assert!(s.read_only && !s.shared);
        assert_eq!(s.description, "a test");
        assert!("d=/x,shared".parse::<ExportSpec>().unwrap().shared);
        assert!("nodelimiter".parse::<ExportSpec>().is_err());
        assert!("x=".parse::<ExportSpec>().is_err());
        let e = "x=/a,rx".parse::<ExportSpec>().unwrap_err();
        assert!(e.contains("unknown export option 'rx'"), "{e}");
    }

    fn parse(s: &str) -> ExportSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn crc_spec_parsing() {
        let s = parse("d=/srv/x.img,crc,ro");
        assert_eq!(s.crc, Some(PathBuf::from("/srv/x.img.crc")));
        assert_eq!(s.scrub, DEFAULT_SCRUB);
        let s = parse("d=/srv/x.img,ro,crc=/var/sums,scrub=0");
        assert_eq!((s.crc, s.scrub), (Some(PathBuf::from("/var/sums")), 0));
        let s = parse("d=/srv/x.img,ro,crc,scrub=3600");
        assert_eq!(s.scrub, 3600);
        assert_eq!(parse("d=/srv/x.img,ro").crc, None);
        for (bad, why) in [
            ("d=/x,crc", "need a read-only export"),
            ("d=/x,crc,ro,rw", "need a read-only export"),
            (
                "d=/x,ro,scrub=5",
                "scrub= applies to exports with checksums",
            ),
            ("d=/x,ro,crc,scrub=1h", "whole seconds"),
            ("d=/x,ro,crc=", "crc= needs a file"),
            ("d=raid0:/a,/b,ro,crc", "single-image exports only"),
        ] {
            let e = parse_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn parse_err(s: &str) -> String {
        s.parse::<ExportSpec>().unwrap_err()
    }

    fn raid(mode: Mode, components: &[&str]) -> Source {
        Source::Raid {
            mode,
            components: components.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn raid_spec_parsing() {
        let s = parse("r=raid0:/a,/b,./c,stripe=1M,ro,desc=three striped");
        let stripe = 1 << 20;
        assert_eq!(s.source, raid(Mode::Raid0 { stripe }, &["/a", "/b", "./c"]));
        assert!(s.read_only);
        assert_eq!(s.description, "three striped");
        let s = parse("r=raid0:/a,/b");
        let stripe = DEFAULT_STRIPE;
        assert_eq!(s.source, raid(Mode::Raid0 { stripe }, &["/a", "/b"]));
        for (text, stripe) in [
            ("64K", 64 << 10),
            ("8k", 8 << 10),
            ("4096", 4096),
            ("2MiB", 2 << 20),
        ] {
            let s = parse(&format!("r=raid0:/a,/b,stripe={text}"));
            assert_eq!(
                s.source,
                raid(Mode::Raid0 { stripe }, &["/a", "/b"]),
                "{text}"
            );
        }
        // Options and components in any order; `./ro` is a component.
        let s = parse("l=linear:shared,/dev/sdb,./ro,/x");
        assert_eq!(s.source, raid(Mode::Linear, &["/dev/sdb", "./ro", "/x"]));
        assert!(s.shared && !s.read_only);
        // A plain image whose path starts like a mode.
        assert_eq!(
            parse("p=./raid0:/x").source,
            Source::Image("./raid0:/x".into())
        );
    }

    #[test]
    fn literal_commas_are_doubled() {
        let s = parse("d=/img,,v2,desc=a,, b,,,ro");
        assert_eq!(s.source, Source::Image("/img,v2".into()));
        assert_eq!(s.description, "a, b,");
        assert!(s.read_only);
        let s = parse("l=linear:/a,,1,/b");
        assert_eq!(s.source, raid(Mode::Linear, &["/a,1", "/b"]));
        assert!(parse_err("d=/img,").contains("empty item"));
        let e = parse_err("d=/img,desc=a, b");
        assert!(
            e.contains("unknown export option ' b'"),
            "a single comma splits: {e}"
        );
    }

    #[test]
    fn raid_spec_errors() {
        for (spec, want) in [
            ("r=raid0:/a", "at least two components, got 1"),
            ("r=linear:", "at least two components, got 0"),
            ("r=raid0:/a,/b,/a", "component '/a' listed twice"),
            ("r=raid0:/a,/b,stripe=0", "power of two"),
            ("r=raid0:/a,/b,stripe=48K", "power of two"),
            ("r=raid0:/a,/b,stripe=2048", "multiple of 4096"),
            ("r=raid0:/a,/b,stripe=lots", "stripe=lots"),
            ("r=raid0:/a,/b,stripe=99999999999999999999", "stripe="),
            ("r=linear:/a,/b,stripe=64K", "raid0 exports only"),
            ("r=/a,stripe=64K", "raid0 exports only"),
            ("r=raid0:/a,/b,rx", "unknown export option 'rx'"),
            ("r=raid0:a.img,/b", "must contain a '/': ./a.img"),
            ("r=/a,/b", "unknown export option '/b'"),
        ] {
            let e = parse_err(spec);
            assert!(e.contains(want), "{spec}: {e}");
        }
    }

    #[test]
    fn a_raid_component_shared_with_another_export_needs_shared() {
        let f = crate::testutil::TempFile::new(64 << 10, 0);
        let g = crate::testutil::TempFile::new(64 << 10, 0);
        let (f, g) = (f.path().display(), g.path().display());
        let specs = [
            parse(&format!("a={g}")),
            parse(&format!("b=linear:{f},{g}")),
        ];
        let e = format!("{:#}", Exports::open(&specs).unwrap_err());
        assert!(e.contains("'a' and 'b' serve the same image"), "{e}");
        let specs = [parse(&format!("a=raid0:{f},{g},stripe=16K,desc=x"))];
        let exports = Exports::open(&specs).unwrap();
        let e = exports.find(b"a").unwrap();
        assert_eq!(e.size(), 128 << 10);
        assert_eq!(e.description(), "x");
        assert!(e.backend().path().to_string_lossy().starts_with("raid0:"));
    }

    #[test]
    fn a_reload_reopens_an_export_whose_checksums_were_rewritten() {
        use crate::checksum::{Sums, BLOCK_SIZE};
        let f = crate::testutil::TempFile::new(8192, 7);
        let crc = crate::checksum::default_path(f.path());
        let write_sums = || {
            let b = Backend::open(f.path(), true, true).unwrap();
            Sums::compute(&b, BLOCK_SIZE, |_, _| {})
                .unwrap()
                .store(&crc)
                .unwrap();
        };
        write_sums();
        let specs = [format!("d={},ro,crc", f.path().display()).parse().unwrap()];
        let one = Exports::open(&specs).unwrap();
        let two = Exports::open_reusing(&specs, &one).unwrap();
        let first = |x: &Exports| x.find(b"").unwrap();
        assert!(Exports::shares_storage(&first(&one), &first(&two)));
        write_sums();
        let three = Exports::open_reusing(&specs, &two).unwrap();
        assert!(!Exports::shares_storage(&first(&two), &first(&three)));
        let _ = std::fs::remove_file(&crc);
    }

    #[test]
    fn an_export_with_checksums_serves_its_sidecar_as_name_crc() {
        use crate::checksum::{Sums, BLOCK_SIZE};
        let f = crate::testutil::TempFile::new(8192, 7);
        let crc = crate::checksum::default_path(f.path());
        let b = Backend::open(f.path(), true, true).unwrap();
        Sums::compute(&b, BLOCK_SIZE, |_, _| {})
            .unwrap()
            .store(&crc)
            .unwrap();
        let specs = [parse(&format!("d={},ro,crc", f.path().display()))];
        let x = Exports::open(&specs).unwrap();
        let e = x.find(b"d.crc").unwrap();
        let want = std::fs::read(&crc).unwrap();
        assert_eq!(e.size(), want.len() as u64);
        assert!(e.backend().read_only());
        let mut got = vec![0u8; want.len()];
        e.backend().read_at(&mut got, 0).unwrap();
        assert_eq!(got, want);
        assert!(e.backend().read_at(&mut got, 1).is_err(), "past the end");
        assert!(e.backend().write_at(&got, 0, false).is_err());
        assert!(x.iter().any(|e| e.name() == "d.crc"), "listed");
        assert_eq!(x.find(b"").unwrap().name(), "d");
        // Reloads keep serving it, the sums the export checks with even
        // if the file changed in place (same inode: the export is kept).
        let mut garbage = want.clone();
        garbage[0] ^= 0xff;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&crc)
            .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &garbage, 0))
            .unwrap();
        let y = Exports::open_reusing(&specs, &x).unwrap();
        let e = y.find(b"d.crc").unwrap();
        e.backend().read_at(&mut got, 0).unwrap();
        assert_eq!(got, want);
        std::fs::write(&crc, &want).unwrap();
        let plain = [parse(&format!("d={},ro", f.path().display()))];
        assert!(Exports::open(&plain).unwrap().find(b"d.crc").is_none());
        // The name is taken by the sidecar.
        let g = crate::testutil::TempFile::new(4096, 0);
        let clash = [
            specs[0].clone(),
            parse(&format!("d.crc={},ro", g.path().display())),
        ];
        let e = format!("{:#}", Exports::open(&clash).unwrap_err());
        assert!(e.contains("its sidecar is served as 'd.crc'"), "{e}");
        let _ = std::fs::remove_file(&crc);
    }

    #[test]
    fn one_image_twice_needs_shared() {
        let f = crate::testutil::TempFile::new(4096, 0);
        let spec = |s: &str| {
            format!("{s}{}", f.path().display())
                .parse::<ExportSpec>()
                .unwrap()
        };
        let specs = [spec("a="), spec("b=")];
        let e = format!("{:#}", Exports::open(&specs).unwrap_err());
        assert!(
            e.contains("'a' and 'b' serve the same image") && e.contains(",shared"),
            "{e}"
        );
        let b: ExportSpec = format!("b={},ro,shared", f.path().display())
            .parse()
            .unwrap();
        assert_eq!(Exports::open(&[spec("a="), b]).unwrap().iter().count(), 2);
    }
}
