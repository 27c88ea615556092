//! The `compress` filter: every write through it reaches its `file` child
//! as a compressed write (`WriteFlags::compress`). The child must be a
//! format that can compress (qcow2); requests are padded to the child's
//! cluster size, as qemu sets the filter's request alignment to it.

use qsd_block::perm::UserDesc;
use qsd_block::{
    BlockDriver, BoxFut, DriverFactory, Error, ImageInfo, Limits, NodeRef, OpenCtx, Perm, PermUser,
    Result, WriteFlags,
};
use qsd_rt::IoBuf;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::jsonname::{json_filename, node_options};

/// BlockdevOptionsGenericFormat without `file` (taken out as a child first).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompressOpts {}

/// Factory for `compress`.
#[derive(Debug, Default)]
pub struct CompressFactory;

impl DriverFactory for CompressFactory {
    fn name(&self) -> &'static str {
        "compress"
    }

    fn open<'a>(
        &'a self,
        ctx: &'a mut OpenCtx<'_>,
        mut opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            let child = ctx.required_child(&mut opts, "file").await?;
            let _: CompressOpts = ctx.parse(opts)?;
            let d = CompressDriver::new(child, ctx.node_name())?;
            Ok(Box::new(d) as Box<dyn BlockDriver>)
        })
    }
}

/// A `compress` node over its `file` child.
#[derive(Debug)]
pub struct CompressDriver {
    child: NodeRef,
    user: PermUser,
    /// The child's cluster size (the request alignment; 1 if it has none).
    cluster: u64,
}

impl CompressDriver {
    fn new(child: NodeRef, node_name: &str) -> Result<Self> {
        let driver = child.driver();
        if !driver.can_compress() {
            return Err(Error::unsupported(format!(
                "Compression is not supported for underlying format: {}",
                driver.driver_name()
            )));
        }
        let cluster = driver
            .image_info()
            .cluster_size
            .filter(|c| c.is_power_of_two() && *c <= u64::from(u32::MAX))
            .unwrap_or(1);
        let desc = UserDesc {
            who: format!("node '{node_name}'"),
            role: "file".into(),
        };
        // A filter takes nothing until its parents do.
        let user = child.add_user(desc, Perm::NONE, Perm::ALL)?;
        Ok(CompressDriver {
            child,
            user,
            cluster,
        })
    }
}

impl BlockDriver for CompressDriver {
    fn driver_name(&self) -> &'static str {
        "compress"
    }

    qsd_block::forward_to_child!(child: len, read, write_zeroes, discard, flush, block_status, truncate);

    fn limits(&self) -> Limits {
        let child = self.child.driver().limits();
        Limits {
            request_alignment: u32::try_from(self.cluster)
                .unwrap_or(1)
                .max(child.request_alignment),
            ..child
        }
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        let flags = WriteFlags {
            compress: true,
            ..flags
        };
        Box::pin(self.child.write(offset, buf, flags))
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        // qemu's generic check: writes are padded to the alignment, which a
        // partial last cluster could only take by growing the image.
        if perm.contains(Perm::WRITE)
            && !perm.contains(Perm::RESIZE)
            && !self.len().is_multiple_of(self.cluster)
        {
            return Err(Error::new(
                qsd_block::ErrorKind::PermissionConflict,
                "Cannot get 'write' permission without 'resize': Image size is not a multiple \
                 of request alignment",
            ));
        }
        self.user.update(perm, shared)
    }

    fn image_info(&self) -> ImageInfo {
        let child = self.child.driver().image_info();
        let mut m = Map::new();
        m.insert("driver".into(), "compress".into());
        m.insert("file".into(), node_options(&self.child));
        // As qemu: the filter's own name, the child's cluster facts.
        ImageInfo {
            filename: json_filename(&m),
            actual_size: child.actual_size,
            cluster_size: child.cluster_size,
            dirty_flag: child.dirty_flag,
            ..ImageInfo::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use qsd_block::mem::MemDriver;
    use qsd_block::ErrorKind;
    use serde_json::json;

    use super::*;
    use crate::tests::{add, backend, filled, graph, image, path_str};

    /// Writes that reached the fake compressing child: (offset, len, flags).
    type Log = Arc<Mutex<Vec<(u64, usize, WriteFlags)>>>;

    /// A RAM device that claims to compress, with 64 KiB clusters.
    #[derive(Debug)]
    struct FakeCompressing {
        mem: MemDriver,
        log: Log,
    }

    impl BlockDriver for FakeCompressing {
        fn driver_name(&self) -> &'static str {
            "fakecomp"
        }
        fn len(&self) -> u64 {
            self.mem.len()
        }
        fn can_compress(&self) -> bool {
            true
        }
        fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
            self.mem.read(offset, buf)
        }
        fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
            self.log.lock().unwrap().push((offset, buf.len(), flags));
            self.mem.write(offset, buf, flags)
        }
        fn flush(&self) -> BoxFut<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn image_info(&self) -> ImageInfo {
            ImageInfo {
                filename: "fake".into(),
                cluster_size: Some(65536),
                ..ImageInfo::default()
            }
        }
    }

    #[derive(Debug)]
    struct FakeFactory(Log);

    impl DriverFactory for FakeFactory {
        fn name(&self) -> &'static str {
            // A name the schema accepts; qcow2 itself is not in this crate.
            "qcow2"
        }
        fn open<'a>(
            &'a self,
            _ctx: &'a mut OpenCtx<'_>,
            opts: Map<String, Value>,
        ) -> BoxFut<'a, Box<dyn BlockDriver>> {
            let size = opts.get("size").and_then(Value::as_u64).unwrap_or(1 << 20);
            let log = self.0.clone();
            Box::pin(async move {
                let d = FakeCompressing {
                    mem: MemDriver::new(size),
                    log,
                };
                Ok(Box::new(d) as Box<dyn BlockDriver>)
            })
        }
    }

    fn fake_graph() -> (qsd_block::Graph, Log) {
        let log = Log::default();
        let mut g = graph();
        g.register(Arc::new(FakeFactory(log.clone())));
        (g, log)
    }

    #[tokio::test]
    async fn test_compress_over_file_or_raw_is_refused() {
        let (_dir, path) = image(1 << 20);
        let mut g = graph();
        let file = json!({"driver": "file", "filename": path_str(&path)});
        let e = add(
            &mut g,
            json!({"driver": "compress", "node-name": "c", "file": file.clone()}),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.message(),
            "Compression is not supported for underlying format: file"
        );
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let raw = json!({"driver": "raw", "file": file});
        let e = add(
            &mut g,
            json!({"driver": "compress", "node-name": "c", "file": raw}),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.message(),
            "Compression is not supported for underlying format: raw"
        );
    }

    #[tokio::test]
    async fn test_compress_unknown_option_is_refused() {
        let (mut g, _log) = fake_graph();
        let opts = json!({"driver": "compress", "node-name": "c", "level": 3, "file": {"driver": "qcow2"}});
        assert!(add(&mut g, opts).await.is_err());
    }

    #[tokio::test]
    async fn test_compress_write_pads_to_cluster_and_sets_flag() {
        let (mut g, log) = fake_graph();
        let opts = json!({"driver": "compress", "node-name": "c", "file": {"driver": "qcow2"}});
        let node = add(&mut g, opts).await.unwrap();
        assert_eq!(node.driver().limits().request_alignment, 65536);
        let info = node.driver().image_info();
        assert_eq!(
            info.filename,
            r#"json:{"driver": "compress", "file": {"driver": "fakecomp", "filename": "fake"}}"#
        );
        assert_eq!(info.cluster_size, Some(65536));
        let blk = backend(&node);
        blk.write(65536 + 100, filled(10, 7), WriteFlags::default())
            .await
            .unwrap();
        let writes = log.lock().unwrap().clone();
        assert_eq!(writes.len(), 1);
        let (off, len, flags) = writes[0];
        assert_eq!((off, len), (65536, 65536));
        assert!(flags.compress);
        let got = blk.read(65536 + 99, IoBuf::new(12)).await.unwrap();
        assert_eq!(&got[..], &[0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0]);
    }

    #[tokio::test]
    async fn test_compress_write_perm_on_partial_cluster_size_is_refused() {
        let (mut g, _log) = fake_graph();
        let opts = json!({"driver": "compress", "node-name": "c",
                          "file": {"driver": "qcow2", "size": 100_000}});
        let node = add(&mut g, opts).await.unwrap();
        let e = qsd_block::BlockBackend::new(node.clone(), "export 'e'", Perm::WRITE, Perm::ALL)
            .unwrap_err();
        assert!(e
            .message()
            .contains("Image size is not a multiple of request alignment"));
        // Read-only users and users that may resize are fine.
        qsd_block::BlockBackend::new(node, "export 'r'", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
    }

    #[tokio::test]
    async fn test_compressed_write_to_non_compressing_driver_fails_enotsup() {
        let (_dir, path) = image(1 << 20);
        let mut g = graph();
        let node = add(
            &mut g,
            json!({"driver": "file", "node-name": "f", "filename": path_str(&path)}),
        )
        .await
        .unwrap();
        let blk = backend(&node);
        let flags = WriteFlags {
            compress: true,
            ..WriteFlags::default()
        };
        let e = blk.write(0, filled(512, 1), flags).await.unwrap_err();
        assert_eq!(e.errno(), 95);
        assert!(e
            .message()
            .starts_with("Compression is not supported for this drive"));
    }
}
