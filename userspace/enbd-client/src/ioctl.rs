//! The enbd.ko control interface: ioctls on `/dev/enbdN`.
//!
//! The argument layouts and numbers come from `enbd_core::uapi`, the file the
//! module compiles too.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use enbd_core::uapi::{self, Config, ServersArg, SockArg, Status, WaitArg};

/// An ioctl that the kernel refused, with a message for users.
#[derive(Debug, thiserror::Error)]
pub enum IoctlError {
    #[error("{path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: {what} refused: enbd control needs root (CAP_SYS_ADMIN)")]
    NotRoot { path: PathBuf, what: &'static str },
    #[error("{path}: not an enbd device, or enbd.ko does not know {what}")]
    NotEnbd { path: PathBuf, what: &'static str },
    #[error("{path}: device is not connected")]
    NotConnected { path: PathBuf },
    #[error("{path}: device is already configured (disconnect it first)")]
    Busy { path: PathBuf },
    #[error("{path}: token rejected by the kernel")]
    BadToken { path: PathBuf },
    #[error("{path}: {what}: invalid argument")]
    Invalid { path: PathBuf, what: &'static str },
    /// `IOC_DISCONNECT` could not write back cached data: no channel to the
    /// server came up for `request_timeout`. The data stays queued and the
    /// device stays configured.
    #[error(
        "{path}: disconnect: cached writes could not reach the server (no connection); \
         reconnect the server and retry, or discard them with 'enbd-client eject {path}'"
    )]
    Unflushed { path: PathBuf },
    #[error("{path}: {what} interrupted by a signal; the device is still connected")]
    Interrupted { path: PathBuf, what: &'static str },
    #[error("{path}: {what} failed: {source}")]
    Other {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

/// An open enbd block device.
pub struct EnbdDev {
    file: File,
    path: PathBuf,
}

impl EnbdDev {
    /// Opens the device for control. Read-only access is enough for ioctls and
    /// also works on a device configured read-only.
    pub fn open(path: &Path) -> Result<Self, IoctlError> {
        let file = File::open(path).map_err(|source| IoctlError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    fn ioctl(
        &self,
        what: &'static str,
        req: u32,
        arg: Option<&mut [u8]>,
    ) -> Result<(), IoctlError> {
        let ptr = arg.map_or(std::ptr::null_mut(), |a| a.as_mut_ptr());
        // SAFETY: `req` is one of enbd's ioctls whose argument size is encoded
        // in the number and equals the buffer's length (see uapi.rs); the
        // kernel reads and writes at most that many bytes at `ptr`.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req as libc::c_ulong, ptr) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        let path = self.path.clone();
        Err(match err.raw_os_error() {
            Some(libc::EPERM) => IoctlError::NotRoot { path, what },
            Some(libc::ENOTTY) => IoctlError::NotEnbd { path, what },
            Some(libc::ENOTCONN) => IoctlError::NotConnected { path },
            Some(libc::EBUSY) => IoctlError::Busy { path },
            Some(libc::EACCES) => IoctlError::BadToken { path },
            Some(libc::EINVAL) => IoctlError::Invalid { path, what },
            _ => IoctlError::Other {
                path,
                what,
                source: err,
            },
        })
    }

    /// Reads the device state.
    pub fn status(&self) -> Result<Status, IoctlError> {
        let mut buf = [0u8; Status::SIZE];
        self.ioctl("status", uapi::IOC_STATUS, Some(&mut buf))?;
        Ok(Status::from_bytes(&buf))
    }

    /// Waits up to `timeout_ms` for the device's epoch to move past `epoch`.
    pub fn wait(&self, epoch: u32, timeout_ms: u32) -> Result<Status, IoctlError> {
        let mut buf = WaitArg {
            epoch,
            timeout_ms,
            status: Status::default(),
        }
        .to_bytes();
        self.ioctl("wait", uapi::IOC_WAIT, Some(&mut buf))?;
        Ok(WaitArg::from_bytes(&buf).status)
    }

    /// Configures an idle device; returns the config with the kernel's token.
    pub fn configure(&self, cfg: &Config) -> Result<Config, IoctlError> {
        let mut buf = cfg.to_bytes();
        self.ioctl("configure", uapi::IOC_CONFIGURE, Some(&mut buf))?;
        Ok(Config::from_bytes(&buf))
    }

    /// Hands a connected socket to the device.
    pub fn add_sock(
        &self,
        fd: RawFd,
        flags: u32,
        server: usize,
        token: &[u8; uapi::TOKEN_LEN],
    ) -> Result<(), IoctlError> {
        let mut buf = SockArg {
            fd,
            flags,
            server: server as u32,
            token: *token,
        }
        .to_bytes();
        self.ioctl("add-sock", uapi::IOC_ADD_SOCK, Some(&mut buf))
    }

    /// Tells the device its servers' addresses and RTTs, and which one
    /// carries the I/O.
    pub fn set_servers(&self, arg: &ServersArg) -> Result<(), IoctlError> {
        let mut buf = arg.to_bytes();
        self.ioctl("servers", uapi::IOC_SERVERS, Some(&mut buf))
    }

    /// Graceful disconnect: cached writes go out and in-flight requests
    /// finish, then the device resets. Fails with [`IoctlError::Unflushed`]
    /// when cached writes cannot reach the server (the device then stays
    /// configured) and [`IoctlError::Interrupted`] on a signal.
    pub fn disconnect(&self) -> Result<(), IoctlError> {
        self.ioctl("disconnect", uapi::IOC_DISCONNECT, None)
            .map_err(disconnect_error)
    }

    /// Fails all pending requests and releases the channels at once.
    pub fn eject(&self) -> Result<(), IoctlError> {
        self.ioctl("eject", uapi::IOC_EJECT, None)
    }
}

/// Gives the errors only `IOC_DISCONNECT` returns their meaning.
fn disconnect_error(e: IoctlError) -> IoctlError {
    match e {
        IoctlError::Other { path, what, source } => match source.raw_os_error() {
            Some(libc::ETIMEDOUT) => IoctlError::Unflushed { path },
            Some(libc::EINTR) => IoctlError::Interrupted { path, what },
            _ => IoctlError::Other { path, what, source },
        },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other(errno: i32) -> IoctlError {
        IoctlError::Other {
            path: "/dev/enbd0".into(),
            what: "disconnect",
            source: io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn disconnect_errors_explain_themselves() {
        let e = disconnect_error(other(libc::ETIMEDOUT));
        assert!(matches!(e, IoctlError::Unflushed { .. }));
        assert_eq!(
            e.to_string(),
            "/dev/enbd0: disconnect: cached writes could not reach the server (no connection); \
             reconnect the server and retry, or discard them with 'enbd-client eject /dev/enbd0'"
        );
        let e = disconnect_error(other(libc::EINTR));
        assert_eq!(
            e.to_string(),
            "/dev/enbd0: disconnect interrupted by a signal; the device is still connected"
        );
        assert!(matches!(
            disconnect_error(other(libc::EIO)),
            IoctlError::Other { .. }
        ));
        assert!(matches!(
            disconnect_error(IoctlError::NotConnected {
                path: "/dev/enbd0".into()
            }),
            IoctlError::NotConnected { .. }
        ));
    }
}
