//! The userspace TLS proxy must move data both ways at once: a peer that
//! echoes while we are still writing must not deadlock the pumps. It must
//! also hand on what the session already held, and carry enbd's traffic
//! pattern (many requests in flight, on several channels).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

fn write_pem(dir: &std::path::Path, name: &str, pem: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p
}

/// Completes a TLS client handshake with "localhost" on `tcp`.
fn client_handshake(
    tcp: TcpStream,
    cfg: Arc<rustls::ClientConfig>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let name = enbd_tls::server_name("localhost").unwrap();
    let mut c = rustls::StreamOwned::new(rustls::ClientConnection::new(cfg, name).unwrap(), tcp);
    while c.conn.is_handshaking() {
        c.conn.complete_io(&mut c.sock).unwrap();
    }
    c
}

/// A self-signed certificate for "localhost" in a fresh directory (removed
/// by the caller), and the server and client configurations that use it.
fn tls_pair(
    tag: &str,
) -> (
    std::path::PathBuf,
    Arc<rustls::ServerConfig>,
    Arc<rustls::ClientConfig>,
) {
    let dir = std::env::temp_dir().join(format!("enbd-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = write_pem(&dir, "cert.pem", &ck.cert.pem());
    let key = write_pem(&dir, "key.pem", &ck.key_pair.serialize_pem());
    let server_cfg = enbd_tls::server_config(&cert, &key, None).unwrap();
    let client_cfg = enbd_tls::client_config(&cert, None).unwrap();
    (dir, server_cfg, client_cfg)
}

#[test]
fn proxies_echo_16_mib_both_ways_without_deadlock() {
    let (dir, server_cfg, client_cfg) = tls_pair("proxy");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Server: TLS handshake, then a proxy; the app echoes in 64 KiB chunks.
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut s =
            rustls::StreamOwned::new(rustls::ServerConnection::new(server_cfg).unwrap(), tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).unwrap();
        }
        let (mut plain, pump) =
            enbd_tls::proxy::spawn(rustls::Connection::Server(s.conn), s.sock).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = plain.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            plain.write_all(&buf[..n]).unwrap();
        }
        drop(plain);
        pump.join().unwrap();
    });

    let c = client_handshake(TcpStream::connect(addr).unwrap(), client_cfg);
    let (plain, pump) = enbd_tls::proxy::spawn(rustls::Connection::Client(c.conn), c.sock).unwrap();
    let total = 16 << 20;
    let data: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4096) as u8).collect();
    let expect = data.clone();
    let mut reader = plain.try_clone().unwrap();
    let mut writer = plain;
    // Writes everything before reading anything back: with pumps that
    // block in one direction, the TCP and socketpair buffers fill up and
    // both ends stop.
    let w = std::thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::with_capacity(total);
        reader.read_to_end(&mut got).unwrap();
        done_tx.send(got).unwrap();
    });
    let got = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("proxy stalled: no echo within 60 s");
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "echoed data differs");
    w.join().unwrap();
    pump.join().unwrap();
    server.join().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// A session can reach the proxy with plaintext that rustls has already read
/// and decrypted (here: a message the peer sent right after the handshake,
/// pulled in by the caller's last read). poll() only reports what is still
/// in the socket, so the pump must hand that plaintext on at once, not when
/// (if ever) the peer sends more.
#[test]
fn delivers_plaintext_buffered_before_the_handoff() {
    let (dir, server_cfg, client_cfg) = tls_pair("early");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    // Server: says hello once, then stays silent until the test ends.
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let mut s =
            rustls::StreamOwned::new(rustls::ServerConnection::new(server_cfg).unwrap(), tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).unwrap();
        }
        s.write_all(b"hello").unwrap();
        s.flush().unwrap();
        let _ = done_rx.recv();
    });

    let mut c = client_handshake(TcpStream::connect(addr).unwrap(), client_cfg);
    // Read until rustls holds the hello as plaintext, but leave it there.
    while c.conn.wants_read() {
        c.conn.complete_io(&mut c.sock).unwrap();
    }
    let (mut plain, pump) =
        enbd_tls::proxy::spawn(rustls::Connection::Client(c.conn), c.sock).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = [0u8; 5];
    let r = plain.read_exact(&mut got);
    done_tx.send(()).unwrap();
    r.expect("the plaintext buffered before the handoff never came out of the proxy");
    assert_eq!(&got, b"hello");
    drop(plain);
    pump.join().unwrap();
    server.join().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// Bytes a read of `len` at `off` returns, and what a write must carry.
fn pattern(off: u64, len: u32) -> Vec<u8> {
    (0..u64::from(len))
        .map(|i| ((off + i) * 31 / 7) as u8)
        .collect()
}

/// Request: kind (0 read, 1 write), cookie, offset, length; a write's data
/// follows. Reply: cookie, error; a read's data follows.
const REQ_LEN: usize = 1 + 8 + 8 + 4;
const REPLY_LEN: usize = 8 + 4;

/// An NBD-like server on a plaintext stream: one reader, four workers that
/// reply in completion order under a lock, as enbd-server does.
fn serve_requests(mut plain: UnixStream) {
    let out = Arc::new(Mutex::new(plain.try_clone().unwrap()));
    let (tx, rx) = mpsc::sync_channel::<(u8, u64, u64, u32, Vec<u8>)>(32);
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (rx, out) = (rx.clone(), out.clone());
            std::thread::spawn(move || loop {
                let job = rx.lock().unwrap().recv();
                let Ok((kind, cookie, off, len, data)) = job else {
                    return;
                };
                let bad = kind == 1 && data != pattern(off, len);
                let mut reply = cookie.to_be_bytes().to_vec();
                reply.extend_from_slice(&u32::from(bad).to_be_bytes());
                if kind == 0 {
                    reply.extend_from_slice(&pattern(off, len));
                }
                if out.lock().unwrap().write_all(&reply).is_err() {
                    return;
                }
            })
        })
        .collect();
    let mut h = [0u8; REQ_LEN];
    while plain.read_exact(&mut h).is_ok() {
        let kind = h[0];
        let cookie = u64::from_be_bytes(h[1..9].try_into().unwrap());
        let off = u64::from_be_bytes(h[9..17].try_into().unwrap());
        let len = u32::from_be_bytes(h[17..21].try_into().unwrap());
        let mut data = Vec::new();
        if kind == 1 {
            data = vec![0; len as usize];
            plain.read_exact(&mut data).unwrap();
        }
        tx.send((kind, cookie, off, len, data)).unwrap();
    }
    drop(tx);
    for w in workers {
        w.join().unwrap();
    }
}

/// Drives a plaintext stream as enbd.ko drives a channel: a sender thread
/// and a receiver thread, both blocking, up to 32 requests in flight, reads
/// and writes from 512 bytes to 1 MiB. Checks every reply and read.
fn drive_requests(plain: UnixStream, seed: u64, count: u64) {
    let inflight = Arc::new((
        Mutex::new(HashMap::<u64, (u8, u64, u32)>::new()),
        Condvar::new(),
    ));
    let mut sender = plain.try_clone().unwrap();
    let mut receiver = plain;
    let book = inflight.clone();
    let s = std::thread::spawn(move || {
        let mut x = seed;
        for cookie in 0..count {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = x >> 33;
            let kind = (r & 1) as u8;
            let len = [1 << 20, 4096, 512, 65536 + 512][((r >> 1) % 4) as usize];
            let off = (r >> 4) % (64 << 20);
            {
                let (m, cv) = &*book;
                let mut g = m.lock().unwrap();
                while g.len() >= 32 {
                    g = cv.wait(g).unwrap();
                }
                g.insert(cookie, (kind, off, len));
            }
            let mut req = vec![kind];
            req.extend_from_slice(&cookie.to_be_bytes());
            req.extend_from_slice(&off.to_be_bytes());
            req.extend_from_slice(&len.to_be_bytes());
            sender.write_all(&req).unwrap();
            if kind == 1 {
                sender.write_all(&pattern(off, len)).unwrap();
            }
        }
        sender
    });
    for _ in 0..count {
        let mut h = [0u8; REPLY_LEN];
        receiver.read_exact(&mut h).unwrap();
        let cookie = u64::from_be_bytes(h[..8].try_into().unwrap());
        assert_eq!(
            u32::from_be_bytes(h[8..].try_into().unwrap()),
            0,
            "write data corrupted"
        );
        let (kind, off, len) = {
            let (m, cv) = &*inflight;
            let v = m
                .lock()
                .unwrap()
                .remove(&cookie)
                .expect("reply to an unknown cookie");
            cv.notify_all();
            v
        };
        if kind == 0 {
            let mut d = vec![0u8; len as usize];
            receiver.read_exact(&mut d).unwrap();
            assert!(d == pattern(off, len), "read data corrupted");
        }
    }
    let sender = s.join().unwrap();
    sender.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    receiver.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// The traffic of the bench's TLS-proxy target, without the kernel: several
/// channels, each a client proxy talking to a server proxy, with many
/// requests in flight and large writes and reads crossing in both
/// directions. A pump that stalls under this pattern hangs the test.
#[test]
fn carries_nbd_like_traffic_on_several_channels() {
    let (dir, server_cfg, client_cfg) = tls_pair("nbdlike");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let channels = 3;
    std::thread::spawn(move || {
        for _ in 0..channels {
            let (tcp, _) = listener.accept().unwrap();
            let cfg = server_cfg.clone();
            std::thread::spawn(move || {
                let mut s =
                    rustls::StreamOwned::new(rustls::ServerConnection::new(cfg).unwrap(), tcp);
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock).unwrap();
                }
                let (plain, _pump) =
                    enbd_tls::proxy::spawn(rustls::Connection::Server(s.conn), s.sock).unwrap();
                serve_requests(plain);
            });
        }
    });
    let (done_tx, done_rx) = mpsc::channel();
    for c in 0..channels {
        let (cfg, done_tx) = (client_cfg.clone(), done_tx.clone());
        std::thread::spawn(move || {
            let tcp = TcpStream::connect(addr).unwrap();
            tcp.set_nodelay(true).unwrap();
            let cl = client_handshake(tcp, cfg);
            let (plain, pump) =
                enbd_tls::proxy::spawn(rustls::Connection::Client(cl.conn), cl.sock).unwrap();
            drive_requests(plain, 12345 + c, 400);
            pump.join().unwrap();
            done_tx.send(c).unwrap();
        });
    }
    for _ in 0..channels {
        done_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("a channel stalled (or failed: see its panic above)");
    }
    std::fs::remove_dir_all(&dir).ok();
}
