//! Compressed writes (`WriteFlags::compress`, qemu's compressed write
//! request): each guest cluster is deflated on its own and its data packed
//! byte-granular after the previous compressed cluster, so several share a
//! host cluster (each host cluster a compressed cluster touches holds one
//! reference for it, as the specification asks).

use std::sync::atomic::Ordering;

use qsd_block::{Error, ErrorKind, Result, WriteFlags};
use qsd_rt::IoBuf;

use crate::core::Qcow2;
use crate::entries::OFFSET_MASK;

impl Qcow2 {
    /// Write `buf` compressed at `offset` (as `write` with
    /// `WriteFlags::compress`). Rules as qemu's qcow2: `offset` is cluster
    /// aligned and the length a multiple of the cluster size unless the
    /// request ends at the image's end (else EINVAL); every cluster written
    /// must be unallocated (else EIO); a cluster that does not shrink is
    /// stored uncompressed. An empty request rounds the image file up to
    /// whole sectors (what qemu-img does after the last compressed write).
    pub async fn write_compressed(&self, offset: u64, buf: IoBuf) -> Result<()> {
        self.write_compressed_range(offset, buf, WriteFlags::default())
            .await
            .map(|_| ())
    }

    pub(crate) async fn write_compressed_range(
        &self,
        offset: u64,
        buf: IoBuf,
        flags: WriteFlags,
    ) -> Result<IoBuf> {
        self.check_not_corrupt()?;
        let cs = self.cluster_size();
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if self.data_file.is_some() {
            return Err(Error::unsupported(
                "Compression is not supported with an external data file",
            ));
        }
        if self.crypto.is_some() {
            return Err(Error::unsupported(
                "Compression and encryption not supported at the same time",
            ));
        }
        if len == 0 {
            self.align_file_end().await?;
            return Ok(buf);
        }
        let size = self.size.load(Ordering::Acquire);
        if !offset.is_multiple_of(cs) {
            return Err(Error::invalid(format!(
                "Compressed write at offset {offset} is not cluster aligned"
            )));
        }
        if !len.is_multiple_of(cs) && offset + len != size {
            return Err(Error::invalid(format!(
                "Compressed write of {len} bytes at offset {offset} does not cover whole clusters"
            )));
        }
        for (i, chunk) in buf.chunks(cs as usize).enumerate() {
            self.write_one_compressed(offset + i as u64 * cs, chunk)
                .await?;
        }
        if flags.fua {
            self.flush_all().await?;
        }
        Ok(buf)
    }

    /// Compress one guest cluster (`data` shorter only for the image's last,
    /// partial cluster) into freshly allocated bytes.
    async fn write_one_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let mut full = vec![0u8; cs as usize];
        full[..data.len()].copy_from_slice(data);
        let packed = crate::codec::compress(self.compression, &full, (cs - 1) as usize)
            .map_err(|e| Error::invalid(format!("Could not compress cluster: {e}")))?;
        let Some(packed) = packed else {
            // As qemu: incompressible data is written the ordinary way.
            let buf = IoBuf::from_slice(data);
            self.write_plain(offset, buf, WriteFlags::default()).await?;
            return Ok(());
        };
        let c = offset >> self.cluster_bits();
        let _claim = self.claim(c, c + 1).await;
        let (old, _) = self.entry_async(c).await?;
        if old & OFFSET_MASK != 0 {
            // qemu never overwrites with compressed data: EIO.
            return Err(Error::new(
                ErrorKind::Io,
                format!("Compressed write to allocated cluster at guest offset {offset:#x}"),
            ));
        }
        let clen = packed.len() as u64;
        let host = {
            let mut m = self.meta.lock().await;
            let h = self.alloc_bytes(&mut m, clen).await?;
            self.check_overlap(&m, h, clen, 0)?;
            h
        };
        let entry = crate::compress::make_descriptor(host, clen, self.cluster_bits())
            .map_err(|e| Error::invalid(format!("Cannot store compressed cluster: {e}")))?;
        self.file
            .debug_event(qsd_block::DebugEvent::WriteCompressed);
        self.file
            .write(host, IoBuf::from_slice(&packed), WriteFlags::default())
            .await?;
        let mut m = self.meta.lock().await;
        self.set_l2(&mut m, c, entry, 0, self.pass_discard_other)
            .await?;
        self.maybe_writeback(&mut m).await
    }

    /// Round the image file up to whole sectors, so the last compressed
    /// cluster can be read with sector-granular I/O: as qemu, truncate it
    /// to its length, which is counted in whole sectors.
    async fn align_file_end(&self) -> Result<()> {
        self.file.truncate(self.file.len()).await
    }
}
