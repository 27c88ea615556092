use qsd_block::{ErrorKind, IoBuf, WriteFlags};
use serde_json::json;

use super::*;

fn raw_opts(path: &Path, extra: Value) -> Value {
    let mut v = json!({"driver": "raw", "node-name": "r0",
                       "file": {"driver": "file", "filename": path_str(path)}});
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    v
}

#[tokio::test]
async fn test_raw_passthrough_reads_child_and_names_it() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let node = add(&mut g, raw_opts(&path, json!({}))).await.unwrap();
    assert_eq!(node.len(), 1 << 20);
    let blk = backend(&node);
    blk.write(512, filled(512, 3), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap()[512], 3);
    assert_eq!(node.driver().image_info().filename, path_str(&path));
    assert_eq!(node.driver().driver_name(), "raw");
    blk.truncate(2 << 20).await.unwrap();
    assert_eq!(
        (node.len(), std::fs::metadata(&path).unwrap().len()),
        (2 << 20, 2 << 20)
    );
}

#[tokio::test]
async fn test_raw_window_maps_offsets_and_bounds() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let node = add(
        &mut g,
        raw_opts(&path, json!({"offset": 4096, "size": 8192})),
    )
    .await
    .unwrap();
    assert_eq!(node.len(), 8192);
    let blk = backend(&node);
    blk.write(0, filled(8192, 0xcd), WriteFlags::default())
        .await
        .unwrap();
    let data = std::fs::read(&path).unwrap();
    assert_eq!(
        (data[4095], data[4096], data[12287], data[12288]),
        (0, 0xcd, 0xcd, 0)
    );
    let got = blk.read(100, IoBuf::new(50)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0xcd));
    assert!(blk
        .write(8192, IoBuf::new(512), WriteFlags::default())
        .await
        .is_err());
    let err = blk.truncate(16384).await.unwrap_err();
    assert_eq!(err.message(), "Cannot resize fixed-size raw disks");
    assert_eq!(
        node.driver().image_info().filename,
        format!(
            "json:{{\"offset\": 4096, \"driver\": \"raw\", \"size\": 8192, \
             \"file\": {{\"driver\": \"file\", \"filename\": \"{}\"}}}}",
            path_str(&path)
        )
    );
}

#[tokio::test]
async fn test_raw_window_driver_refuses_requests_outside() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let node = add(
        &mut g,
        raw_opts(&path, json!({"offset": 512, "size": 1024})),
    )
    .await
    .unwrap();
    let err = node
        .driver()
        .write(512, IoBuf::new(1024), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(err.errno(), 28);
    let err = node.driver().read(2048, IoBuf::new(512)).await.unwrap_err();
    assert_eq!(err.errno(), 22);
}

#[tokio::test]
async fn test_raw_offset_only_follows_child_size_and_block_status() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let opts = raw_opts(&path, json!({"offset": 65536, "discard": "unmap"}));
    let node = add(&mut g, opts).await.unwrap();
    assert_eq!(node.len(), (1 << 20) - 65536);
    let blk = backend(&node);
    blk.write(0, filled(65536, 1), WriteFlags::default())
        .await
        .unwrap();
    let st = blk.block_status(0, 131072).await.unwrap();
    assert!(st.data && st.len == 65536, "{st:?}");
    let st = blk.block_status(65536, 65536).await.unwrap();
    assert!(st.zero && !st.data, "{st:?}");
    blk.truncate(65536).await.unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 131072);
    assert_eq!(node.len(), 65536);
}

#[tokio::test]
async fn test_raw_bad_window_is_refused_with_qemu_words() {
    let (_dir, path) = image(1 << 20);
    let mut g = graph();
    let err = add(&mut g, raw_opts(&path, json!({"offset": 2 << 20})))
        .await
        .unwrap_err();
    assert_eq!(
        err.message(),
        "Offset (2097152) cannot be greater than size of the containing file (1048576)"
    );
    let err = add(
        &mut g,
        raw_opts(&path, json!({"offset": 4096, "size": 1 << 20})),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.message(),
        "The sum of offset (4096) and size (1048576) has to be smaller or equal to the  actual \
         size of the containing file (1048576)"
    );
    let err = add(&mut g, raw_opts(&path, json!({"size": 1000})))
        .await
        .unwrap_err();
    assert_eq!(err.message(), "Specified size is not multiple of 512");
    let err = add(&mut g, json!({"driver": "raw", "node-name": "x"}))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn test_raw_over_named_null_uses_json_name() {
    let mut g = graph();
    add(
        &mut g,
        json!({"driver": "null-co", "node-name": "n0", "size": 1000}),
    )
    .await
    .unwrap();
    let node = add(
        &mut g,
        json!({"driver": "raw", "node-name": "r0", "file": "n0"}),
    )
    .await
    .unwrap();
    assert_eq!(node.len(), 1024);
    assert_eq!(
        node.driver().image_info().filename,
        "json:{\"driver\": \"raw\", \"file\": {\"driver\": \"null-co\", \"size\": 1000}}"
    );
}
