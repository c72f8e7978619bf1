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
    backend: Box<dyn Storage>,
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
            backend,
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

/// All exports; the first is the default one (empty name).
#[derive(Debug, Default)]
pub struct Exports(Vec<Arc<Export>>);

impl Exports {
    pub fn open(specs: &[ExportSpec]) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let mut v: Vec<Arc<Export>> = Vec::new();
        // The image of each export so far: two exports of one image would
        // otherwise meet each other's lock, worded as another process.
        let mut images: Vec<((u64, u64), &str)> = Vec::new();
        for s in specs {
            if v.iter().any(|e| e.name == s.name) {
                anyhow::bail!("export '{}' given twice", s.name);
            }
            if let Ok(m) = std::fs::metadata(&s.path) {
                let id = (m.dev(), m.ino());
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
            v.push(Arc::new(Export::open(s)?));
        }
        Ok(Self(v))
    }

    /// Finds an export by name; the empty name selects the first export.
    pub fn find(&self, name: &[u8]) -> Option<Arc<Export>> {
        if name.is_empty() {
            return self.0.first().cloned();
        }
        self.0.iter().find(|e| e.name.as_bytes() == name).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.0.iter()
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
