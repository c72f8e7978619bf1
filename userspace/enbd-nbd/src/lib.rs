//! The client side of NBD, shared by enbd-client (which hands negotiated
//! sockets to the kernel) and enbd-server's caching proxy (which reads
//! from its upstream servers itself): the fixed newstyle handshake
//! ([`negotiate`]) and a blocking connection that sends `READ`s
//! ([`client::Conn`]), and the deadline both sides put on a socket
//! ([`timed::Timed`]).

pub mod client;
pub mod negotiate;
pub mod timed;
