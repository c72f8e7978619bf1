//! Reading `/proc/nbdinfo` (format: `Documentation/procfs.md`).

use std::collections::BTreeMap;

/// One line of `/proc/nbdinfo`: the device, an optional tag (`stats`,
/// `channel`), and its `key=value` fields in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub device: String,
    pub tag: Option<String>,
    pub fields: Vec<(String, String)>,
}

impl Line {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The parsed file: the header's fields and the device lines.
#[derive(Debug, Default)]
pub struct ProcInfo {
    pub header: BTreeMap<String, String>,
    pub version: String,
    pub lines: Vec<Line>,
}

impl ProcInfo {
    pub fn parse(text: &str) -> Self {
        let mut info = ProcInfo::default();
        for raw in text.lines() {
            let mut words = raw.split_whitespace();
            if let Some(rest) = raw.strip_prefix("# enbd ") {
                let mut w = rest.split_whitespace();
                info.version = w.next().unwrap_or_default().to_owned();
                for kv in w {
                    if let Some((k, v)) = kv.split_once('=') {
                        info.header.insert(k.to_owned(), v.to_owned());
                    }
                }
                continue;
            }
            let Some(device) = words.next() else { continue };
            if device.starts_with('#') {
                continue;
            }
            let mut tag = None;
            let mut fields = Vec::new();
            for w in words {
                match w.split_once('=') {
                    Some((k, v)) => fields.push((k.to_owned(), v.to_owned())),
                    None if fields.is_empty() && tag.is_none() => tag = Some(w.to_owned()),
                    None => {}
                }
            }
            info.lines.push(Line {
                device: device.to_owned(),
                tag,
                fields,
            });
        }
        info
    }

    /// Device names in file order.
    pub fn devices(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for l in &self.lines {
            if !out.contains(&l.device.as_str()) {
                out.push(&l.device);
            }
        }
        out
    }

    pub fn lines_of<'a>(&'a self, dev: &'a str) -> impl Iterator<Item = &'a Line> + 'a {
        self.lines.iter().filter(move |l| l.device == dev)
    }

    /// How many of a device's channels are `role=active` and how many
    /// `role=reserve` (a server without `CAN_MULTI_CONN`); `None` if no
    /// channel line carries a role (an older module).
    pub fn roles(&self, dev: &str) -> Option<(usize, usize)> {
        let roles: Vec<&str> = self
            .lines_of(dev)
            .filter(|l| l.tag.as_deref() == Some("channel"))
            .filter_map(|l| l.get("role"))
            .collect();
        if roles.is_empty() {
            return None;
        }
        let count = |r: &str| roles.iter().filter(|&&x| x == r).count();
        Some((count("active"), count("reserve")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_format() {
        let t = "# enbd 0.1.0 nr_devices=2 max_channels=8\n\
                 enbd0 state=connected size=1048576 flags=flush,fua server=10.0.0.1:10809 export=disk\n\
                 enbd0 stats requests=5 errors=0\n\
                 enbd0 channel 0 state=up requests=5\n\
                 enbd1 state=unconfigured size=0\n";
        let p = ProcInfo::parse(t);
        assert_eq!(p.version, "0.1.0");
        assert_eq!(p.header["nr_devices"], "2");
        assert_eq!(p.devices(), vec!["enbd0", "enbd1"]);
        let l: Vec<_> = p.lines_of("enbd0").collect();
        assert_eq!(l[0].get("state"), Some("connected"));
        assert_eq!(l[1].tag.as_deref(), Some("stats"));
        assert_eq!(l[2].tag.as_deref(), Some("channel"));
        assert_eq!(l[2].get("requests"), Some("5"));
        assert_eq!(p.roles("enbd0"), None);
    }

    #[test]
    fn parses_roles_and_new_fields_tolerantly() {
        let t = "# enbd 0.2.0 nr_devices=1\n\
                 enbd0 state=connected size=4096 blksize=512 flags=flush channels=3\n\
                 enbd0 stats requests=5 errors=1 gave_up=1 some_future_field=7\n\
                 enbd0 channel id=0 state=up role=active tls=none requests=5\n\
                 enbd0 channel id=1 state=up role=reserve tls=none requests=0\n\
                 enbd0 channel id=2 state=suspect role=reserve\n";
        let p = ProcInfo::parse(t);
        let l: Vec<_> = p.lines_of("enbd0").collect();
        assert_eq!(l[1].get("gave_up"), Some("1"));
        assert_eq!(l[2].get("role"), Some("active"));
        assert_eq!(l[4].get("requests"), None);
        assert_eq!(p.roles("enbd0"), Some((1, 2)));
        assert_eq!(p.roles("enbd9"), None);
    }
}
