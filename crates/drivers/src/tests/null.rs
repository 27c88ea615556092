use std::time::{Duration, Instant};

use qsd_block::{IoBuf, WriteFlags};
use serde_json::json;

use super::*;

#[tokio::test]
async fn test_null_defaults_to_one_gib_and_keeps_buffer() {
    let mut g = graph();
    let node = add(&mut g, json!({"driver": "null-co", "node-name": "n0"}))
        .await
        .unwrap();
    assert_eq!(node.len(), 1 << 30);
    assert_eq!(node.driver().image_info().filename, "null-co://");
    let blk = backend(&node);
    let got = blk.read(0, filled(512, 0xab)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0xab));
    let st = blk.block_status(0, 1 << 20).await.unwrap();
    assert!(
        !st.data && !st.zero && !st.allocated && st.depth == 0,
        "{st:?}"
    );
    blk.write(4096, filled(512, 1), WriteFlags::default())
        .await
        .unwrap();
    blk.flush().await.unwrap();
}

#[tokio::test]
async fn test_null_read_zeroes_zeroes_buffer_and_reports_zero() {
    let mut g = graph();
    let opts = json!({"driver": "null-aio", "node-name": "n0", "size": 1048576,
                      "read-zeroes": true});
    let node = add(&mut g, opts).await.unwrap();
    assert_eq!(node.len(), 1 << 20);
    let blk = backend(&node);
    let got = blk.read(0, filled(4096, 0xab)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
    let st = blk.block_status(0, 1 << 20).await.unwrap();
    assert!(
        st.zero && !st.data && st.allocated && st.len == 1 << 20,
        "{st:?}"
    );
    assert_eq!(
        node.driver().image_info().filename,
        "json:{\"read-zeroes\": true, \"driver\": \"null-aio\", \"size\": 1048576}"
    );
}

#[tokio::test]
async fn test_null_size_rounds_up_to_sector() {
    let mut g = graph();
    let node = add(
        &mut g,
        json!({"driver": "null-co", "node-name": "n0", "size": 1000}),
    )
    .await
    .unwrap();
    assert_eq!(node.len(), 1024);
}

#[tokio::test]
async fn test_null_latency_delays_requests() {
    let mut g = graph();
    let opts = json!({"driver": "null-co", "node-name": "n0", "latency-ns": 20_000_000});
    let node = add(&mut g, opts).await.unwrap();
    assert_eq!(node.driver().image_info().filename, "null-co://");
    let start = Instant::now();
    backend(&node).read(0, IoBuf::new(512)).await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(20));
}

#[tokio::test]
async fn test_null_negative_values_are_refused() {
    let mut g = graph();
    let err = add(
        &mut g,
        json!({"driver": "null-co", "node-name": "a", "size": -1}),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.message(),
        "Value '-1' is out of range for parameter 'size'"
    );
    let err = add(
        &mut g,
        json!({"driver": "null-co", "node-name": "a", "latency-ns": -5}),
    )
    .await
    .unwrap_err();
    assert_eq!(err.message(), "latency-ns is invalid");
}

#[tokio::test]
async fn test_null_keyval_size_is_an_integer() {
    let mut g = graph();
    let Value::Object(m) = json!({"driver": "null-co", "node-name": "a", "size": "4096",
                                  "read-zeroes": "on"})
    else {
        unreachable!()
    };
    let node = g.open(m, InputMode::Keyval).await.unwrap();
    assert_eq!(node.len(), 4096);
}
