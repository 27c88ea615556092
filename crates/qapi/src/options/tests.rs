use serde_json::json;

use super::*;
use crate::keyval::{parse_keyval, parse_qemu_opts};
use crate::{from_value, parse_option, InputMode, Raw};

fn opt<T: serde::de::DeserializeOwned>(s: &str, implied: Option<&str>) -> Result<T, crate::Error> {
    let (v, mode) = parse_option(s, implied)?;
    from_value(&v, mode)
}

fn qmp<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, crate::Error> {
    from_value(&v, InputMode::Qmp)
}

#[test]
fn test_split_blockdev_common_taken_rest_left() {
    let v = parse_keyval(
        "null-co,node-name=a,cache.direct=on,read-only=on,size=1k,latency-ns=5",
        Some("driver"),
    )
    .unwrap();
    let (common, rest) = split_blockdev(v, InputMode::Keyval).unwrap();
    assert_eq!(common.driver, "null-co");
    assert_eq!(common.node_name.as_deref(), Some("a"));
    assert!(common.cache_direct());
    assert!(common.read_only());
    assert!(common.active());
    assert_eq!(common.discard(), BlockdevDiscardOptions::Ignore);
    assert_eq!(rest.len(), 2);
    assert_eq!(rest["size"], "1k");
}

#[test]
fn test_split_blockdev_bad_values_rejected() {
    let err = |s: &str| {
        let v = parse_keyval(s, Some("driver")).unwrap();
        split_blockdev(v, InputMode::Keyval)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err("null-co,discard=on"),
        "Parameter 'discard' does not accept value 'on'"
    );
    assert_eq!(
        err("null-co,detect-zeroes=x"),
        "Parameter 'detect-zeroes' does not accept value 'x'"
    );
    assert_eq!(err("node-name=a"), "Parameter 'driver' is missing");
    assert_eq!(err("foo"), "Parameter 'driver' does not accept value 'foo'");
    assert_eq!(
        err("null-co,cache.direct=x"),
        "Parameter 'cache.direct' expects 'on' or 'off'"
    );
}

#[test]
fn test_block_export_iothread_string_or_list() {
    let e: BlockExportOptions = opt(
        "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/s,iothread=t0",
        Some("type"),
    )
    .unwrap();
    assert_eq!(
        e.iothread,
        Some(BlockExportIothread::Single("t0".to_string()))
    );
    let e: BlockExportOptions = opt(
        "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/s,iothread.0=t0,iothread.1=t1",
        Some("type"),
    )
    .unwrap();
    assert_eq!(
        e.iothread.as_ref().map(|t| t.names()),
        Some(vec!["t0", "t1"])
    );
    let e = qmp::<BlockExportOptions>(json!({"type": "vhost-user-blk", "id": "e",
        "node-name": "n", "addr": {"type": "unix", "path": "/s"}, "iothread": ["a", "b"]}))
    .unwrap();
    assert_eq!(e.iothread.as_ref().map(|t| t.names()), Some(vec!["a", "b"]));
    let err = qmp::<BlockExportOptions>(json!({"type": "nbd", "id": "e",
        "node-name": "n", "iothread": 1}))
    .unwrap_err();
    assert!(err.to_string().contains("iothread"), "{err}");
}

#[test]
fn test_block_export_nbd_keyval_parsed() {
    let e: BlockExportOptions = opt(
        "nbd,id=e,node-name=n,writable=on,bitmaps.0=b1,bitmaps.1.node=x,bitmaps.1.name=y",
        Some("type"),
    )
    .unwrap();
    assert_eq!(e.export_type(), BlockExportType::Nbd);
    assert!(e.writable());
    assert_eq!(e.nbd_export_name(), Some("n"));
    let BlockExportKind::Nbd(nbd) = &e.kind else {
        panic!("not nbd")
    };
    assert_eq!(
        nbd.bitmaps,
        Some(vec![
            BlockDirtyBitmapOrStr::Local("b1".into()),
            BlockDirtyBitmapOrStr::External(BlockDirtyBitmap {
                node: "x".into(),
                name: "y".into()
            })
        ])
    );
}

#[test]
fn test_block_export_errors_match_qemu() {
    let err = |s: &str| {
        opt::<BlockExportOptions>(s, Some("type"))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(err("nbd"), "Parameter 'id' is missing");
    assert_eq!(
        err("xx,id=e,node-name=n"),
        "Parameter 'type' does not accept value 'xx'"
    );
    assert_eq!(
        err("nbd,id=e,node-name=n,mountpoint=x"),
        "Parameter 'mountpoint' is unexpected"
    );
    assert_eq!(
        err("nbd,id=e,node-name=n,bitmaps.0.node=x"),
        "Parameter 'bitmaps.0.name' is missing"
    );
    assert_eq!(
        err("vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/p,num-queues=70000"),
        "Parameter 'num-queues' expects uint16_t"
    );
    assert_eq!(
        err("vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/p,logical-block-size=x"),
        "Parameter 'logical-block-size' expects size"
    );
    assert_eq!(
        err("vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/p,addr.foo=1"),
        "Parameter 'addr.foo' is unexpected"
    );
    let e = qmp::<BlockExportOptions>(json!({"type": "nbd", "id": "e", "node-name": "n",
        "bitmaps": [1]}))
    .unwrap_err();
    assert_eq!(
        e.message(),
        "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"
    );
    let e = qmp::<BlockExportOptions>(json!({"id": "e", "node-name": "n"})).unwrap_err();
    assert_eq!(e.message(), "Parameter 'type' is missing");
}

#[test]
fn test_block_export_vhost_user_blk_sizes_coerced() {
    let e: BlockExportOptions = opt(
        "vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/p,logical-block-size=4k,num-queues=2",
        Some("type"),
    )
    .unwrap();
    let BlockExportKind::VhostUserBlk(v) = &e.kind else {
        panic!("not vhost-user-blk")
    };
    assert_eq!(v.logical_block_size, Some(crate::Size(4096)));
    assert_eq!(v.num_queues, Some(2));
    assert_eq!(
        v.addr,
        SocketAddress::Unix(UnixSocketAddress {
            path: "/p".into(),
            is_abstract: None,
            tight: None
        })
    );
}

#[test]
fn test_block_export_serialize_roundtrips() {
    let v = json!({"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "/m",
        "allow-other": "off"});
    let e: BlockExportOptions = qmp(v.clone()).unwrap();
    assert_eq!(serde_json::to_value(&e).unwrap(), v);
}

#[test]
fn test_nbd_server_options_keyval_parsed() {
    let o: NbdServerOptions = opt(
        "addr.type=inet,addr.host=127.0.0.1,addr.port=10809,addr.ipv4=on,max-connections=4",
        None,
    )
    .unwrap();
    assert_eq!(o.max_connections(), 4);
    assert_eq!(o.handshake_max_seconds(), NBD_DEFAULT_HANDSHAKE_MAX_SECS);
    let SocketAddress::Inet(inet) = &o.addr else {
        panic!("not inet")
    };
    assert_eq!(inet.port, "10809");
    assert_eq!(inet.ipv4, Some(true));
}

#[test]
fn test_nbd_server_options_errors_match_qemu() {
    let err = |s: &str| opt::<NbdServerOptions>(s, None).unwrap_err().to_string();
    assert_eq!(err("addr.type=inet"), "Parameter 'addr.host' is missing");
    assert_eq!(err("addr.type=unix"), "Parameter 'addr.path' is missing");
    assert_eq!(err("addr.path=/x"), "Parameter 'addr.type' is missing");
    assert_eq!(
        err("addr.type=foo,addr.path=/x"),
        "Parameter 'type' does not accept value 'foo'"
    );
    assert_eq!(
        err("addr.type=unix,addr.path=/x,max-connections=-1"),
        "Parameter 'max-connections' expects uint32_t"
    );
}

#[test]
fn test_nbd_server_start_legacy_addr_parsed() {
    let a: NbdServerStartArgs =
        qmp(json!({"addr": {"type": "unix", "data": {"path": "/s"}}})).unwrap();
    assert!(matches!(a.addr, SocketAddressLegacy::Unix(_)));
    let o: NbdServerOptions = a.into();
    assert_eq!(o.max_connections(), 0);
    let err = |v| qmp::<NbdServerStartArgs>(v).unwrap_err().to_string();
    assert_eq!(
        err(json!({"addr": {"type": "unix", "data": {}}})),
        "Parameter 'addr.data.path' is missing"
    );
    assert_eq!(
        err(
            json!({"addr": {"type": "unix", "data": {"path": "/s"}}, "max-connections": 4294967296u64})
        ),
        "Parameter 'max-connections' expects uint32_t"
    );
    assert_eq!(
        err(json!({"addr": {"type": "unix", "path": "/x"}})),
        "Parameter 'addr.data' is missing"
    );
    assert_eq!(
        err(json!({"addr": {"type": "unix", "data": {"path": "/x"}, "path": "/x"}})),
        "Parameter 'addr.path' is unexpected"
    );
    assert_eq!(
        err(json!({"addr": {"type": "foo", "data": {}}})),
        "Parameter 'type' does not accept value 'foo'"
    );
    let a = SocketAddressLegacy::Fd(FdSocketAddress { fd: "4".into() });
    let v = serde_json::to_value(&a).unwrap();
    assert_eq!(v, json!({"type": "fd", "data": {"str": "4"}}));
    assert_eq!(qmp::<SocketAddressLegacy>(v).unwrap(), a);
}

#[test]
fn test_object_add_props_keep_coercion() {
    let o: ObjectAddArgs = opt("iothread,id=i,poll-max-ns=0x100", Some("qom-type")).unwrap();
    assert_eq!(o.qom_type, "iothread");
    let p: IothreadProps = o.props().unwrap();
    assert_eq!(p.poll_max_ns, Some(256));
    let o: ObjectAddArgs = opt("iothread,id=i,foo=x", Some("qom-type")).unwrap();
    assert_eq!(
        o.props::<IothreadProps>().unwrap_err().message(),
        "Parameter 'foo' is unexpected"
    );
    let o: ObjectAddArgs = opt("iothread,id=i,poll-max-ns=x", Some("qom-type")).unwrap();
    assert_eq!(
        o.props::<IothreadProps>().unwrap_err().message(),
        "Parameter 'poll-max-ns' expects integer"
    );
    let e = opt::<ObjectAddArgs>("iothread", Some("qom-type")).unwrap_err();
    assert_eq!(e.message(), "Parameter 'id' is missing");
    let o: ObjectAddArgs = qmp(json!({"qom-type": "iothread", "id": "i", "poll-grow": 2})).unwrap();
    assert_eq!(
        serde_json::to_value(&o).unwrap(),
        json!({"qom-type": "iothread", "id": "i", "poll-grow": 2})
    );
}

#[test]
fn test_monitor_options_implied_chardev() {
    let m: MonitorOptions = opt("mon0,pretty=on", Some("chardev")).unwrap();
    assert_eq!(m.chardev, "mon0");
    assert!(m.pretty());
    assert_eq!(m.mode(), MonitorMode::Control);
    let e = opt::<MonitorOptions>("chardev=foo,pretty=x", Some("chardev")).unwrap_err();
    assert_eq!(e.message(), "Parameter 'pretty' expects 'on' or 'off'");
}

#[test]
fn test_chardev_socket_from_opts() {
    let o = parse_qemu_opts(
        "socket,id=c,path=/tmp/s,server=on,wait=off",
        Some("backend"),
    )
    .unwrap();
    let c = ChardevSocketOptions::from_opts(&o.value).unwrap();
    assert_eq!(c.path.as_deref(), Some("/tmp/s"));
    assert!(c.server());
    assert!(!c.wait());
    let o = parse_qemu_opts("socket,id=c,fd=3,server,nowait", Some("backend")).unwrap();
    let c = ChardevSocketOptions::from_opts(&o.value).unwrap();
    assert_eq!(c.fd.as_deref(), Some("3"));
    assert!(!c.wait());
    let o = parse_qemu_opts("socket,id=c,path=/p,foo=bar", Some("backend")).unwrap();
    let e = ChardevSocketOptions::from_opts(&o.value).unwrap_err();
    assert_eq!(e.message(), "Invalid parameter 'foo'");
    let o = parse_qemu_opts("socket,id=c,path=/p,server=x", Some("backend")).unwrap();
    let e = ChardevSocketOptions::from_opts(&o.value).unwrap_err();
    assert_eq!(e.message(), "Parameter 'server' expects 'on' or 'off'");
}

#[test]
fn test_small_command_args_parsed() {
    let a: BlockResizeArgs = qmp(json!({"node-name": "n", "size": -1})).unwrap();
    assert_eq!(a.size, -1);
    let a: BlockExportDelArgs = qmp(json!({"id": "e", "mode": "hard"})).unwrap();
    assert_eq!(a.mode, Some(BlockExportRemoveMode::Hard));
    let e = qmp::<BlockExportDelArgs>(json!({"id": "e", "mode": "x"})).unwrap_err();
    assert_eq!(e.message(), "Parameter 'mode' does not accept value 'x'");
    let a: QueryNamedBlockNodesArgs = qmp(json!({"flat": true})).unwrap();
    assert_eq!(a.flat, Some(true));
    let e = qmp::<QueryNamedBlockNodesArgs>(json!({"flat": 1})).unwrap_err();
    assert_eq!(
        e.message(),
        "Invalid parameter type for 'flat', expected: boolean"
    );
    let a: QueryBlockstatsArgs = qmp(json!({"query-nodes": true})).unwrap();
    assert_eq!(a.query_nodes, Some(true));
    let a: NbdServerAddArgs = qmp(json!({"device": "d", "writable": true})).unwrap();
    assert_eq!(a.device, "d");
    let a: NbdServerRemoveArgs = qmp(json!({"name": "x"})).unwrap();
    assert_eq!(a.mode, None);
    let a: BlockdevDelArgs = qmp(json!({"node-name": "x"})).unwrap();
    assert_eq!(a.node_name, "x");
}

#[test]
fn test_socket_address_from_plain_serde_json() {
    // Outside our deserializer the flat union still works (QMP rules at the root).
    let a: SocketAddress = serde_json::from_value(json!({"type": "fd", "str": "3"})).unwrap();
    assert_eq!(a, SocketAddress::Fd(FdSocketAddress { fd: "3".into() }));
    let raw = Raw::new(
        json!({"type": "vsock", "cid": "2", "port": "5"}),
        InputMode::Qmp,
    );
    assert_eq!(
        SocketAddress::from_raw(&raw).unwrap().kind(),
        SocketAddressType::Vsock
    );
}
