//! Test helpers: an in-memory export on a separate I/O thread, and a small
//! NBD client written against the codec.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qsd_block::mem::MemDriver;
use qsd_block::{BlockBackend, CommonOptions, Node, Perm};
use qsd_export_nbd::{ExportOptions, ListenAddr, NbdExport, NbdServer, ServerOptions};
use qsd_nbd_proto::handshake::{decode_greeting, OptionReplyHeader};
use qsd_nbd_proto::transmission::{ChunkHeader, ReplyHeader};
use qsd_nbd_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::runtime::Handle;

pub const SIZE: u64 = 4 << 20;

/// A current-thread runtime on its own thread, like a qsd I/O thread.
pub fn io_thread() -> Handle {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tx.send(rt.handle().clone()).unwrap();
        rt.block_on(std::future::pending::<()>());
    });
    rx.recv().unwrap()
}

pub fn backend(size: u64) -> BlockBackend {
    let opts = CommonOptions {
        discard_unmap: true,
        ..CommonOptions::default()
    };
    let node = Node::new(
        "n0".into(),
        false,
        opts,
        Box::new(MemDriver::new(size)),
        vec![],
    );
    BlockBackend::new(node, "export 'e'", Perm::ALL, Perm::ALL).unwrap()
}

pub struct Fixture {
    pub server: NbdServer,
    pub path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub async fn new(opts: ServerOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let server = NbdServer::new(opts);
        server.start(ListenAddr::Unix(path.clone())).await.unwrap();
        Fixture { server, path, dir }
    }

    fn opts(name: &str, writable: bool, io: &Handle) -> ExportOptions {
        ExportOptions {
            name: name.into(),
            description: Some(format!("{name} disk")),
            writable,
            backend: backend(SIZE),
            io: io.clone(),
            allocation_depth: true,
        }
    }

    pub fn add(&self, name: &str, writable: bool, io: &Handle) -> Arc<NbdExport> {
        self.server
            .add_export(Self::opts(name, writable, io))
            .unwrap()
    }

    pub fn add_err(&self, name: &str, io: &Handle) -> qsd_export_nbd::Error {
        self.server
            .add_export(Self::opts(name, true, io))
            .unwrap_err()
    }
}

/// A reply as the test client sees it.
#[derive(Debug, Default)]
pub struct Reply {
    pub error: u32,
    pub data: Vec<u8>,
    /// Structured chunks: (type, offset or context id, payload).
    pub chunks: Vec<(ChunkType, Vec<u8>)>,
}

pub struct Client {
    pub s: UnixStream,
    pub size: u64,
    pub flags: TransmissionFlags,
    pub structured: bool,
}

impl Client {
    pub async fn connect(path: &Path) -> UnixStream {
        let mut s = UnixStream::connect(path).await.unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        assert!(decode_greeting(&g).unwrap().done().is_some());
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        s
    }

    pub async fn send_option(s: &mut UnixStream, o: &ClientOption) {
        let mut v = Vec::new();
        o.encode(&mut v);
        s.write_all(&v).await.unwrap();
    }

    pub async fn option_reply(s: &mut UnixStream) -> (OptionReplyType, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        let (h, _) = OptionReplyHeader::decode(&h).unwrap().done().unwrap();
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data).await.unwrap();
        (h.reply, data)
    }

    /// Read replies up to the final one of an option.
    pub async fn option_replies(s: &mut UnixStream) -> Vec<(OptionReplyType, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = Self::option_reply(s).await;
            let last = r.0 == OptionReplyType::Ack || r.0.is_error();
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Handshake with GO; optionally structured replies and meta contexts.
    pub async fn open(path: &Path, export: &str, structured: bool, meta: &[&str]) -> Client {
        let mut s = Self::connect(path).await;
        if structured {
            Self::send_option(&mut s, &ClientOption::StructuredReply).await;
            assert_eq!(Self::option_reply(&mut s).await.0, OptionReplyType::Ack);
        }
        if !meta.is_empty() {
            let q = handshake::MetaRequest {
                export: export.into(),
                queries: meta.iter().map(|m| m.to_string()).collect(),
            };
            Self::send_option(&mut s, &ClientOption::SetMetaContext(q)).await;
            let r = Self::option_replies(&mut s).await;
            assert_eq!(r.last().unwrap().0, OptionReplyType::Ack);
        }
        let go = handshake::InfoRequest {
            name: export.into(),
            requests: vec![InfoType::BlockSize],
        };
        Self::send_option(&mut s, &ClientOption::Go(go)).await;
        let replies = Self::option_replies(&mut s).await;
        assert_eq!(
            replies.last().unwrap().0,
            OptionReplyType::Ack,
            "{replies:?}"
        );
        let export_info = replies
            .iter()
            .find(|(t, d)| *t == OptionReplyType::Info && d[..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let d = &export_info.1;
        let size = u64::from_be_bytes(d[2..10].try_into().unwrap());
        let flags = TransmissionFlags(u16::from_be_bytes([d[10], d[11]]));
        Client {
            s,
            size,
            flags,
            structured,
        }
    }

    pub async fn send(
        &mut self,
        command: CommandType,
        flags: CommandFlags,
        cookie: u64,
        offset: u64,
        length: u32,
        data: &[u8],
    ) {
        let mut v = Vec::new();
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(&mut v);
        v.extend_from_slice(data);
        self.s.write_all(&v).await.unwrap();
    }

    /// Read one complete reply (for a read, `read_len` is the simple-reply payload).
    pub async fn reply(&mut self, read_len: usize) -> (u64, Reply) {
        let mut r = Reply::default();
        loop {
            let mut m = [0u8; 4];
            self.s.read_exact(&mut m).await.unwrap();
            let magic = u32::from_be_bytes(m);
            let rest = if magic == SIMPLE_REPLY_MAGIC { 12 } else { 16 };
            let mut h = m.to_vec();
            h.resize(4 + rest, 0);
            self.s.read_exact(&mut h[4..]).await.unwrap();
            match ReplyHeader::decode(&h).unwrap().done().unwrap().0 {
                ReplyHeader::Simple(sr) => {
                    r.error = sr.error;
                    if sr.error == 0 && read_len > 0 {
                        r.data = vec![0; read_len];
                        self.s.read_exact(&mut r.data).await.unwrap();
                    }
                    return (sr.cookie, r);
                }
                ReplyHeader::Chunk(ChunkHeader {
                    flags,
                    kind,
                    cookie,
                    len,
                }) => {
                    let mut p = vec![0u8; len as usize];
                    self.s.read_exact(&mut p).await.unwrap();
                    if matches!(kind, ChunkType::Error | ChunkType::ErrorOffset) {
                        r.error = u32::from_be_bytes(p[..4].try_into().unwrap());
                    }
                    r.chunks.push((kind, p));
                    if flags.contains(ReplyFlags::DONE) {
                        return (cookie, r);
                    }
                }
            }
        }
    }

    pub async fn call(
        &mut self,
        command: CommandType,
        flags: CommandFlags,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Reply {
        self.send(command, flags, 77, offset, length, data).await;
        let read_len = if command == CommandType::Read {
            length as usize
        } else {
            0
        };
        let (cookie, r) = self.reply(read_len).await;
        assert_eq!(cookie, 77);
        r
    }

    /// Assemble a structured read reply into bytes of the requested range.
    pub fn assemble(r: &Reply, offset: u64, length: u32) -> Vec<u8> {
        if !r.data.is_empty() {
            return r.data.clone();
        }
        let mut out = vec![0xeeu8; length as usize];
        for (kind, p) in &r.chunks {
            let off = u64::from_be_bytes(p[..8].try_into().unwrap_or([0; 8]));
            match kind {
                ChunkType::OffsetData => {
                    let at = (off - offset) as usize;
                    out[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                }
                ChunkType::OffsetHole => {
                    let at = (off - offset) as usize;
                    let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                    out[at..at + n].fill(0);
                }
                _ => {}
            }
        }
        out
    }
}
