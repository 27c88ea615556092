//! A hand-driven vhost-user front-end (the vhost crate's `Frontend`) for
//! what libblkio does not exercise: INFLIGHT_SHMFD resubmission after a
//! back-end restart, and the config-change message after a resize.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use qsd_block::{BlockBackend, Graph, Perm};
use qsd_export_vhost_user_blk::{VhostAddr, VhostBlkOptions, VhostUserBlkExport};
use qsd_rt::IoThread;
use serde_json::json;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_LEN: usize = 1 << 20;
/// Where the fake VMM "maps" guest memory (only used for translation).
const UA: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 16;
const IMG_LEN: u64 = 4 << 20;

fn shm_file(len: u64) -> File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open("/dev/shm")
        .unwrap();
    f.set_len(len).unwrap();
    f
}

struct Setup {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    export: Option<VhostUserBlkExport>,
    node: qsd_block::NodeRef,
    graph: Option<Graph>,
    rt: tokio::runtime::Runtime,
    io: Option<IoThread>,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(IMG_LEN)
            .unwrap();
        let sock = dir.path().join("vhost.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut g = Graph::new();
        qsd_drivers::register_all(&mut g);
        let opts = json!({"driver": "file", "node-name": "f", "filename": img.to_str().unwrap()});
        let node = rt
            .block_on(g.open(opts.as_object().cloned().unwrap(), qsd_qapi::InputMode::Qmp))
            .unwrap();
        let blk = BlockBackend::new(
            node.clone(),
            "export 'e'",
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::ALL,
        )
        .unwrap();
        let io = IoThread::spawn("vhost-fe-test").unwrap();
        let mut o = VhostBlkOptions::new("e", VhostAddr::Path(sock.clone()));
        o.writable = true;
        let export = VhostUserBlkExport::start(o, blk, io.handle()).unwrap();
        Setup {
            _dir: dir,
            sock,
            export: Some(export),
            node,
            graph: Some(g),
            rt,
            io: Some(io),
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(e) = self.export.take() {
            e.stop();
        }
        if let Some(mut g) = self.graph.take() {
            self.rt.block_on(g.close_all());
        }
        if let Some(io) = self.io.take() {
            io.stop();
        }
    }
}

/// Guest memory in a shareable file, and the front-end's view of it.
struct Guest {
    file: File,
    mem: GuestMemoryMmap<()>,
}

impl Guest {
    fn new() -> Guest {
        let file = shm_file(MEM_LEN as u64);
        let fo = FileOffset::new(file.try_clone().unwrap(), 0);
        let mem = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), MEM_LEN, Some(fo))])
            .unwrap();
        Guest { file, mem }
    }
}

/// Negotiate features as QEMU would, with inflight tracking and the
/// backend channel.
fn negotiate(fe: &mut Frontend) {
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    // No EVENT_IDX: every completion signals, simpler to follow.
    fe.set_features(features & !(1 << 29)).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ;
    assert!(pf.contains(want), "{pf:?}");
    fe.set_protocol_features(want).unwrap();
}

fn start_ring(
    fe: &mut Frontend,
    g: &Guest,
    q: &MockSplitQueue<'_, GuestMemoryMmap<()>>,
    base: u16,
) -> (EventFd, EventFd) {
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_LEN as u64,
        userspace_addr: UA,
        mmap_offset: 0,
        mmap_handle: g.file.as_raw_fd(),
    };
    fe.set_mem_table(&[region]).unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    let cfg = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: UA + q.desc_table_addr().0,
        used_ring_addr: UA + q.used_addr().0,
        avail_ring_addr: UA + q.avail_addr().0,
        log_addr: None,
    };
    fe.set_vring_addr(0, &cfg).unwrap();
    fe.set_vring_base(0, base).unwrap();
    let call = EventFd::new(0).unwrap();
    let kick = EventFd::new(0).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    (call, kick)
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Three 512-byte reads: heads 0, 3 and 6.
fn add_reads(g: &Guest, q: &MockSplitQueue<'_, GuestMemoryMmap<()>>) {
    let mut chains = Vec::new();
    for i in 0..3u64 {
        let hdr = 0x1_0000 + 0x100 * i;
        g.mem.write_obj(0u32, GuestAddress(hdr)).unwrap(); // IN
        g.mem.write_obj(i, GuestAddress(hdr + 8)).unwrap(); // sector i
        g.mem.write_obj(0xffu8, GuestAddress(0x3_0000 + i)).unwrap();
        let n = 3 * i as u16;
        chains.push(d(hdr, 16, 1, n + 1));
        chains.push(d(0x2_0000 + 0x1000 * i, 512, 3, n + 2));
        chains.push(d(0x3_0000 + i, 1, 2, 0));
    }
    q.add_desc_chains(&chains, 0).unwrap();
}

fn used(g: &Guest, q: &MockSplitQueue<'_, GuestMemoryMmap<()>>) -> Vec<u32> {
    let idx: u16 = g.mem.read_obj(q.used_addr().unchecked_add(2)).unwrap();
    (0..u64::from(idx))
        .map(|i| {
            g.mem
                .read_obj(q.used_addr().unchecked_add(4 + 8 * i))
                .unwrap()
        })
        .collect()
}

fn wait_used(g: &Guest, q: &MockSplitQueue<'_, GuestMemoryMmap<()>>, n: usize) -> Vec<u32> {
    let t = Instant::now();
    loop {
        let u = used(g, q);
        if u.len() >= n {
            return u;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "used ring: {u:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn test_inflight_requests_of_a_dead_backend_are_resubmitted_once() {
    let s = Setup::new();
    let g = Guest::new();
    let q = MockSplitQueue::create(&g.mem, GuestAddress(0), QSIZE);
    add_reads(&g, &q);
    let mut fe = Frontend::connect(&s.sock, 1).unwrap();
    negotiate(&mut fe);
    let ask = VhostUserInflight {
        num_queues: 1,
        queue_size: QSIZE,
        ..Default::default()
    };
    let (info, region) = fe.get_inflight_fd(&ask).unwrap();
    assert!(info.mmap_size >= 16 + 16 * u64::from(QSIZE));
    // What a back-end that popped heads 3 then 0 (not 6) and died left:
    // version 1, used_idx 0, both marked with their ages.
    let fo = FileOffset::new(region.try_clone().unwrap(), 0);
    let r = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        info.mmap_size as usize,
        Some(fo),
    )])
    .unwrap();
    r.write_obj(1u16, GuestAddress(8)).unwrap();
    r.write_obj(QSIZE, GuestAddress(10)).unwrap();
    for (head, counter) in [(3u64, 10u64), (0, 11)] {
        r.write_obj(1u8, GuestAddress(16 + 16 * head)).unwrap();
        r.write_obj(counter, GuestAddress(16 + 16 * head + 8))
            .unwrap();
    }
    fe.set_inflight_fd(&info, region.as_raw_fd()).unwrap();
    // As QEMU after a back-end crash: the ring base is the used index.
    let (_call, _kick) = start_ring(&mut fe, &g, &q, 0);
    let mut u = wait_used(&g, &q, 3);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used(&g, &q).len(), 3, "no chain completes twice");
    u.sort_unstable();
    assert_eq!(u, vec![0, 3, 6]);
    for i in 0..3 {
        let st: u8 = g.mem.read_obj(GuestAddress(0x3_0000 + i)).unwrap();
        assert_eq!(st, 0, "request {i} succeeded");
    }
    for head in 0..u64::from(QSIZE) {
        let f: u8 = r.read_obj(GuestAddress(16 + 16 * head)).unwrap();
        assert_eq!(f, 0, "head {head} no longer in flight");
    }
    let used_idx: u16 = r.read_obj(GuestAddress(14)).unwrap();
    assert_eq!(used_idx, 3);
}

#[test]
fn test_fresh_inflight_region_serves_requests_and_stays_clean() {
    let s = Setup::new();
    let g = Guest::new();
    let q = MockSplitQueue::create(&g.mem, GuestAddress(0), QSIZE);
    add_reads(&g, &q);
    let mut fe = Frontend::connect(&s.sock, 1).unwrap();
    negotiate(&mut fe);
    let ask = VhostUserInflight {
        num_queues: 1,
        queue_size: QSIZE,
        ..Default::default()
    };
    let (info, region) = fe.get_inflight_fd(&ask).unwrap();
    fe.set_inflight_fd(&info, region.as_raw_fd()).unwrap();
    let (_call, kick) = start_ring(&mut fe, &g, &q, 0);
    kick.write(1).unwrap();
    let u = wait_used(&g, &q, 3);
    assert_eq!(u, vec![0, 3, 6]);
    let r = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        info.mmap_size as usize,
        Some(FileOffset::new(region, 0)),
    )])
    .unwrap();
    let version: u16 = r.read_obj(GuestAddress(8)).unwrap();
    assert_eq!(version, 1, "the back-end initialised the region");
    let used_idx: u16 = r.read_obj(GuestAddress(14)).unwrap();
    assert_eq!(used_idx, 3);
    // GET_VRING_BASE: every popped chain completed.
    assert_eq!(fe.get_vring_base(0).unwrap(), 3);
}

#[test]
fn test_resize_sends_config_change_on_backend_channel() {
    let s = Setup::new();
    let mut fe = Frontend::connect(&s.sock, 1).unwrap();
    negotiate(&mut fe);
    let (ours, theirs) = UnixStream::pair().unwrap();
    fe.set_backend_request_fd(&theirs).unwrap();
    // A round trip: the messages before it have been handled.
    fe.get_features().unwrap();
    let export = s.export.as_ref().unwrap();
    assert!(!export.resize_notify(), "size unchanged: nothing sent");
    let resizer = BlockBackend::new(s.node.clone(), "resizer", Perm::RESIZE, Perm::ALL).unwrap();
    s.rt.block_on(resizer.truncate(2 * IMG_LEN)).unwrap();
    assert!(export.resize_notify());
    ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hdr = [0u8; 12];
    std::io::Read::read_exact(&mut &ours, &mut hdr).unwrap();
    assert_eq!(u32::from_le_bytes(hdr[0..4].try_into().unwrap()), 2);
    assert_eq!(u32::from_le_bytes(hdr[8..12].try_into().unwrap()), 0);
    let cfg = fe
        .get_config(
            0,
            8,
            vhost::vhost_user::message::VhostUserConfigFlags::empty(),
            &[0; 8],
        )
        .unwrap()
        .1;
    let sectors = u64::from_le_bytes(cfg[..8].try_into().unwrap());
    assert_eq!(sectors, 2 * IMG_LEN / 512);
}
