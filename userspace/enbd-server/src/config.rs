//! The TOML configuration file (`--config`): its format, how it combines
//! with the command line, and reloading its exports on SIGHUP.
//!
//! The file takes the server options under their long option names, and
//! one `[[export]]` table per export. An option given on the command line
//! wins over the file; the command line's exports come first, then the
//! file's. A reload re-reads the exports only: a change to any other option
//! is logged as needing a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, ValueEnum};
use serde::Deserialize;
use signal_hook::iterator::Signals;
use tracing::{error, info, warn};

use crate::export::{checksum_options, parse_stripe, ExportSpec, Exports, Source};
use crate::handshake::TlsMode;
use crate::raid::{Mode, DEFAULT_STRIPE};
use crate::{Cli, Shared};

/// The file as written: the server options, all optional and named as on
/// the command line, and the exports. Once read, the exports are taken out
/// and the options are compared whole on a reload, to tell that one
/// changed. (One struct rather than a flattened one: serde's `flatten`
/// would lose the line numbers of errors.)
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    #[serde(default)]
    export: Vec<ExportEntry>,
    listen: Option<Vec<String>>,
    unix: Option<PathBuf>,
    no_tcp: Option<bool>,
    workers: Option<u16>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<u32>,
    handshake_timeout: Option<u64>,
    idle_timeout: Option<u64>,
    max_handshakes: Option<u32>,
    /// Sizes as on the command line: "1G", "64M".
    memory_budget: Option<String>,
    max_inflight_per_connection: Option<String>,
    send_timeout: Option<u64>,
    tls: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    /// The caching proxy's upstreams, exports and cache (`--proxy`,
    /// `--proxy-export`, `--proxy-any`, `--proxy-unchecked`, `--cache-dir`, `--proxy-timeout`,
    /// `--replicate`).
    #[serde(rename = "proxy")]
    proxy_upstreams: Option<Vec<String>>,
    #[serde(rename = "proxy-export")]
    proxy_exports: Option<Vec<String>>,
    proxy_any: Option<bool>,
    proxy_unchecked: Option<bool>,
    cache_dir: Option<PathBuf>,
    proxy_timeout: Option<u64>,
    /// A rate as on the command line: "32M".
    replicate: Option<String>,
}

/// One `[[export]]` table: the fields of `--export`, with the image in
/// `path`, or the components of a striped or concatenated export in
/// `raid0` (and `stripe`) or `linear`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportEntry {
    name: String,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    raid0: Option<Vec<PathBuf>>,
    #[serde(default)]
    stripe: Option<String>,
    #[serde(default)]
    linear: Option<Vec<PathBuf>>,
    #[serde(default)]
    ro: bool,
    #[serde(default)]
    shared: bool,
    #[serde(default)]
    description: String,
    /// Checksums: `true` for the image's `IMAGE.crc`, or the sidecar's path.
    #[serde(default)]
    crc: Option<CrcSetting>,
    /// Seconds between scrubs of an export with checksums; 0: none.
    #[serde(default)]
    scrub: Option<u64>,
}

/// `crc = true` or `crc = "FILE"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum CrcSetting {
    On(bool),
    File(PathBuf),
}

impl ExportEntry {
    /// The export as if given with `--export`; a relative path is taken
    /// from the file's directory.
    fn into_spec(self, dir: &Path) -> Result<ExportSpec, String> {
        let name = &self.name;
        let join = |p: &PathBuf| {
            if p.as_os_str().is_empty() {
                Err(format!("export '{name}': empty path"))
            } else {
                Ok(dir.join(p))
            }
        };
        let components = |v: &[PathBuf]| -> Result<Vec<PathBuf>, String> {
            if v.len() < 2 {
                return Err(format!("export '{name}': give at least two components"));
            }
            v.iter().map(join).collect()
        };
        let source = match (&self.path, &self.raid0, &self.linear) {
            (Some(p), None, None) if self.stripe.is_none() => Source::Image(join(p)?),
            (None, Some(c), None) => Source::Raid {
                mode: Mode::Raid0 {
                    stripe: match &self.stripe {
                        Some(s) => parse_stripe(s).map_err(|e| format!("export '{name}': {e}"))?,
                        None => DEFAULT_STRIPE,
                    },
                },
                components: components(c)?,
            },
            (None, None, Some(c)) if self.stripe.is_none() => Source::Raid {
                mode: Mode::Linear,
                components: components(c)?,
            },
            _ => {
                return Err(format!(
                    "export '{name}': give one of path, raid0 (with an optional stripe) or linear"
                ))
            }
        };
        if self.name.len() > 4096 {
            return Err("export name longer than 4096 bytes".into());
        }
        let crc = match &self.crc {
            None | Some(CrcSetting::On(false)) => None,
            Some(CrcSetting::On(true)) => Some(None),
            Some(CrcSetting::File(f)) => Some(Some(join(f)?)),
        };
        let (crc, scrub) = checksum_options(&source, self.ro, crc, self.scrub)
            .map_err(|e| format!("export '{name}': {e}"))?;
        Ok(ExportSpec {
            source,
            name: self.name,
            read_only: self.ro,
            shared: self.shared,
            description: self.description,
            crc,
            scrub,
        })
    }
}

/// A configuration file as read and checked; no image is opened yet.
#[derive(Debug)]
pub struct Config {
    pub options: Options,
    pub exports: Vec<ExportSpec>,
}

impl Config {
    /// Reads and checks `path`. Errors name the file and, for syntax and
    /// type errors, the line.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        Self::parse(&text, path).with_context(|| format!("config file {}", path.display()))
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut options: Options = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let dir = path.parent().unwrap_or(Path::new(""));
        let mut exports: Vec<ExportSpec> = Vec::new();
        for e in std::mem::take(&mut options.export) {
            let spec = e.into_spec(dir).map_err(anyhow::Error::msg)?;
            if exports.iter().any(|s| s.name == spec.name) {
                bail!("export '{}' given twice", spec.name);
            }
            exports.push(spec);
        }
        for p in [
            &mut options.unix,
            &mut options.tls_cert,
            &mut options.tls_key,
            &mut options.tls_client_ca,
            &mut options.cache_dir,
        ]
        .into_iter()
        .flatten()
        {
            *p = dir.join(&*p);
        }
        options.check()?;
        Ok(Self { options, exports })
    }
}

impl Options {
    /// The rules clap applies to the same options on the command line.
    fn check(&self) -> Result<()> {
        if let Some(w) = self.workers {
            if !(1..=256).contains(&w) {
                bail!("workers = {w}: must be 1 to 256");
            }
        }
        if self.max_connections_per_client == Some(0) {
            bail!("max-connections-per-client must be at least 1");
        }
        if self.max_handshakes == Some(0) {
            bail!("max-handshakes must be at least 1");
        }
        for (key, v) in [
            ("memory-budget", &self.memory_budget),
            (
                "max-inflight-per-connection",
                &self.max_inflight_per_connection,
            ),
        ] {
            if let Some(v) = v {
                crate::budget::parse_size(v)
                    .map_err(|e| anyhow::anyhow!("{key} = \"{v}\": {e}"))?;
            }
        }
        if let Some(t) = &self.tls {
            TlsMode::from_str(t, false)
                .map_err(|_| anyhow::anyhow!("tls = \"{t}\": use off, allow or require"))?;
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("tls-cert and tls-key go together");
        }
        if self.proxy_timeout == Some(0) {
            bail!("proxy-timeout must be at least 1");
        }
        if let Some(v) = &self.replicate {
            crate::budget::parse_size(v)
                .map_err(|e| anyhow::anyhow!("replicate = \"{v}\": {e}"))?;
        }
        for n in self.proxy_exports.iter().flatten() {
            crate::proxy::check_name(n).map_err(|e| anyhow::anyhow!("proxy-export {e}"))?;
        }
        Ok(())
    }

    /// Sets each option of the file that the command line left out.
    fn apply(&self, cli: &mut Cli, given: impl Fn(&str) -> bool) {
        macro_rules! take {
            ($field:ident) => {
                take!($field, |v| v)
            };
            ($field:ident, $wrap:expr) => {
                if let Some(v) = &self.$field {
                    if !given(stringify!($field)) {
                        cli.$field = $wrap(v.clone());
                    }
                }
            };
        }
        take!(listen);
        take!(unix, Some);
        take!(no_tcp);
        take!(workers);
        take!(max_connections);
        take!(max_connections_per_client);
        take!(handshake_timeout);
        take!(idle_timeout);
        take!(max_handshakes);
        take!(send_timeout);
        // Sizes are checked in `check`; the budgets' own rules (at least
        // 32M, one within the other) are checked on the combined options.
        let size = |v: String| crate::budget::parse_size(&v).unwrap_or_default();
        take!(memory_budget, size);
        take!(max_inflight_per_connection, size);
        // Checked in `check`.
        take!(tls, |t: String| TlsMode::from_str(&t, false).ok());
        // The key and certificate come as a pair, from one place.
        if !given("tls_cert") && !given("tls_key") {
            take!(tls_cert, Some);
            take!(tls_key, Some);
        }
        take!(tls_client_ca, Some);
        take!(proxy_upstreams);
        take!(proxy_exports);
        take!(proxy_any);
        take!(proxy_unchecked);
        take!(cache_dir, Some);
        take!(proxy_timeout);
        take!(replicate, |v: String| crate::budget::parse_size(&v).ok());
    }
}

/// What a reload needs: the file, and what it was combined with at start.
#[derive(Debug)]
pub struct Reloader {
    file: PathBuf,
    /// The command line's exports, which come before the file's.
    cli_exports: Vec<ExportSpec>,
    /// The file's options in force since the start.
    options: Options,
    /// Whether proxied exports are served (then no other export is needed).
    proxied: bool,
}

/// The command line's exports, then the file's; a name in both is an
/// error, as is having none.
fn combine(
    cli: &[ExportSpec],
    file: &[ExportSpec],
    path: &Path,
    proxied: bool,
) -> Result<Vec<ExportSpec>> {
    if let Some(s) = file.iter().find(|s| cli.iter().any(|c| c.name == s.name)) {
        bail!(
            "export '{}' is given both on the command line and in {}",
            s.name,
            path.display()
        );
    }
    if cli.is_empty() && file.is_empty() && !proxied {
        bail!(
            "no exports: {} has no [[export]] or proxy-export and no --export is given",
            path.display()
        );
    }
    Ok(cli.iter().chain(file).cloned().collect())
}

/// With `--config`, reads the file into `cli` (see the module's doc) and
/// returns what reloading it takes.
pub fn load_into(cli: &mut Cli, matches: &ArgMatches) -> Result<Option<Reloader>> {
    let Some(file) = cli.config.clone() else {
        return Ok(None);
    };
    let config = Config::load(&file)?;
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    config.options.apply(cli, given);
    let cli_exports = std::mem::take(&mut cli.exports);
    let proxied = !cli.proxy_exports.is_empty() || cli.proxy_any;
    cli.exports = combine(&cli_exports, &config.exports, &file, proxied)?;
    info!(
        file = %file.display(),
        exports = config.exports.len(),
        "configuration read"
    );
    Ok(Some(Reloader {
        file,
        cli_exports,
        options: config.options,
        proxied,
    }))
}

impl Reloader {
    /// Re-reads the file and opens its exports, keeping the open storage of
    /// unchanged ones; `current` stays as it is whatever happens.
    pub fn reload(&self, current: &Exports) -> Result<Exports> {
        let config = Config::load(&self.file)?;
        let specs = combine(&self.cli_exports, &config.exports, &self.file, self.proxied)?;
        let exports = Exports::open_reusing(&specs, current)?;
        if config.options != self.options {
            warn!(
                file = %self.file.display(),
                "options other than the exports changed; they take effect at the next start"
            );
        }
        Ok(exports)
    }

    fn file(&self) -> &Path {
        &self.file
    }
}

/// What a reload changed, by export name, for the log.
fn changes(old: &Exports, new: &Exports) -> (Vec<String>, Vec<String>, Vec<String>) {
    let find = |x: &Exports, name: &str| x.specs().find(|s| s.name == name).cloned();
    let mut added = Vec::new();
    let mut changed = Vec::new();
    for s in new.specs() {
        match find(old, &s.name) {
            None => added.push(s.name.clone()),
            Some(o) if o != *s => changed.push(s.name.clone()),
            Some(_) => {}
        }
    }
    let removed = old
        .specs()
        .filter(|s| find(new, &s.name).is_none())
        .map(|s| s.name.clone())
        .collect();
    (added, removed, changed)
}

/// Reloads once: on success the new exports serve new connections, and
/// connections already serving keep the export they hold.
pub fn reload_now(reloader: &Reloader, shared: &Shared) {
    let current = shared.exports();
    match reloader.reload(&current) {
        Ok(new) => {
            let (added, removed, changed) = changes(&current, &new);
            for e in new.iter() {
                if added.iter().chain(&changed).any(|n| n == e.name()) {
                    e.log_ready();
                }
            }
            shared.set_exports(Arc::new(new));
            info!(
                file = %reloader.file().display(),
                ?added,
                ?removed,
                ?changed,
                "configuration reloaded"
            );
        }
        Err(e) => error!(
            file = %reloader.file().display(),
            "reload failed, the configuration in force is kept: {e:#}"
        ),
    }
}

/// Catches SIGHUP from now on, so that one sent while the server starts
/// neither ends it (the default action) nor is lost: it is handled once
/// [`reload_on_sighup`] runs.
pub fn catch_sighup() -> Result<Signals> {
    Signals::new([signal_hook::consts::SIGHUP]).context("cannot catch SIGHUP")
}

/// Reloads the file on each SIGHUP, on a thread of its own. Without a file
/// SIGHUP is logged and ignored rather than ending the server.
pub fn reload_on_sighup(
    mut signals: Signals,
    reloader: Option<Reloader>,
    shared: Arc<Shared>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("enbd-reload".into())
        .spawn(move || {
            for _ in signals.forever() {
                match &reloader {
                    Some(r) => reload_now(r, &shared),
                    None => warn!("SIGHUP: nothing to reload without --config"),
                }
            }
        })
        .context("cannot start the reload thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;

    /// A directory of its own for a test's config file and images.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let d = std::env::temp_dir().join(format!("enbd-config-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }

        fn image(&self, name: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, vec![0u8; 4096]).unwrap();
            p
        }

        /// Writes the config file and returns its path.
        fn config(&self, text: &str) -> PathBuf {
            let p = self.0.join("enbd.toml");
            std::fs::write(&p, text).unwrap();
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new("/etc/enbd/server.toml"))
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    /// The command line `args` combined with its `--config`.
    fn combined(args: &[&str]) -> Result<(Cli, Option<Reloader>)> {
        let argv = std::iter::once("enbd-server").chain(args.iter().copied());
        let m = Cli::command().try_get_matches_from(argv)?;
        let mut cli = Cli::from_arg_matches(&m)?;
        let r = load_into(&mut cli, &m)?;
        Ok((cli, r))
    }

    fn combined_err(args: &[&str]) -> String {
        match combined(args) {
            Ok(_) => panic!("{args:?} accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    const GOOD: &str = r#"
listen = ["[::]:10809", "127.0.0.1:10810"]
workers = 8
idle-timeout = 600
tls = "allow"
tls-cert = "cert.pem"
tls-key = "/etc/enbd/key.pem"

[[export]]
name = "disk"
path = "/srv/disk.img"
description = "the main disk"

[[export]]
name = "iso"
path = "images/x.iso"
ro = true
shared = true
"#;

    #[test]
    fn a_good_file_is_read_with_paths_from_its_directory() {
        let c = parse(GOOD).unwrap();
        let o = &c.options;
        assert_eq!(
            o.listen.as_deref(),
            Some(&["[::]:10809".to_owned(), "127.0.0.1:10810".to_owned()][..])
        );
        assert_eq!((o.workers, o.idle_timeout), (Some(8), Some(600)));
        assert_eq!(o.handshake_timeout, None);
        assert_eq!(o.tls_cert.as_deref(), Some(Path::new("/etc/enbd/cert.pem")));
        assert_eq!(o.tls_key.as_deref(), Some(Path::new("/etc/enbd/key.pem")));
        let disk = "disk=/srv/disk.img,desc=the main disk".parse().unwrap();
        let iso = "iso=/etc/enbd/images/x.iso,ro,shared".parse().unwrap();
        assert_eq!(c.exports, [disk, iso]);
        // Nothing at all is a file with no options and no exports.
        let empty = parse("").unwrap();
        assert_eq!(
            (empty.options, empty.exports.len()),
            (Options::default(), 0)
        );
    }

    #[test]
    fn checksums_are_read_like_their_export_option() {
        let c = parse(
            r#"
            [[export]]
            name = "a"
            path = "a.img"
            ro = true
            crc = true
            [[export]]
            name = "b"
            path = "b.img"
            ro = true
            crc = "sums/b.crc"
            scrub = 0
            [[export]]
            name = "c"
            path = "c.img"
            crc = false
            "#,
        )
        .unwrap();
        let a = "a=/etc/enbd/a.img,ro,crc".parse().unwrap();
        let b = "b=/etc/enbd/b.img,ro,crc=/etc/enbd/sums/b.crc,scrub=0"
            .parse()
            .unwrap();
        let c2 = "c=/etc/enbd/c.img".parse().unwrap();
        assert_eq!(c.exports, [a, b, c2]);
        let e = err("[[export]]\nname = \"a\"\npath = \"a.img\"\ncrc = true");
        assert!(
            e.contains("export 'a': checksums (crc) need a read-only export"),
            "{e}"
        );
        let e = err("[[export]]\nname = \"a\"\npath = \"a.img\"\nro = true\nscrub = 9");
        assert!(e.contains("scrub= applies"), "{e}");
        assert!(err("[[export]]\nname = \"a\"\npath = \"a.img\"\ncrc = 3").contains("crc"));
    }

    #[test]
    fn striped_and_linear_exports_are_read_like_their_export_option() {
        let c = parse(
            r#"
            [[export]]
            name = "s"
            raid0 = ["a.img", "/dev/sdb"]
            stripe = "1M"
            [[export]]
            name = "l"
            linear = ["a.img", "b.img"]
            ro = true
            "#,
        )
        .unwrap();
        let s = "s=raid0:/etc/enbd/a.img,/dev/sdb,stripe=1M"
            .parse()
            .unwrap();
        let l = "l=linear:/etc/enbd/a.img,/etc/enbd/b.img,ro"
            .parse()
            .unwrap();
        assert_eq!(c.exports, [s, l]);
        for (bad, why) in [
            ("path = \"x\"\nlinear = [\"a\", \"b\"]", "give one of"),
            ("raid0 = [\"a\"]", "at least two"),
            ("linear = [\"a\", \"b\"]\nstripe = \"64K\"", "give one of"),
            ("raid0 = [\"a\", \"b\"]\nstripe = \"3K\"", "power of two"),
            ("", "give one of"),
        ] {
            let e = parse(&format!("[[export]]\nname = \"x\"\n{bad}")).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{bad}: {e:#}");
        }
    }

    #[test]
    fn the_packaged_example_is_a_valid_file() {
        let text = include_str!("../../../packaging/server.toml");
        let c = Config::parse(text, Path::new("/etc/enbd/server.toml")).unwrap();
        assert_eq!(
            c.options,
            Options::default(),
            "every option is commented out"
        );
        assert_eq!(
            c.exports,
            ["disk=/srv/enbd/disk.img,desc=scratch disk".parse().unwrap()]
        );
        // Each commented-out option, uncommented, is valid too.
        let all: String = text
            .lines()
            .map(|l| {
                l.strip_prefix('#')
                    .filter(|l| !l.starts_with([' ', '#']))
                    .unwrap_or(l)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&all, Path::new("/etc/enbd/server.toml")).unwrap();
        assert_eq!(c.options.workers, Some(4));
        assert_eq!(c.exports.len(), 2);
    }

    #[test]
    fn unknown_keys_are_errors_with_their_line() {
        let e = err("workers = 2\nlisten-on = [\"x\"]\n");
        assert!(
            e.contains("line 2") && e.contains("unknown field `listen-on`"),
            "{e}"
        );
        let e = err("[[export]]\nname = \"a\"\npath = \"/a\"\nreadonly = true\n");
        assert!(
            e.contains("line 4") && e.contains("unknown field `readonly`"),
            "{e}"
        );
        let e = err("[exports]\n");
        assert!(e.contains("unknown field `exports`"), "{e}");
    }

    #[test]
    fn bad_types_and_values_are_errors() {
        let e = err("\nworkers = \"four\"\n");
        assert!(e.contains("line 2") && e.contains("invalid type"), "{e}");
        let e = err("[[export]]\nname = \"a\"\n");
        assert!(e.contains("give one of path, raid0"), "{e}");
        let e = err("[[export]]\nname = \"a\"\npath = \"\"\n");
        assert!(e.contains("export 'a': empty path"), "{e}");
        assert!(err("workers = 0").contains("must be 1 to 256"));
        assert!(err("workers = 300").contains("must be 1 to 256"));
        assert!(err("max-connections-per-client = 0").contains("at least 1"));
        assert!(err("tls = \"maybe\"").contains("use off, allow or require"));
        assert!(err("tls-cert = \"/c\"").contains("go together"));
        assert!(err("handshake-timeout = -1").contains("line 1"));
        assert!(err("workers = ").contains("line 1"));
    }

    #[test]
    fn memory_and_handshake_limits_come_from_the_file_too() {
        let d = Dir::new();
        d.image("b.img");
        let p = d.config(
            "memory-budget = \"2G\"\nmax-inflight-per-connection = \"128M\"\n\
             max-handshakes = 8\nsend-timeout = 5\n\
             [[export]]\nname = \"b\"\npath = \"b.img\"\n",
        );
        let conf = p.to_str().unwrap();
        let (cli, _) = combined(&["--config", conf, "--send-timeout", "7"]).unwrap();
        assert_eq!(cli.memory_budget, 2 << 30);
        assert_eq!(cli.max_inflight_per_connection, 128 << 20);
        assert_eq!((cli.max_handshakes, cli.send_timeout), (8, 7));
        assert!(err("memory-budget = \"lots\"").contains("memory-budget = \"lots\""));
        assert!(err("max-handshakes = 0").contains("at least 1"));
        assert!(err("send-timeout = \"5\"").contains("invalid type"));
    }

    #[test]
    fn the_proxy_comes_from_the_file_too() {
        let d = Dir::new();
        let p = d.config(
            "proxy = [\"up1:10809\", \"up2:10809\"]\nproxy-export = [\"base\"]\n\
             cache-dir = \"cache\"\nproxy-timeout = 3\nreplicate = \"16M\"\n\
             proxy-unchecked = true\n",
        );
        let conf = p.to_str().unwrap();
        let (cli, r) = combined(&["--config", conf]).unwrap();
        assert_eq!(cli.proxy_upstreams, ["up1:10809", "up2:10809"]);
        assert_eq!(cli.proxy_exports, ["base"]);
        assert_eq!(cli.cache_dir, Some(d.0.join("cache")));
        assert_eq!((cli.proxy_timeout, cli.replicate), (3, Some(16 << 20)));
        assert!(cli.proxy_unchecked);
        assert!(cli.exports.is_empty() && r.unwrap().proxied);
        assert!(err("proxy-export = [\"a/b\"]").contains("plain file name"));
        assert!(err("proxy-timeout = 0").contains("at least 1"));
        assert!(err("replicate = \"fast\"").contains("replicate = \"fast\""));
    }

    #[test]
    fn an_export_named_twice_is_an_error() {
        let two = "[[export]]\nname = \"a\"\npath = \"/a\"\n";
        let e = err(&format!("{two}{two}"));
        assert!(e.contains("export 'a' given twice"), "{e}");
    }

    #[test]
    fn errors_name_the_file() {
        let d = Dir::new();
        let p = d.config("workers = [");
        let e = format!("{:#}", Config::load(&p).unwrap_err());
        assert!(
            e.starts_with(&format!("config file {}: ", p.display())),
            "{e}"
        );
        let missing = d.0.join("none.toml");
        let e = format!("{:#}", Config::load(&missing).unwrap_err());
        assert!(e.contains("cannot read the config file"), "{e}");
    }

    #[test]
    fn the_command_line_wins_and_its_exports_come_first() {
        let d = Dir::new();
        let a = d.image("a.img");
        let p = d.config(
            "workers = 8\nidle-timeout = 60\nlisten = [\"127.0.0.1:1\"]\n\
             [[export]]\nname = \"b\"\npath = \"b.img\"\n",
        );
        let conf = p.to_str().unwrap();
        let ea = format!("a={}", a.display());
        let (cli, r) = combined(&["--config", conf, "--export", &ea, "--workers", "2"]).unwrap();
        assert_eq!(cli.workers, 2, "given on the command line");
        assert_eq!(cli.idle_timeout, 60, "from the file");
        assert_eq!(cli.handshake_timeout, 30, "neither: the default");
        assert_eq!(cli.listen, ["127.0.0.1:1"]);
        let names: Vec<_> = cli.exports.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(cli.exports[1].source, Source::Image(d.0.join("b.img")));
        assert_eq!(r.unwrap().cli_exports.len(), 1);
        // The command line's --listen replaces the file's list.
        let (cli, _) = combined(&["--config", conf, "-l", "[::1]:2"]).unwrap();
        assert_eq!(cli.listen, ["[::1]:2"]);
        // A default value on the command line does not count as given.
        let (cli, _) = combined(&["--config", conf, "--workers", "4"]).unwrap();
        assert_eq!(cli.workers, 4);

        let e = combined_err(&["--config", conf, "--export", &format!("b={}", a.display())]);
        assert!(
            e.contains("'b' is given both on the command line and in"),
            "{e}"
        );
        let empty = d.config("workers = 2\n");
        let e = combined_err(&["--config", empty.to_str().unwrap()]);
        assert!(e.contains("no exports"), "{e}");
        // Without --config an export is required.
        assert!(combined(&["--workers", "2"]).is_err());
        // A unix socket from the file, no TCP from the command line.
        let nt = d.config("unix = \"s\"\n[[export]]\nname = \"b\"\npath = \"b.img\"\n");
        let (cli, _) = combined(&["--config", nt.to_str().unwrap(), "--no-tcp"]).unwrap();
        assert_eq!((cli.no_tcp, cli.unix), (true, Some(d.0.join("s"))));
    }

    #[test]
    fn file_tls_files_come_as_a_pair_unless_the_command_line_gives_them() {
        let d = Dir::new();
        let p = d.config(
            "tls-cert = \"/f/cert\"\ntls-key = \"/f/key\"\n\
             [[export]]\nname = \"b\"\npath = \"b.img\"\n",
        );
        let conf = p.to_str().unwrap();
        let (cli, _) = combined(&["--config", conf]).unwrap();
        assert_eq!(cli.tls_cert.as_deref(), Some(Path::new("/f/cert")));
        assert_eq!(cli.tls_key.as_deref(), Some(Path::new("/f/key")));
        let (cli, _) = combined(&[
            "--config",
            conf,
            "--tls-cert",
            "/c/cert",
            "--tls-key",
            "/c/key",
        ])
        .unwrap();
        assert_eq!(cli.tls_cert.as_deref(), Some(Path::new("/c/cert")));
        assert_eq!(cli.tls_key.as_deref(), Some(Path::new("/c/key")));
    }

    fn names(e: &Exports) -> Vec<String> {
        e.iter().map(|x| x.name().to_owned()).collect()
    }

    #[test]
    fn a_reload_adds_removes_and_changes_exports_while_old_ones_serve_on() {
        let d = Dir::new();
        d.image("a.img");
        d.image("b.img");
        let one = "[[export]]\nname = \"a\"\npath = \"a.img\"\ndescription = \"A\"\n";
        let p = d.config(one);
        let (cli, r) = combined(&["--config", p.to_str().unwrap()]).unwrap();
        let r = r.unwrap();
        let first = Exports::open(&cli.exports).unwrap();
        // A connection to "a" holds it.
        let held = first.find(b"a").unwrap();

        // "a" renamed and described anew (the same image: kept open, its
        // lock not met again), "b" added.
        d.config(
            "[[export]]\nname = \"b\"\npath = \"b.img\"\n\
             [[export]]\nname = \"a2\"\npath = \"a.img\"\ndescription = \"A2\"\n",
        );
        let second = r.reload(&first).unwrap();
        assert_eq!(names(&second), ["b", "a2"]);
        let a2 = second.find(b"a2").unwrap();
        assert_eq!(a2.description(), "A2");
        assert!(Exports::shares_storage(&held, &a2));
        assert!(second.find(b"a").is_none());
        assert_eq!(
            changes(&first, &second),
            (vec!["b".into(), "a2".into()], vec!["a".into()], vec![])
        );
        drop(first);
        // The held export still does I/O.
        held.backend().write_at(b"still", 0, false).unwrap();
        let mut buf = [0u8; 5];
        a2.backend().read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"still");

        // An unchanged spec keeps its storage; a changed description alone
        // is a change.
        d.config(
            "[[export]]\nname = \"b\"\npath = \"b.img\"\ndescription = \"B\"\n\
             [[export]]\nname = \"a2\"\npath = \"a.img\"\ndescription = \"A2\"\n",
        );
        let third = r.reload(&second).unwrap();
        assert!(Exports::shares_storage(&a2, &third.find(b"a2").unwrap()));
        assert_eq!(changes(&second, &third), (vec![], vec![], vec!["b".into()]));

        // Another path to the same image is the same storage.
        std::os::unix::fs::symlink("a.img", d.0.join("link.img")).unwrap();
        d.config("[[export]]\nname = \"a2\"\npath = \"link.img\"\n");
        let fourth = r.reload(&third).unwrap();
        assert!(Exports::shares_storage(&a2, &fourth.find(b"a2").unwrap()));
    }

    #[test]
    fn a_bad_reload_leaves_the_exports_in_force_untouched() {
        let d = Dir::new();
        d.image("a.img");
        let p = d.config("[[export]]\nname = \"a\"\npath = \"a.img\"\n");
        let (cli, r) = combined(&["--config", p.to_str().unwrap()]).unwrap();
        let r = r.unwrap();
        let current = Exports::open(&cli.exports).unwrap();
        let keep = "[[export]]\nname = \"a\"\npath = \"a.img\"\n";
        for (bad, msg) in [
            ("[[export]]\nname = \"a\"\npath = ", "line 3"),
            (
                &*format!("{keep}[[export]]\nname = \"m\"\npath = \"missing.img\"\n"),
                "cannot open",
            ),
            (&*format!("{keep}{keep}"), "given twice"),
            ("workers = 2\n", "no exports"),
            // Read-write over the open read-write image: our own lock.
            (
                &*format!("{keep}[[export]]\nname = \"x\"\npath = \"./a.img\"\n"),
                "same image",
            ),
            // The same image read-only instead: meets the lock of the
            // export still open.
            (
                "[[export]]\nname = \"a\"\npath = \"a.img\"\nro = true\n",
                "in use",
            ),
        ] {
            d.config(bad);
            let e = format!("{:#}", r.reload(&current).unwrap_err());
            assert!(e.contains(msg), "{bad}: {e}");
            assert_eq!(names(&current), ["a"]);
        }
        // And a good one goes through after all that.
        d.config(keep);
        let again = r.reload(&current).unwrap();
        assert!(Exports::shares_storage(
            &current.find(b"a").unwrap(),
            &again.find(b"a").unwrap()
        ));
    }

    #[test]
    fn reload_now_swaps_the_served_exports_only_when_the_file_is_good() {
        let d = Dir::new();
        d.image("a.img");
        d.image("b.img");
        let p = d.config("[[export]]\nname = \"a\"\npath = \"a.img\"\n");
        let (cli, r) = combined(&["--config", p.to_str().unwrap()]).unwrap();
        let (r, shared) = (r.unwrap(), Shared::new(&cli).unwrap());
        d.config("[[export]]\nname = \"b\"\npath = \"b.img\"\n");
        reload_now(&r, &shared);
        assert_eq!(names(&shared.exports()), ["b"]);
        let before = shared.exports();
        d.config("[[export]]\nname = \"c\"\npath = \"c.img\"\n");
        reload_now(&r, &shared);
        assert!(
            Arc::ptr_eq(&before, &shared.exports()),
            "a failed reload swapped"
        );
    }

    #[test]
    fn a_replaced_image_is_opened_anew() {
        let d = Dir::new();
        let a = d.image("a.img");
        let p = d.config("[[export]]\nname = \"a\"\npath = \"a.img\"\nshared = true\n");
        let (cli, r) = combined(&["--config", p.to_str().unwrap()]).unwrap();
        let current = Exports::open(&cli.exports).unwrap();
        std::fs::remove_file(&a).unwrap();
        std::fs::write(&a, vec![1u8; 8192]).unwrap();
        let next = r.unwrap().reload(&current).unwrap();
        let (old, new) = (current.find(b"a").unwrap(), next.find(b"a").unwrap());
        assert!(!Exports::shares_storage(&old, &new));
        assert_eq!((old.size(), new.size()), (4096, 8192));
    }
}
