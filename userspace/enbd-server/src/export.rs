//! Named exports and how they are given on the command line.

use std::path::PathBuf;
use std::sync::Arc;

use enbd_core::wire::tx;

use crate::backend::{Backend, Storage};

/// Largest request payload served (and announced in `INFO_BLOCK_SIZE`).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// `--export NAME=PATH[,ro][,shared][,desc=TEXT]` as parsed from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub path: PathBuf,
    pub read_only: bool,
    /// Serve the image even while another process holds a lock on it.
    pub shared: bool,
    pub description: String,
}

impl std::str::FromStr for ExportSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected NAME=PATH[,ro][,shared][,desc=TEXT]"))?;
        let mut parts = rest.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(format!("'{s}': empty path"));
        }
        let mut spec = ExportSpec {
            name: name.to_owned(),
            path: path.into(),
            read_only: false,
            shared: false,
            description: String::new(),
        };
        for p in parts {
            match p {
                "ro" => spec.read_only = true,
                "rw" => spec.read_only = false,
                "shared" => spec.shared = true,
                _ => match p.strip_prefix("desc=") {
                    Some(d) => spec.description = d.to_owned(),
                    None => {
                        return Err(format!(
                            "'{s}': unknown export option '{p}' (use ro, rw, shared or desc=TEXT)"
                        ))
                    }
                },
            }
        }
        if spec.name.len() > 4096 {
            return Err("export name longer than 4096 bytes".into());
        }
        Ok(spec)
    }
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
        let backend = Backend::open(&spec.path, spec.read_only, spec.shared)
            .map_err(|e| anyhow::anyhow!("export '{}': {e:#}", spec.name))?;
        Ok(Self::with_storage(
            &spec.name,
            &spec.description,
            Box::new(backend),
        ))
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

    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    pub fn backend(&self) -> &dyn Storage {
        &*self.backend
    }

    /// Transmission flags announced for this export. One backing file has no
    /// per-connection cache, so several connections see the same data.
    pub fn tx_flags(&self) -> u16 {
        let mut f = tx::HAS_FLAGS
            | tx::SEND_FLUSH
            | tx::SEND_FUA
            | tx::SEND_TRIM
            | tx::SEND_WRITE_ZEROES
            | tx::CAN_MULTI_CONN;
        if self.backend.read_only() {
            f |= tx::READ_ONLY;
        }
        f
    }
}

/// All exports; the first is the default one (empty name).
#[derive(Debug, Default)]
pub struct Exports {
    exports: Vec<Arc<Export>>,
    /// What each export was opened from, and the image's (device, inode)
    /// then, so a reload can tell an unchanged export from a changed one.
    opened: Vec<(ExportSpec, Option<(u64, u64)>)>,
}

/// An image's (device, inode), if it can be looked at.
fn image_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether two specs ask for the same storage but for the image's path,
/// which the caller compares by (device, inode): they differ in name,
/// description and the spelling of the path at most.
fn same_storage(a: &ExportSpec, b: &ExportSpec) -> bool {
    let mut b = b.clone();
    b.name.clone_from(&a.name);
    b.description.clone_from(&a.description);
    b.path.clone_from(&a.path);
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
        // The image of each export so far: two exports of one image would
        // otherwise meet each other's lock, worded as another process.
        let mut images: Vec<((u64, u64), &str)> = Vec::new();
        for s in specs {
            if v.iter().any(|e| e.name == s.name) {
                anyhow::bail!("export '{}' given twice", s.name);
            }
            let id = image_id(&s.path);
            if let Some(id) = id {
                if let Some((_, first)) = images.iter().find(|(i, _)| *i == id) {
                    if !s.shared {
                        anyhow::bail!(
                            "exports '{first}' and '{}' serve the same image {}: add ',shared' \
                             to the second to allow it",
                            s.name,
                            s.path.display()
                        );
                    }
                } else {
                    images.push((id, &s.name));
                }
            }
            let kept = old
                .opened
                .iter()
                .zip(&old.exports)
                .find(|((o, oid), _)| same_storage(s, o) && oid.is_some() && *oid == id);
            let export = match kept {
                Some((_, e)) => e.sharing_storage(&s.name, &s.description),
                None => Export::open(s)?,
            };
            v.push(Arc::new(export));
            opened.push((s.clone(), id));
        }
        Ok(Self { exports: v, opened })
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
            return self.exports.first().cloned();
        }
        self.exports
            .iter()
            .find(|e| e.name.as_bytes() == name)
            .cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        let s: ExportSpec = "disk=/tmp/x,ro,desc=a test".parse().unwrap();
        assert_eq!(s.name, "disk");
        assert_eq!(s.path, PathBuf::from("/tmp/x"));
        assert!(s.read_only && !s.shared);
        assert_eq!(s.description, "a test");
        assert!("d=/x,shared".parse::<ExportSpec>().unwrap().shared);
        assert!("nodelimiter".parse::<ExportSpec>().is_err());
        assert!("x=".parse::<ExportSpec>().is_err());
        let e = "x=/a,rx".parse::<ExportSpec>().unwrap_err();
        assert!(e.contains("unknown export option 'rx'"), "{e}");
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
