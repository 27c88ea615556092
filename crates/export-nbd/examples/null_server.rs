//! Serve a null device of 1 GiB as export "disk" on a UNIX socket, for
//! measuring the server's own cost (e.g. with fio's nbd engine):
//! `cargo run --release -p qsd-export-nbd --example null_server -- nbd.sock`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qsd_block::{
    BlockBackend, BlockDriver, BoxFut, CommonOptions, ImageInfo, Node, Perm, WriteFlags,
};
use qsd_export_nbd::{ExportOptions, ListenAddr, NbdServer, ServerOptions};
use qsd_rt::IoBuf;

struct Null(u64);

impl BlockDriver for Null {
    fn driver_name(&self) -> &'static str {
        "null-co"
    }
    fn len(&self) -> u64 {
        self.0
    }
    fn read(&self, _offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move { Ok(buf) })
    }
    fn write(&self, _offset: u64, buf: IoBuf, _flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async move { Ok(buf) })
    }
    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn image_info(&self) -> ImageInfo {
        ImageInfo::default()
    }
}

fn main() {
    let path = std::env::args().nth(1).expect("socket path");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tx.send(rt.handle().clone()).unwrap();
        rt.block_on(std::future::pending::<()>());
    });
    let io = rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let server = NbdServer::new(ServerOptions::default());
        server.start(ListenAddr::Unix(path.into())).await.unwrap();
        let node = Node::new(
            "n0".into(),
            false,
            CommonOptions::default(),
            Box::new(Null(1 << 30)),
            vec![],
        );
        let backend = BlockBackend::new(node, "export 'disk'", Perm::ALL, Perm::ALL).unwrap();
        let opts = ExportOptions {
            name: "disk".into(),
            description: None,
            writable: true,
            backend,
            io,
            allocation_depth: false,
        };
        server.add_export(opts).unwrap();
        std::future::pending::<()>().await;
    });
}
