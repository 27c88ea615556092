//! Reads: guest ranges to host ranges, the backing file, zeroes, and
//! compressed clusters.

use qsd_block::{BlockStatus, DebugEvent, Error, Result};
use qsd_rt::IoBuf;

use crate::core::{Extent, Qcow2};
use crate::entries::Mapping;

impl Qcow2 {
    /// Refuse requests past the end of the image.
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::invalid(format!(
                "request at offset {offset}, length {len} is past the end of the image ({size})"
            )));
        }
        Ok(())
    }

    /// Fill `buf` with the guest view from `offset`. Bytes past the image
    /// size read as zeroes (copy-on-write of a partial last cluster).
    pub(crate) async fn read_guest(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        let _quiet = self.barrier.read().await;
        let mut pos = 0;
        while pos < len {
            let at = offset + pos;
            if at >= size {
                buf[pos as usize..].fill(0);
                break;
            }
            let ext = self.extent(at, (len - pos).min(size - at)).await?;
            if pos == 0 && ext.len == len {
                return self.read_extent(at, ext, buf).await;
            }
            let part = self
                .read_extent(at, ext, IoBuf::new(ext.len as usize))
                .await?;
            buf[pos as usize..(pos + ext.len) as usize].copy_from_slice(&part);
            pos += ext.len;
        }
        Ok(buf)
    }

    async fn read_extent(&self, at: u64, ext: Extent, mut buf: IoBuf) -> Result<IoBuf> {
        match ext.mapping {
            Mapping::Unallocated => self.read_backing(at, buf).await,
            Mapping::Zero { .. } => {
                buf.zero();
                Ok(buf)
            }
            Mapping::Normal { host, .. } => {
                self.file.debug_event(DebugEvent::ReadAio);
                let mut buf = self.data_node().read(host, buf).await?;
                if let Some(c) = &self.crypto {
                    c.decrypt(host, at, &mut buf)?;
                }
                Ok(buf)
            }
            Mapping::Compressed { host, len } => {
                let cluster = self.read_compressed(host, len).await?;
                let within = (at & (self.cluster_size() - 1)) as usize;
                let n = buf.len();
                buf.copy_from_slice(&cluster[within..within + n]);
                Ok(buf)
            }
        }
    }

    /// The backing file's bytes; past its end, zeroes.
    async fn read_backing(&self, at: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let Some(backing) = &self.backing else {
            buf.zero();
            return Ok(buf);
        };
        let blen = backing.len();
        let n = buf.len() as u64;
        if at >= blen {
            buf.zero();
            Ok(buf)
        } else if at + n <= blen {
            self.file.debug_event(DebugEvent::ReadBackingAio);
            backing.read(at, buf).await
        } else {
            let part = backing.read(at, IoBuf::new((blen - at) as usize)).await?;
            buf[..part.len()].copy_from_slice(&part);
            buf[part.len()..].fill(0);
            Ok(buf)
        }
    }

    /// Read and inflate one compressed cluster.
    async fn read_compressed(&self, host: u64, len: u64) -> Result<Vec<u8>> {
        let flen = self.file.len();
        let avail = flen.saturating_sub(host).min(len);
        if avail == 0 {
            return Err(self.fatal(
                format!("Compressed cluster at {host:#x} is past the end of the image file"),
                host,
                len,
            ));
        }
        self.file.debug_event(DebugEvent::ReadCompressed);
        let input = self.file.read(host, IoBuf::new(avail as usize)).await?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        crate::codec::decompress(self.compression, &input, &mut out).map_err(|e| {
            Error::new(
                qsd_block::ErrorKind::Io,
                format!("Could not decompress cluster at {host:#x}: {e}"),
            )
        })?;
        Ok(out)
    }

    /// Allocation status at `offset` for at most `len` bytes.
    pub(crate) async fn status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(BlockStatus {
                len: 1,
                data: false,
                zero: true,
                allocated: false,
                depth: 0,
            });
        }
        let ext = self.extent(offset, len).await?;
        let own = |data: bool, zero: bool| BlockStatus {
            len: ext.len,
            data,
            zero,
            allocated: true,
            depth: 1,
        };
        Ok(match ext.mapping {
            Mapping::Zero { .. } => own(false, true),
            Mapping::Compressed { .. } => own(true, false),
            // With encryption qemu gives no host offset, so no merge.
            Mapping::Normal { host, .. }
                if self.crypto.is_none() && self.metadata_preallocated().await? =>
            {
                self.merge_file_status(own(true, false), host).await?
            }
            Mapping::Normal { .. } => own(true, false),
            Mapping::Unallocated => self.backing_status(offset, ext.len).await?,
        })
    }

    /// qemu's generic block layer on a data range at a known host offset
    /// of an image with metadata preallocation: the protocol layer's zero
    /// flag is ORed in and the length clamped to its extent; a range that
    /// starts past the end of the file, or a zero extent that reaches it,
    /// reads as zeroes throughout.
    async fn merge_file_status(&self, mut st: BlockStatus, host: u64) -> Result<BlockStatus> {
        let node = self.data_node();
        let flen = node.len();
        if host >= flen {
            st.zero = true;
            return Ok(st);
        }
        let fs = node.block_status(host, st.len.min(flen - host)).await?;
        let flen_now = node.len();
        if fs.zero && host + fs.len >= flen_now {
            st.zero = true;
        } else {
            st.len = fs.len.clamp(1, st.len);
            st.zero |= fs.zero;
        }
        Ok(st)
    }

    /// qemu's metadata preallocation heuristic, decided on the first
    /// status query: clearly more clusters have a refcount than the image
    /// file has allocated (`MAX(real * 10 / 9, real + 2)` of them). Only
    /// then do status queries look at the file below.
    async fn metadata_preallocated(&self) -> Result<bool> {
        use std::sync::atomic::Ordering;
        match self.prealloc.load(Ordering::Acquire) {
            1 => return Ok(false),
            2 => return Ok(true),
            _ => {}
        }
        let Some(real) = self.file.driver().image_info().actual_size else {
            self.prealloc.store(1, Ordering::Release);
            return Ok(false);
        };
        let real_clusters = real >> self.cluster_bits();
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end = self.file.len().div_ceil(self.cluster_size());
        let mut count = 0;
        {
            let mut m = self.meta.lock().await;
            let mut c = 0;
            while c < end && count < threshold {
                if self.refcount_of(&mut m, c).await? != 0 {
                    count += 1;
                }
                c += 1;
            }
        }
        let yes = count >= threshold;
        self.prealloc
            .store(if yes { 2 } else { 1 }, Ordering::Release);
        Ok(yes)
    }

    async fn backing_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let hole = |len| BlockStatus {
            len,
            data: false,
            zero: true,
            allocated: false,
            depth: 0,
        };
        let Some(backing) = &self.backing else {
            return Ok(hole(len));
        };
        let blen = backing.len();
        if offset >= blen {
            return Ok(hole(len));
        }
        let mut st = backing.block_status(offset, len.min(blen - offset)).await?;
        st.allocated = false;
        if st.depth > 0 {
            st.depth += 1;
        }
        Ok(st)
    }
}
