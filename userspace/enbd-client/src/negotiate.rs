//! The client side of the NBD handshake lives in `enbd-nbd`, shared with
//! enbd-server's caching proxy.

pub use enbd_nbd::negotiate::*;
