//! Guest-free tests: libblkio's Rust core (driver virtio-blk-vhost-user) is
//! the front-end of a vhost-user-blk export over a raw file image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use qsd_block::{BlockBackend, Graph, Perm};
use qsd_export_vhost_user_blk::{VhostAddr, VhostBlkOptions, VhostUserBlkExport};
use qsd_rt::IoThread;
use serde_json::json;

const IMG_LEN: u64 = 64 << 20;
const MIB: usize = 1 << 20;

struct Setup {
    dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
    // Field order: the export stops before the thread running its requests.
    export: Option<VhostUserBlkExport>,
    graph: Option<Graph>,
    rt: tokio::runtime::Runtime,
    io: Option<IoThread>,
}

impl Setup {
    fn new(writable: bool, num_queues: u16) -> Setup {
        Setup::with_fd(writable, num_queues, false)
    }

    fn with_fd(writable: bool, num_queues: u16, use_fd: bool) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("qsd-vhost-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let img = dir.path().join("disk.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(IMG_LEN).unwrap();
        f.write_all_at(&vec![0x5a; MIB], 8 << 20).unwrap();
        drop(f);
        let sock = dir.path().join("vhost.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut g = Graph::new();
        qsd_drivers::register_all(&mut g);
        let opts = json!({"driver": "file", "node-name": "f",
                          "filename": img.to_str().unwrap(), "read-only": !writable,
                          "discard": "unmap"});
        let node = rt
            .block_on(g.open(opts.as_object().cloned().unwrap(), qsd_qapi::InputMode::Qmp))
            .unwrap();
        let perm = if writable {
            Perm::CONSISTENT_READ | Perm::WRITE
        } else {
            Perm::CONSISTENT_READ
        };
        let blk = BlockBackend::new(node, "export 'e'", perm, Perm::ALL).unwrap();
        let io = IoThread::spawn("vhost-test").unwrap();
        let addr = if use_fd {
            let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            VhostAddr::Fd(std::os::fd::OwnedFd::from(l))
        } else {
            VhostAddr::Path(sock.clone())
        };
        let mut o = VhostBlkOptions::new("e", addr);
        o.writable = writable;
        o.num_queues = num_queues;
        let export = VhostUserBlkExport::start(o, blk, io.handle()).unwrap();
        Setup {
            dir,
            img,
            sock,
            export: Some(export),
            graph: Some(g),
            rt,
            io: Some(io),
        }
    }

    fn image(&self, offset: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(&self.img).unwrap();
        let mut v = vec![0; len];
        f.read_exact_at(&mut v, offset).unwrap();
        v
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(e) = self.export.take() {
            e.stop();
        }
        if let Some(g) = self.graph.take() {
            let mut g = g;
            self.rt.block_on(g.close_all());
        }
        if let Some(io) = self.io.take() {
            io.stop();
        }
        let _ = self.dir.path();
    }
}

/// A connected blkio front-end with one queue and a 4 MiB buffer.
struct Client {
    b: Blkio,
    q: Blkioq,
    buf: *mut u8,
    len: usize,
}

impl Client {
    fn connect(sock: &Path) -> Client {
        Client::connect_with(sock, false)
    }

    fn connect_with(sock: &Path, read_only: bool) -> Client {
        Client::connect_queues(sock, read_only, 1).0
    }

    /// A client and its extra queues beyond the first.
    fn connect_queues(sock: &Path, read_only: bool, n: i32) -> (Client, Vec<Blkioq>) {
        let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", sock.to_str().unwrap()).unwrap();
        b.set_bool("read-only", read_only).unwrap();
        b.connect().unwrap();
        b.set_i32("num-queues", n).unwrap();
        let mut out = b.start().unwrap();
        let q = out.queues.remove(0);
        let len = 4 * MIB;
        let mr = b.alloc_mem_region(len).unwrap();
        b.map_mem_region(&mr).unwrap();
        let buf = mr.addr as *mut u8;
        (Client { b, q, buf, len }, out.queues)
    }

    fn mem(&mut self) -> &mut [u8] {
        // SAFETY: `buf` is a live mapping of `len` bytes owned by `self.b`; no
        // request is in flight while the slice is used.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.len) }
    }

    fn at(&self, off: usize) -> *mut u8 {
        assert!(off < self.len);
        self.buf.wrapping_add(off)
    }

    /// Wait for `n` completions; their `ret`s by user_data order.
    fn wait(&mut self, n: usize) -> Vec<(usize, i32)> {
        let mut c: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
        let mut got = Vec::new();
        while got.len() < n {
            let k = self
                .q
                .do_io(&mut c[..n - got.len()], n - got.len(), None, None)
                .unwrap();
            for x in &c[..k] {
                // SAFETY: do_io initialised the first `k` completions.
                let x = unsafe { x.assume_init_read() };
                got.push((x.user_data, x.ret));
            }
        }
        got.sort();
        got
    }

    fn one(&mut self) -> i32 {
        self.wait(1)[0].1
    }
}

#[test]
fn test_blkio_read_write_flush_discard_roundtrip() {
    let s = Setup::new(true, 1);
    let mut c = Client::connect(&s.sock);
    assert_eq!(c.b.get_u64("capacity").unwrap(), IMG_LEN);
    // Host pattern.
    c.q.read(8 << 20, c.buf, MIB, 1, ReqFlags::empty());
    assert_eq!(c.one(), 0);
    assert!(c.mem()[..MIB].iter().all(|&x| x == 0x5a));
    // Write, flush, read back, compare with the image.
    for (i, x) in c.mem()[..MIB].iter_mut().enumerate() {
        *x = 0xc3 ^ (i as u8);
    }
    c.q.write(MIB as u64, c.buf, MIB, 2, ReqFlags::empty());
    assert_eq!(c.one(), 0);
    c.q.flush(3, ReqFlags::empty());
    assert_eq!(c.one(), 0);
    c.q.read(MIB as u64, c.at(MIB), MIB, 4, ReqFlags::empty());
    assert_eq!(c.one(), 0);
    let (a, b) = c.mem().split_at(MIB);
    assert_eq!(a, &b[..MIB]);
    assert_eq!(s.image(MIB as u64, MIB), a);
    // Discard and write-zeroes read back as zeroes.
    c.q.discard(MIB as u64, 64 << 10, 5, ReqFlags::empty());
    assert_eq!(c.one(), 0);
    c.q.write_zeroes(MIB as u64 + (64 << 10), 64 << 10, 6, ReqFlags::empty());
    assert_eq!(c.one(), 0);
    c.q.read(MIB as u64, c.at(2 * MIB), 128 << 10, 7, ReqFlags::empty());
    assert_eq!(c.one(), 0);
    assert!(c.mem()[2 * MIB..2 * MIB + (128 << 10)]
        .iter()
        .all(|&x| x == 0));
    assert!(s.image(MIB as u64, 128 << 10).iter().all(|&x| x == 0));
    // Out of range: an error status, and the device keeps working.
    c.q.read(IMG_LEN, c.buf, 4096, 8, ReqFlags::empty());
    assert_ne!(c.one(), 0);
    c.q.read(8 << 20, c.buf, 4096, 9, ReqFlags::empty());
    assert_eq!(c.one(), 0);
}

#[test]
fn test_blkio_many_requests_in_flight_complete() {
    let s = Setup::new(true, 1);
    let mut c = Client::connect(&s.sock);
    for i in 0..32usize {
        let off = 8 * MIB as u64 + (i as u64) * 4096;
        c.q.read(off, c.at(i * 4096), 4096, i, ReqFlags::empty());
    }
    let done = c.wait(32);
    assert!(done.iter().all(|&(_, r)| r == 0), "{done:?}");
    assert_eq!(done.len(), 32);
    assert!(c.mem()[..32 * 4096].iter().all(|&x| x == 0x5a));
}

#[test]
fn test_blkio_read_only_export_refuses_writes() {
    let s = Setup::new(false, 1);
    // A read-write client is refused by blkio itself (VIRTIO_BLK_F_RO).
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", s.sock.to_str().unwrap()).unwrap();
    assert!(b.connect().and_then(|()| b.start().map(|_| ())).is_err());
    drop(b);
    let mut c = Client::connect_with(&s.sock, true);
    c.q.read(8 << 20, c.buf, 4096, 1, ReqFlags::empty());
    assert_eq!(c.one(), 0);
    c.q.write(0, c.buf, 4096, 2, ReqFlags::empty());
    assert_ne!(c.one(), 0);
    assert!(s.image(0, 4096).iter().all(|&x| x == 0));
}

#[test]
fn test_blkio_reconnect_after_disconnect_works() {
    let s = Setup::new(true, 2);
    for round in 0..3u8 {
        let mut c = Client::connect(&s.sock);
        c.mem()[..4096].fill(round + 1);
        c.q.write(4096 * u64::from(round), c.buf, 4096, 1, ReqFlags::empty());
        assert_eq!(c.one(), 0);
        drop(c);
        // The server notices the hang-up and accepts again.
        std::thread::sleep(Duration::from_millis(50));
    }
    for round in 0..3u8 {
        assert!(s
            .image(4096 * u64::from(round), 4096)
            .iter()
            .all(|&x| x == round + 1));
    }
}

#[test]
fn test_garbage_frontend_is_dropped_and_export_lives() {
    use std::io::Write;
    let s = Setup::new(true, 1);
    for junk in [
        vec![0xffu8; 64],
        // A GET_FEATURES header claiming a 1 GiB payload.
        [
            1u32.to_le_bytes(),
            1u32.to_le_bytes(),
            (1u32 << 30).to_le_bytes(),
        ]
        .concat(),
        vec![],
    ] {
        let mut sock = std::os::unix::net::UnixStream::connect(&s.sock).unwrap();
        let _ = sock.write_all(&junk);
        drop(sock);
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut c = Client::connect(&s.sock);
    c.q.read(8 << 20, c.buf, 4096, 1, ReqFlags::empty());
    assert_eq!(c.one(), 0);
    assert!(c.mem()[..4096].iter().all(|&x| x == 0x5a));
}

#[test]
fn test_blkio_listening_fd_address_serves() {
    let s = Setup::with_fd(true, 1, true);
    let mut c = Client::connect(&s.sock);
    c.q.read(8 << 20, c.buf, 4096, 1, ReqFlags::empty());
    assert_eq!(c.one(), 0);
    assert!(c.mem()[..4096].iter().all(|&x| x == 0x5a));
}

#[test]
fn test_stop_while_connected_returns() {
    let mut s = Setup::new(true, 1);
    let c = Client::connect(&s.sock);
    let t = std::time::Instant::now();
    s.export.take().unwrap().stop();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!s.sock.exists(), "the socket file is removed");
    drop(c);
}

#[test]
fn test_blkio_two_queues_both_serve() {
    let s = Setup::new(true, 2);
    let (mut c, mut extra) = Client::connect_queues(&s.sock, false, 2);
    let mut q1 = extra.pop().unwrap();
    c.mem()[..4096].fill(0x11);
    c.mem()[4096..8192].fill(0x22);
    c.q.write(0, c.buf, 4096, 1, ReqFlags::empty());
    q1.write(4096, c.at(4096), 4096, 2, ReqFlags::empty());
    assert_eq!(c.one(), 0);
    let mut done = [MaybeUninit::<Completion>::uninit()];
    assert_eq!(q1.do_io(&mut done, 1, None, None).unwrap(), 1);
    // SAFETY: do_io initialised one completion.
    assert_eq!(unsafe { done[0].assume_init_read() }.ret, 0);
    assert!(s.image(0, 4096).iter().all(|&x| x == 0x11));
    assert!(s.image(4096, 4096).iter().all(|&x| x == 0x22));
}
