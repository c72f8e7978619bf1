//! enbd-server's protocol parts as a library, for the fuzz targets
//! (`userspace/fuzz`): they run the very code the server runs. The binary
//! compiles the same files as its own modules, and its tests are the ones
//! that run (`test = false` here), so nothing is tested twice.

pub mod backend;
pub mod budget;
pub mod cache;
pub mod checksum;
pub mod export;
pub mod handshake;
pub mod limits;
pub mod link;
pub mod proxy;
pub mod raid;
#[cfg(test)]
mod testutil;
pub mod transmission;
pub mod verified;
