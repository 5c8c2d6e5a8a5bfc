//! A TCP link in front of a server that a test can cut and restore, to kill a part of the
//! stack (the relay, the upstream) under load and bring it back on the same address.
//!
//! Cutting it does what a killed process does to its peers: every open connection is reset
//! (SO_LINGER 0, so the peer sees a reset and not an orderly close) and new connections are
//! refused, because nothing listens on the port any more. Restoring binds the same port again.

use socket2::{Domain, SockRef, Socket, Type};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A forwarder from [`Link::addr`] to a target; it stops (connections reset) on drop.
pub struct Link {
    pub addr: SocketAddr,
    target: SocketAddr,
    up: Option<Up>,
    accepted: Arc<AtomicU64>,
}

/// The listener and connections of a link while it is up.
struct Up {
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: JoinHandle<()>,
}

impl Link {
    /// Forwards a free loopback port (from [`PORTS`]) to `target`.
    pub fn start(target: SocketAddr) -> Link {
        let listener = bind_outside_ephemeral_range();
        let addr = listener.local_addr().expect("link address");
        let accepted = Arc::new(AtomicU64::new(0));
        let up = Some(Up::serve(listener, target, accepted.clone()));
        Link {
            addr,
            target,
            up,
            accepted,
        }
    }

    /// Resets every connection and stops listening, as if the server behind had been killed.
    pub fn cut(&mut self) {
        if let Some(up) = self.up.take() {
            up.stop();
        }
    }

    /// Listens on the same address again (a killed server restarted).
    pub fn restore(&mut self) {
        if self.up.is_some() {
            return;
        }
        let listener = bind_reusing(self.addr);
        self.up = Some(Up::serve(listener, self.target, self.accepted.clone()));
    }

    pub fn is_up(&self) -> bool {
        self.up.is_some()
    }

    /// Connections accepted so far, over every time the link was up.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cut();
    }
}

/// The ports a link listens on: below Linux's default ephemeral range (32768–60999), from
/// which [`crate::free_port`] and every outgoing connection draw. While a link is cut its port
/// is free, and a port from that range could be taken by another test's server or met by a
/// connection to itself (TCP simultaneous open); from this range it is neither.
pub const PORTS: std::ops::Range<u16> = 20_000..30_000;

fn bind_outside_ephemeral_range() -> TcpListener {
    let mut last = None;
    for _ in 0..200 {
        match TcpListener::bind(("127.0.0.1", fastrand::u16(PORTS))) {
            Ok(l) => return l,
            Err(e) => last = Some(e),
        }
    }
    panic!("no free loopback port in {PORTS:?} for a link: {last:?}");
}

/// Binds `addr` again right after it was closed (SO_REUSEADDR, as servers do on restart),
/// retrying briefly.
fn bind_reusing(addr: SocketAddr) -> TcpListener {
    let mut last = None;
    for _ in 0..100 {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        match socket.bind(&addr.into()).and_then(|()| socket.listen(1024)) {
            Ok(()) => return socket.into(),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("cannot bind {addr} again: {last:?}");
}

impl Up {
    fn serve(listener: TcpListener, target: SocketAddr, accepted: Arc<AtomicU64>) -> Up {
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let acceptor = {
            let (stop, open) = (stop.clone(), open.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            forward(client, target, &open);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
                // The listener closes here: new connections are refused from now on.
            })
        };
        Up {
            stop,
            open,
            acceptor,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.acceptor.join();
        let open = std::mem::take(&mut *self.open.lock().expect("open connections"));
        for stream in open {
            // A reset, not an orderly close, as when the process holding it dies.
            let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Connects `client` to `target` and copies both ways on two threads. Both sockets are kept in
/// `open` so that a cut can reset them.
fn forward(client: TcpStream, target: SocketAddr, open: &Arc<Mutex<Vec<TcpStream>>>) {
    let _ = client.set_nonblocking(false);
    let _ = client.set_nodelay(true);
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(1)) else {
        let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
        return;
    };
    let _ = server.set_nodelay(true);
    let clones = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    );
    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = clones else {
        return;
    };
    {
        // Ended connections stay listed until the cut (a test's gateway keeps few open).
        let mut open = open.lock().expect("open connections");
        open.push(c3);
        open.push(s3);
    }
    std::thread::spawn(move || copy(client, server));
    std::thread::spawn(move || copy(s2, c2));
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = stream;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        stream.read_exact(&mut got)?;
        Ok(got)
    }

    #[test]
    fn a_cut_resets_open_connections_refuses_new_ones_and_a_restore_serves_again() {
        let mut link = Link::start(echo_server());
        assert!(PORTS.contains(&link.addr.port()), "{}", link.addr);
        let mut open = TcpStream::connect(link.addr).unwrap();
        open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(round_trip(&mut open, b"ping").unwrap(), b"ping");

        link.cut();
        assert!(!link.is_up());
        assert!(
            round_trip(&mut open, b"again").is_err(),
            "an open connection is reset by a cut"
        );
        let refused = TcpStream::connect_timeout(&link.addr, Duration::from_secs(1));
        assert_eq!(
            refused.map(|_| ()).unwrap_err().kind(),
            ErrorKind::ConnectionRefused
        );

        link.restore();
        let mut fresh = TcpStream::connect(link.addr).unwrap();
        fresh
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(round_trip(&mut fresh, b"back").unwrap(), b"back");
        assert_eq!(link.accepted(), 2);
    }
}
