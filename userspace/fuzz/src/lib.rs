//! The harnesses behind the fuzz targets in `fuzz_targets/`, as a library so
//! that their oracles have unit tests (`cargo test` here) and the seed corpus
//! can be checked against the encoders that produce it.
//!
//! Each harness drives the code the server runs, over a real socket pair,
//! and then checks what came out against the protocol: a harness panics
//! (which libFuzzer reports as a crash) only when the server panicked or
//! broke a rule its oracle states.

pub mod handshake;
pub mod seeds;
pub mod transmission;
pub mod wire_decode;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a socket in a harness waits before giving up, so that a server
/// that stops talking fails the run instead of hanging it. libFuzzer's own
/// `-timeout` (set by `scripts/fuzz`) is the backstop above this.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// The error values the protocol allows, written out here rather than taken
/// from `wire::errno::from_linux`, which is what the targets check.
pub const PROTOCOL_ERRORS: [u32; 8] = {
    use enbd_core::wire::errno::*;
    [
        EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN,
    ]
};

/// A directory for this process's backing files, a few hundred KiB. On
/// tmpfs where there is one: the server syncs its file at every disconnect,
/// once per input here. A fuzzer ends by exiting, so the directories of
/// processes that are gone are removed here instead.
pub fn scratch_dir() -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    };
    if let Ok(dir) = std::fs::read_dir(&base) {
        for e in dir.flatten() {
            let name = e.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix("enbd-fuzz-"));
            if pid.is_some_and(|p| !std::path::Path::new("/proc").join(p).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let d = base.join(format!("enbd-fuzz-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&d) {
        panic!("harness set-up: cannot create {}: {e}", d.display());
    }
    d
}

/// A file of `len` bytes filled with a pattern, for an export.
pub fn backing_file(name: &str, len: usize) -> PathBuf {
    let p = scratch_dir().join(name);
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    if let Err(e) = std::fs::write(&p, data) {
        panic!("harness set-up: cannot write {}: {e}", p.display());
    }
    p
}

/// A connected socket pair whose ends give up after [`PATIENCE`].
pub fn socket_pair() -> (UnixStream, UnixStream) {
    let pair = UnixStream::pair().and_then(|(a, b)| {
        for s in [&a, &b] {
            s.set_read_timeout(Some(PATIENCE))?;
            s.set_write_timeout(Some(PATIENCE))?;
        }
        Ok((a, b))
    });
    match pair {
        Ok(p) => p,
        Err(e) => panic!("harness set-up: socketpair: {e}"),
    }
}

/// Reads everything the server sends on `s` until it closes, in a thread, so
/// the server never blocks on a full socket buffer.
pub fn drain(mut s: UnixStream) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        // A read error (the patience ran out) ends the output like EOF; the
        // oracle then finds it short.
        let _ = s.read_to_end(&mut out);
        out
    })
}

/// The output collected by [`drain`].
pub fn drained(t: JoinHandle<Vec<u8>>) -> Vec<u8> {
    match t.join() {
        Ok(v) => v,
        Err(_) => panic!("harness: the drain thread panicked"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Inputs that once crashed a target are kept as `seeds/TARGET/crash-*`
    /// and must pass now.
    #[test]
    fn kept_crash_inputs_pass() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 3] = [
            ("handshake", crate::handshake::fuzz),
            ("transmission", crate::transmission::fuzz),
            ("wire_decode", crate::wire_decode::fuzz),
        ];
        let mut n = 0;
        for (target, fuzz) in targets {
            for e in std::fs::read_dir(root.join(target)).unwrap() {
                let p = e.unwrap().path();
                if p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("crash-")
                {
                    fuzz(&std::fs::read(&p).unwrap());
                    n += 1;
                }
            }
        }
        assert!(n > 0, "no crash input kept: is seeds/ there?");
    }
}
