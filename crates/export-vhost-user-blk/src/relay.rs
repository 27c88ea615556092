//! The vhost-user message relay between the front-end and the backend
//! crate's handler. vhost-user-backend 0.24 refuses GET/SET_INFLIGHT_FD and
//! hides the backend channel (it has no sender for the config-change
//! message), so every message from the front-end passes through here
//! first: those three are answered here, SET_PROTOCOL_FEATURES and
//! SET_VRING_KICK are looked at, and everything else is forwarded
//! unchanged over a private socket to the rust-vmm daemon, whose replies
//! are copied back. Only control messages take this path; requests travel
//! through guest memory and eventfds as before.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vhost::vhost_user::message::{FrontendReq, MAX_ATTACHED_FD_ENTRIES};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::device::BlkDevice;
use crate::inflight::{create_region_file, InflightRegion};
use crate::server::ConnSlot;

/// Bytes of a vhost-user message header: request, flags, payload size.
const HDR_LEN: usize = 12;
/// Largest payload accepted (vhost-user messages are far smaller).
const MAX_PAYLOAD: usize = 4096;
/// Protocol version bits of every message's flags.
const VERSION: u32 = 0x1;
const F_REPLY: u32 = 0x4;
const F_NEED_REPLY: u32 = 0x8;
/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend channel.
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
/// Bytes of `VhostUserInflight` (two u64, two u16, padding).
const INFLIGHT_LEN: usize = 24;
/// SET_VRING_KICK's "no file descriptor: poll" bit.
const VRING_NOFD: u64 = 1 << 8;

fn code(r: FrontendReq) -> u32 {
    r.into()
}

/// One vhost-user message.
#[derive(Debug)]
pub(crate) struct Msg {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Msg {
    fn u64_at(&self, off: usize) -> Option<u64> {
        let b = self.payload.get(off..off + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn u16_at(&self, off: usize) -> Option<u16> {
        let b = self.payload.get(off..off + 2)?;
        Some(u16::from_le_bytes(b.try_into().ok()?))
    }
}

/// recvmsg(2) into `buf`, taking the file descriptors that arrive with it.
// The one unsafe block of the relay: descriptors of guest memory regions,
// the inflight region and eventfds arrive as SCM_RIGHTS messages, and
// neither std (stable) nor vmm-sys-util receive several of them safely.
#[allow(unsafe_code)]
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut raw: [RawFd; MAX_ATTACHED_FD_ENTRIES] = [-1; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    loop {
        // SAFETY: the only iovec covers `buf`, which is exclusively borrowed
        // for the call and may receive any bytes.
        match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
            Ok((n, nfds)) => {
                let fds = raw[..nfds.min(raw.len())]
                    .iter()
                    // SAFETY: recvmsg has just installed these descriptors
                    // in this process; nothing else owns them.
                    .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
                    .collect();
                return Ok((n, fds));
            }
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
}

/// Read one message; `None` when the peer closed the connection between
/// messages. With `fds`, descriptors sent with the header are kept.
pub(crate) fn read_msg(sock: &UnixStream, fds: bool) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; HDR_LEN];
    let (n, files) = if fds {
        recv_with_fds(sock, &mut hdr)?
    } else {
        loop {
            match (&*sock).read(&mut hdr) {
                Ok(n) => break (n, Vec::new()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    };
    if n == 0 {
        return Ok(None);
    }
    (&*sock).read_exact(&mut hdr[n..])?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let size = word(8) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut payload = vec![0; size];
    (&*sock).read_exact(&mut payload)?;
    Ok(Some(Msg {
        request: word(0),
        flags: word(4),
        payload,
        fds: files,
    }))
}

/// Write one message (one sendmsg carrying the descriptors).
pub(crate) fn write_msg(
    sock: &UnixStream,
    request: u32,
    flags: u32,
    payload: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(HDR_LEN + payload.len());
    buf.extend_from_slice(&request.to_le_bytes());
    buf.extend_from_slice(&flags.to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    if fds.is_empty() {
        return (&*sock).write_all(&buf);
    }
    let n = sock
        .send_with_fds(&[&buf[..]], fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    (&*sock).write_all(&buf[n..])
}

/// Send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on a backend channel (no
/// reply asked for, so nothing is read from the channel).
pub(crate) fn send_config_change(chan: &UnixStream) -> io::Result<()> {
    write_msg(chan, BACKEND_CONFIG_CHANGE_MSG, VERSION, &[], &[])
}

/// The relay of one front-end connection.
pub(crate) struct Relay {
    dev: Arc<BlkDevice>,
    slot: Arc<Mutex<ConnSlot>>,
    /// Writes to the front-end: replies copied from the daemon and the
    /// relay's own, one whole message at a time.
    front: Mutex<UnixStream>,
    /// Protocol features the front-end acknowledged.
    acked: AtomicU64,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").finish_non_exhaustive()
    }
}

impl Relay {
    pub(crate) fn new(dev: Arc<BlkDevice>, slot: Arc<Mutex<ConnSlot>>, front: UnixStream) -> Self {
        Relay {
            dev,
            slot,
            front: Mutex::new(front),
            acked: AtomicU64::new(0),
        }
    }

    fn reply(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let front = self.front.lock().unwrap_or_else(PoisonError::into_inner);
        write_msg(&front, request, VERSION | F_REPLY, payload, fds)
    }

    /// Messages from the front-end until it hangs up or breaks the
    /// protocol; then the daemon's side is closed too.
    pub(crate) fn requests(&self, from: &UnixStream, daemon: &UnixStream) {
        loop {
            let m = match read_msg(from, true) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("vhost-user-blk: front-end connection: {e}");
                    break;
                }
            };
            if let Err(e) = self.handle(m, daemon) {
                tracing::warn!("vhost-user-blk: dropping the front-end: {e}");
                break;
            }
        }
        let _ = daemon.shutdown(std::net::Shutdown::Both);
    }

    /// The daemon's replies, copied to the front-end until either side
    /// closes; then the front-end's side is closed too.
    pub(crate) fn replies(&self, daemon: &UnixStream) {
        while let Ok(Some(m)) = read_msg(daemon, false) {
            let front = self.front.lock().unwrap_or_else(PoisonError::into_inner);
            if write_msg(&front, m.request, m.flags, &m.payload, &[]).is_err() {
                break;
            }
        }
        let front = self.front.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = front.shutdown(std::net::Shutdown::Both);
    }

    fn handle(&self, m: Msg, daemon: &UnixStream) -> io::Result<()> {
        match m.request {
            r if r == code(FrontendReq::GET_INFLIGHT_FD) => self.get_inflight_fd(&m),
            r if r == code(FrontendReq::SET_INFLIGHT_FD) => {
                let res = self.set_inflight_fd(&m);
                self.ack(&m, res)
            }
            r if r == code(FrontendReq::SET_BACKEND_REQ_FD) => {
                let res = self.set_backend_req_fd(m.fds.into_iter().next());
                self.ack_code(m.request, m.flags, res)
            }
            r if r == code(FrontendReq::SET_PROTOCOL_FEATURES) => {
                if let Some(f) = m.u64_at(0) {
                    self.acked.store(f, Ordering::Release);
                }
                forward(daemon, &m)
            }
            r if r == code(FrontendReq::SET_VRING_KICK) => self.set_vring_kick(&m, daemon),
            _ => forward(daemon, &m),
        }
    }

    fn reply_ack(&self) -> bool {
        self.acked.load(Ordering::Acquire) & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    fn ack(&self, m: &Msg, res: io::Result<()>) -> io::Result<()> {
        self.ack_code(m.request, m.flags, res)
    }

    /// Answer a message handled here: the REPLY_ACK status when asked for.
    fn ack_code(&self, request: u32, flags: u32, res: io::Result<()>) -> io::Result<()> {
        if let Err(e) = &res {
            tracing::warn!("vhost-user-blk: message {request} failed: {e}");
        }
        if flags & F_NEED_REPLY != 0 && self.reply_ack() {
            let status = u64::from(res.is_err());
            self.reply(request, &status.to_le_bytes(), &[])?;
        }
        Ok(())
    }

    /// GET_INFLIGHT_FD: a fresh region for the front-end to keep. A zero
    /// size tells the front-end there is none.
    fn get_inflight_fd(&self, m: &Msg) -> io::Result<()> {
        let nq = m.u16_at(16).unwrap_or(0);
        let qs = m.u16_at(18).unwrap_or(0);
        let region = if usize::from(nq) <= self.dev.num_queues() {
            create_region_file(nq, qs)
        } else {
            Err(io::Error::other("more queues than the device has"))
        };
        let mut p = [0u8; INFLIGHT_LEN];
        p[16..18].copy_from_slice(&nq.to_le_bytes());
        p[18..20].copy_from_slice(&qs.to_le_bytes());
        match region {
            Ok((file, len)) => {
                p[0..8].copy_from_slice(&len.to_le_bytes());
                self.reply(m.request, &p, &[file.as_raw_fd()])
            }
            Err(e) => {
                tracing::warn!("vhost-user-blk: no inflight region: {e}");
                self.reply(m.request, &p, &[])
            }
        }
    }

    /// SET_INFLIGHT_FD: map the front-end's region and track the queues.
    fn set_inflight_fd(&self, m: &Msg) -> io::Result<()> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, "malformed SET_INFLIGHT_FD");
        let size = m.u64_at(0).ok_or_else(bad)?;
        let offset = m.u64_at(8).ok_or_else(bad)?;
        let nq = m.u16_at(16).ok_or_else(bad)?;
        let qs = m.u16_at(18).ok_or_else(bad)?;
        if usize::from(nq) > self.dev.num_queues() {
            return Err(bad());
        }
        let fd = m
            .fds
            .first()
            .ok_or_else(bad)?
            .try_clone()
            .map(std::fs::File::from)?;
        let region = InflightRegion::map(fd, offset, size, nq, qs)?;
        tracing::debug!("vhost-user-blk: inflight region of {nq} queues x {qs} descriptors");
        self.dev.set_inflight(&region);
        Ok(())
    }

    /// SET_BACKEND_REQ_FD: keep the channel for config-change messages.
    fn set_backend_req_fd(&self, fd: Option<OwnedFd>) -> io::Result<()> {
        let fd = fd.ok_or_else(|| io::Error::other("SET_BACKEND_REQ_FD without a socket"))?;
        let chan = UnixStream::from(fd);
        // A front-end that stops reading must not block the caller forever.
        chan.set_write_timeout(Some(Duration::from_secs(5)))?;
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_backend_channel(chan);
        Ok(())
    }

    /// SET_VRING_KICK: the ring (re)starts. With inflight tracking, the
    /// queue checks its region on its next pass, and that pass is forced
    /// by kicking the ring (the driver may be waiting only for requests
    /// the previous back-end never completed).
    ///
    /// The front-end's kick eventfd stays here: the queue's runtime reads
    /// it, and the backend crate gets a proxy eventfd instead (see `kick`).
    fn set_vring_kick(&self, m: &Msg, daemon: &UnixStream) -> io::Result<()> {
        let arg = m.u64_at(0).unwrap_or(0);
        let index = (arg & 0xff) as usize;
        let kick = if arg & VRING_NOFD == 0 {
            m.fds.first().and_then(|f| f.try_clone().ok())
        } else {
            None
        };
        let tracked = self.dev.ring_starting(index);
        let own = kick
            .as_ref()
            .and_then(|k| k.try_clone().ok())
            .map(|k| self.dev.serve_kicks(index, k));
        match own {
            Some(Ok(proxy)) => {
                write_msg(daemon, m.request, m.flags, &m.payload, &[proxy.as_raw_fd()])?;
            }
            Some(Err(e)) => {
                tracing::warn!(
                    "vhost-user-blk: ring {index}: kicks go through the vring thread: {e}"
                );
                forward(daemon, m)?;
            }
            None => forward(daemon, m)?,
        }
        if let (true, Some(k)) = (tracked, kick) {
            let mut f = std::fs::File::from(k);
            if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
                tracing::debug!("vhost-user-blk: cannot kick ring {index}: {e}");
            }
        }
        Ok(())
    }
}

fn forward(daemon: &UnixStream, m: &Msg) -> io::Result<()> {
    let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    write_msg(daemon, m.request, m.flags, &m.payload, &fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_msg_roundtrip_with_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, _y) = UnixStream::pair().unwrap();
        write_msg(&a, 21, VERSION | F_NEED_REPLY, &[1, 2, 3], &[x.as_raw_fd()]).unwrap();
        let m = read_msg(&b, true).unwrap().unwrap();
        assert_eq!((m.request, m.flags, m.payload), (21, 9, vec![1, 2, 3]));
        assert_eq!(m.fds.len(), 1);
        drop(a);
        assert!(read_msg(&b, true).unwrap().is_none());
    }

    #[test]
    fn test_read_msg_oversized_payload_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&1u32.to_le_bytes());
        hdr.extend_from_slice(&1u32.to_le_bytes());
        hdr.extend_from_slice(&(1u32 << 20).to_le_bytes());
        (&a).write_all(&hdr).unwrap();
        assert!(read_msg(&b, true).is_err());
    }

    #[test]
    fn test_config_change_message_is_header_only() {
        let (a, b) = UnixStream::pair().unwrap();
        send_config_change(&a).unwrap();
        let m = read_msg(&b, false).unwrap().unwrap();
        assert_eq!((m.request, m.flags, m.payload.len()), (2, 1, 0));
    }
}
