//! The userspace TLS proxy must move data both ways at once: a peer that
//! echoes while we are still writing must not deadlock the pumps.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

fn write_pem(dir: &std::path::Path, name: &str, pem: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p
}

#[test]
fn proxies_echo_16_mib_both_ways_without_deadlock() {
    let dir = std::env::temp_dir().join(format!("enbd-tls-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = write_pem(&dir, "cert.pem", &ck.cert.pem());
    let key = write_pem(&dir, "key.pem", &ck.key_pair.serialize_pem());
    let server_cfg = enbd_tls::server_config(&cert, &key, None).unwrap();
    let client_cfg = enbd_tls::client_config(&cert, None).unwrap();

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

    let tcp = TcpStream::connect(addr).unwrap();
    let name = enbd_tls::server_name("localhost").unwrap();
    let mut c = rustls::StreamOwned::new(
        rustls::ClientConnection::new(client_cfg, name).unwrap(),
        tcp,
    );
    while c.conn.is_handshaking() {
        c.conn.complete_io(&mut c.sock).unwrap();
    }
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
