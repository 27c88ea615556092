//! Entry points for the fuzz targets in `fuzz/` (not a stable API): each
//! feeds untrusted bytes to one of the crate's internal parsers the way the
//! device does, and reports what came out so the target can check it.
//!
//! - [`chain`]: a guest memory image and a ring position through
//!   `walk_chain`, `Chain::from_descriptors` and the request executor.
//! - [`inflight`]: an inflight region's bytes through `InflightRegion::map`
//!   and the recovery of each queue.
//! - [`relay_msgs`]: a front-end byte stream through the relay's `read_msg`.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use qsd_block::BlockBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::inflight::{create_region_file, queue_region_len, InflightRegion};
use crate::relay::{read_msg, write_msg};
use crate::request::{execute, walk_chain, Chain, ReqCtx};

/// Guest memory of [`chain`]: (guest address, bytes). The first two are
/// adjacent in guest-physical space but separate host mappings; the third
/// lies after a hole.
pub const REGIONS: [(u64, usize); 3] = [(0, 0x2000), (0x2000, 0x1000), (0x5000, 0x1000)];

/// Where the memory image of a [`chain`] input goes, piece by piece: the
/// first 4 KiB reach every region, so short inputs can place data anywhere.
const IMAGE_PIECES: [(u64, usize); 6] = [
    (0, 0x800),
    (0x2000, 0x400),
    (0x5000, 0x400),
    (0x800, 0x1800),
    (0x2400, 0xc00),
    (0x5400, 0xc00),
];

/// Bytes of the control header of a [`chain`] input.
pub const CHAIN_HDR: usize = 8;

/// What [`chain`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChainOutcome {
    /// Descriptors `walk_chain` returned, as (addr, len, flags, next).
    pub walked: Option<Vec<(u64, u32, u16, u16)>>,
    /// `Chain::from_descriptors` accepted them: (readable, writable) counts.
    pub parsed: Option<(usize, usize)>,
    /// Bytes of the writable segments.
    pub writable_bytes: u64,
    /// The executor's (status, bytes written excluding the status byte).
    pub result: Option<(u8, u32)>,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Guest memory laid out as [`REGIONS`], filled from `image`.
fn guest_memory(image: &[u8]) -> io::Result<GuestMemoryMmap<()>> {
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(io::Error::other)?;
    let mut rest = image;
    for &(addr, max) in &IMAGE_PIECES {
        let n = rest.len().min(max);
        mem.write_slice(&rest[..n], GuestAddress(addr))
            .map_err(io::Error::other)?;
        rest = &rest[n..];
    }
    Ok(mem)
}

/// One descriptor chain, as a resubmitted request takes it: walk it from
/// the ring's table, parse it, run it against `backend` and write the
/// status byte. The input is a control header of [`CHAIN_HDR`] bytes —
/// table address (u16 LE), queue size (u16 LE), head (u16 LE), flags
/// (bit 0 writable export, bit 1 write cache on, bits 2-4 logical block
/// size 512 << n), one spare byte — then the memory image.
pub async fn chain(backend: &BlockBackend, data: &[u8]) -> io::Result<ChainOutcome> {
    if data.len() < CHAIN_HDR {
        return Ok(ChainOutcome::default());
    }
    let (table, size, head, flags) = (le16(data, 0), le16(data, 2), le16(data, 4), data[6]);
    let mem = Arc::new(guest_memory(&data[CHAIN_HDR..])?);
    let mut out = ChainOutcome::default();
    let Ok(descs) = walk_chain(&*mem, GuestAddress(u64::from(table)), size, head) else {
        return Ok(out);
    };
    out.walked = Some(
        descs
            .iter()
            .map(|d| (d.addr().0, d.len(), d.flags(), d.next()))
            .collect(),
    );
    let Ok(parsed) = Chain::from_descriptors(descs.into_iter()) else {
        return Ok(out);
    };
    out.parsed = Some((parsed.readable.len(), parsed.writable.len()));
    out.writable_bytes = parsed.writable.iter().map(|s| u64::from(s.len)).sum();
    let ctx = ReqCtx {
        backend: backend.clone(),
        writable: flags & 1 != 0,
        blk_size: 512 << ((flags >> 2) & 7).min(6),
        serial: crate::DEFAULT_SERIAL.as_bytes().to_vec(),
        pool: Default::default(),
    };
    let (status, n) = execute(&ctx, &mem, &parsed, flags & 2 != 0).await;
    if let Some(a) = parsed.status_addr() {
        // As the device: a status byte outside guest memory is not written.
        let _ = mem.write_obj(status, a);
    }
    out.result = Some((status, n));
    Ok(out)
}

/// Bytes of the control header of an [`inflight`] input.
pub const INFLIGHT_HDR: usize = 8;

/// One queue's recovery, as [`inflight`] reports it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryView {
    /// `None` for a fresh region.
    pub last_avail: Option<u16>,
    /// Heads to resubmit, oldest first.
    pub resubmit: Vec<u16>,
    /// Counter of the next chain popped.
    pub next_counter: u64,
}

/// What [`inflight`] found for one queue.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InflightOutcome {
    /// The ring's used index the queue started with.
    pub used_idx: u16,
    /// Recovery when the ring starts.
    pub first: RecoveryView,
    /// Recovery again at once (a second restart before any progress).
    pub again: RecoveryView,
    /// After the resubmitted chains complete in order, recovery at the new
    /// used index; only when `first` was not a fresh region.
    pub after_completion: Option<RecoveryView>,
}

fn view(r: crate::inflight::Recovery) -> RecoveryView {
    RecoveryView {
        last_avail: r.last_avail,
        resubmit: r.resubmit,
        next_counter: r.next_counter,
    }
}

/// An inflight region a front-end hands over (SET_INFLIGHT_FD), mapped and
/// recovered queue by queue. The input is a control header of
/// [`INFLIGHT_HDR`] bytes — queue count (u8), queue size (u16 LE), used
/// index (u16 LE), size slack (u8: the mapping is that many 64-byte units
/// longer than the queues need), flags (bit 0 map from file offset 4096,
/// bit 1 the file ends where the data ends instead of covering the
/// mapping), one spare byte — then the region's bytes. `None` when the
/// mapping is refused.
pub fn inflight(data: &[u8]) -> io::Result<Option<Vec<InflightOutcome>>> {
    if data.len() < INFLIGHT_HDR {
        return Ok(None);
    }
    let nq = u16::from(data[0]);
    let (qs, used) = (le16(data, 1), le16(data, 3));
    let (slack, flags) = (u64::from(data[5]), data[6]);
    let bytes = &data[INFLIGHT_HDR..];
    let need = queue_region_len(qs.max(1)) * u64::from(nq.max(1));
    let size = need + 64 * slack;
    let offset = if flags & 1 != 0 { 4096 } else { 0 };
    let (file, _) = create_region_file(1, 1)?;
    let data_end = offset + bytes.len() as u64;
    file.set_len(if flags & 2 != 0 {
        data_end
    } else {
        data_end.max(offset + size)
    })?;
    file.write_all_at(bytes, offset)?;
    let Ok(region) = InflightRegion::map(file, offset, size, nq, qs) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for q in 0..nq {
        let Some(queue) = region.queue(q) else {
            continue;
        };
        let used = used.wrapping_add(q);
        let first = view(queue.recover(used));
        let again = view(queue.recover(used));
        let after_completion = first.last_avail.map(|_| {
            // The resubmitted chains complete oldest first, as the device
            // puts them on the used ring.
            let mut idx = used;
            for &h in &first.resubmit {
                queue.pre_put(h);
                idx = idx.wrapping_add(1);
                queue.post_put(h, idx);
            }
            view(queue.recover(idx))
        });
        out.push(InflightOutcome {
            used_idx: used,
            first,
            again,
            after_completion,
        });
    }
    Ok(Some(out))
}

/// One message as [`relay_msgs`] reports it: request, flags, payload,
/// number of descriptors received with it.
pub type RawMsg = (u32, u32, Vec<u8>, usize);

/// Largest input [`relay_msgs`] sends (it must fit the socket buffer).
pub const RELAY_MAX_INPUT: usize = 64 << 10;

/// A front-end's byte stream through the relay's message reader. The first
/// byte is control (bit 0 read with descriptors as from the front-end,
/// bit 1 attach a descriptor to the first piece, bits 2-7 piece size, 0
/// for one write); the rest is sent, then the sender hangs up. Returns the
/// messages read and the error that ended reading, if any.
pub fn relay_msgs(data: &[u8]) -> io::Result<(Vec<RawMsg>, Option<io::Error>)> {
    let Some((&ctl, stream)) = data.split_first() else {
        return Ok((Vec::new(), None));
    };
    let stream = &stream[..stream.len().min(RELAY_MAX_INPUT)];
    // The descriptor attached: not the sending socket itself, whose copy in
    // flight would keep the stream open after the sender hangs up.
    let (attached, _peer) = UnixStream::pair()?;
    let piece = match usize::from(ctl >> 2) {
        0 => stream.len().max(1),
        n => n,
    };
    let send = |a: &UnixStream| -> io::Result<()> {
        for (i, chunk) in stream.chunks(piece).enumerate() {
            if i == 0 && ctl & 2 != 0 {
                let n = a
                    .send_with_fds(&[chunk], &[attached.as_raw_fd()])
                    .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
                (&*a).write_all(&chunk[n..])?;
            } else {
                (&*a).write_all(chunk)?;
            }
        }
        Ok(())
    };
    let receive = |b: &UnixStream| {
        let mut msgs = Vec::new();
        loop {
            match read_msg(b, ctl & 1 != 0) {
                Ok(Some(m)) => msgs.push((m.request, m.flags, m.payload, m.fds.len())),
                Ok(None) => return (msgs, None),
                Err(e) => return (msgs, Some(e)),
            }
        }
    };
    pump(send, receive)
}

/// Run `send` on one end of a fresh socket pair (then hang up) while
/// `receive` reads the other end: many small writes overflow the socket's
/// buffer long before their bytes do. Whatever `receive` leaves unread is
/// drained so that the sender never blocks or meets a closed socket.
fn pump<R>(
    send: impl FnOnce(&UnixStream) -> io::Result<()> + Send,
    receive: impl FnOnce(&UnixStream) -> R,
) -> io::Result<R> {
    let (a, b) = UnixStream::pair()?;
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || send(&a));
        let out = receive(&b);
        io::copy(&mut &b, &mut io::sink())?;
        sender
            .join()
            .map_err(|_| io::Error::other("sender panicked"))??;
        Ok(out)
    })
}

/// The bytes `write_msg` sends for `msgs` (without descriptors).
pub fn encode_msgs(msgs: &[RawMsg]) -> io::Result<Vec<u8>> {
    let send = |a: &UnixStream| {
        msgs.iter().try_for_each(|(request, flags, payload, _)| {
            write_msg(a, *request, *flags, payload, &[])
        })
    };
    let receive = |b: &UnixStream| {
        let mut out = Vec::new();
        (&*b).read_to_end(&mut out).map(|_| out)
    };
    pump(send, receive)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_relay_msgs_roundtrip_two_messages() {
        let mut s = vec![0u8];
        for (req, payload) in [(1u32, &[][..]), (21, &[7u8; 5][..])] {
            s.extend_from_slice(&req.to_le_bytes());
            s.extend_from_slice(&1u32.to_le_bytes());
            s.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            s.extend_from_slice(payload);
        }
        let (msgs, err) = relay_msgs(&s).unwrap();
        assert!(err.is_none());
        assert_eq!(msgs.len(), 2);
        assert_eq!(encode_msgs(&msgs).unwrap(), s[1..]);
    }

    #[test]
    fn test_inflight_fresh_region_recovers_nothing() {
        let mut d = vec![1u8, 16, 0, 5, 0, 0, 0, 0];
        d.extend_from_slice(&[0u8; 64 * 5]);
        let out = inflight(&d).unwrap().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].first, RecoveryView::default());
        assert_eq!(out[0].again.last_avail, Some(5));
    }
}
