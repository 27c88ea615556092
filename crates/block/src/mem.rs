//! An in-memory driver: a test double shared by every crate's tests, and a
//! reference model for data checks. Holes are tracked per 4 KiB page.

use std::sync::Mutex;

use qsd_rt::IoBuf;

use crate::driver::{BlockDriver, BlockStatus, BoxFut, ImageInfo, WriteFlags, ZeroFlags};
use crate::{Error, Result};

const PAGE: u64 = 4096;

/// A RAM-backed block device.
#[derive(Debug)]
pub struct MemDriver {
    pages: Mutex<Vec<Option<Box<[u8]>>>>,
    size: u64,
}

impl MemDriver {
    /// A device of `size` bytes that reads as zeroes.
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(PAGE) as usize;
        MemDriver {
            pages: Mutex::new(vec![None; n]),
            size,
        }
    }

    fn pages(&self) -> std::sync::MutexGuard<'_, Vec<Option<Box<[u8]>>>> {
        match self.pages.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::invalid(format!(
                "request {offset}+{len} is beyond the end"
            )));
        }
        Ok(())
    }

    fn copy_out(&self, offset: u64, out: &mut [u8]) {
        let pages = self.pages();
        for (i, byte) in out.iter_mut().enumerate() {
            let pos = offset + i as u64;
            *byte = pages[(pos / PAGE) as usize]
                .as_ref()
                .map_or(0, |p| p[(pos % PAGE) as usize]);
        }
    }

    fn copy_in(&self, offset: u64, data: &[u8]) {
        let mut pages = self.pages();
        for (i, byte) in data.iter().enumerate() {
            let pos = offset + i as u64;
            let page = pages[(pos / PAGE) as usize]
                .get_or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            page[(pos % PAGE) as usize] = *byte;
        }
    }

    fn punch(&self, offset: u64, len: u64) {
        let first_full = offset.div_ceil(PAGE);
        let end_full = (offset + len) / PAGE;
        self.copy_in(offset, &vec![0; len as usize]);
        let mut pages = self.pages();
        for p in first_full..end_full {
            pages[p as usize] = None;
        }
    }
}

impl BlockDriver for MemDriver {
    fn driver_name(&self) -> &'static str {
        "x-mem"
    }

    fn len(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, mut buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            self.check(offset, buf.len() as u64)?;
            self.copy_out(offset, &mut buf);
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            self.check(offset, buf.len() as u64)?;
            self.copy_in(offset, &buf);
            Ok(buf)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.check(offset, len)?;
            self.punch(offset, len);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFut<'_, ()> {
        self.write_zeroes(offset, len, ZeroFlags::default())
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFut<'_, BlockStatus> {
        Box::pin(async move {
            self.check(offset, len)?;
            let pages = self.pages();
            let allocated = |pos: u64| pages[(pos / PAGE) as usize].is_some();
            let first = allocated(offset);
            let mut end = (offset / PAGE + 1) * PAGE;
            while end < offset + len && allocated(end) == first {
                end += PAGE;
            }
            let n = end.min(offset + len) - offset;
            Ok(if first {
                BlockStatus::data(n)
            } else {
                BlockStatus::hole(n)
            })
        })
    }

    fn image_info(&self) -> ImageInfo {
        ImageInfo {
            filename: "x-mem://".into(),
            ..ImageInfo::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_mem_write_then_read_returns_data_and_status() {
        let m = MemDriver::new(3 * PAGE);
        m.write(PAGE + 10, IoBuf::from_slice(b"abc"), WriteFlags::default())
            .await
            .unwrap();
        let got = m.read(PAGE + 9, IoBuf::new(5)).await.unwrap();
        assert_eq!(&got[..], b"\0abc\0");
        assert_eq!(
            m.block_status(0, 3 * PAGE).await.unwrap(),
            BlockStatus::hole(PAGE)
        );
        assert_eq!(
            m.block_status(PAGE, 2 * PAGE).await.unwrap(),
            BlockStatus::data(PAGE)
        );
    }
}
