use std::path::Path;

use qsd_block::{BlockBackend, ErrorKind, Graph, IoBuf, NodeRef, Perm, WriteFlags, ZeroFlags};
use qsd_luks::{CipherMode, CipherSpec, HashAlg, IvGen, MasterKey};
use qsd_qapi::InputMode;
use serde_json::{json, Value};

/// Deterministic bytes for formatting test volumes (not for real keys).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *x = (self.0 >> 24) as u8;
        }
    }
}

const PASS: &[u8] = b"correct horse";

fn graph() -> Graph {
    let mut g = Graph::new();
    crate::register_all(&mut g);
    put_secret(&g, "s0", PASS);
    put_secret(&g, "bad", b"wrong");
    g
}

/// Adds a raw secret to the graph's store.
fn put_secret(g: &Graph, id: &str, bytes: &[u8]) {
    let plain = qsd_luks::secret::decode_secret(bytes, qsd_luks::secret::SecretFormat::Raw, None);
    g.secrets().insert(id, plain.unwrap()).unwrap();
}

/// Writes a LUKS volume with `payload` bytes of (encrypted zero) payload at
/// `at` of a new file; returns the dir, path and master key.
fn volume(
    spec: CipherSpec,
    key_bytes: usize,
    payload: u64,
    at: u64,
) -> (tempfile::TempDir, std::path::PathBuf, MasterKey, u64) {
    let mut rng = Rng::new(key_bytes as u64 + payload);
    let (hdr, area, mk) = qsd_luks::format(spec, key_bytes, HashAlg::Sha256, PASS, 7, &mut |b| {
        rng.fill(b)
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.luks");
    let mut data = vec![0u8; at as usize];
    data.extend_from_slice(&area);
    data.resize((at + hdr.payload_offset_bytes() + payload) as usize, 0);
    std::fs::write(&path, data).unwrap();
    (dir, path, mk, hdr.payload_offset_bytes())
}

async fn add(g: &mut Graph, v: Value) -> qsd_block::Result<NodeRef> {
    let Value::Object(m) = v else { unreachable!() };
    g.open(m, InputMode::Qmp).await
}

fn opts(path: &Path, secret: Option<&str>) -> Value {
    let mut v = json!({"driver": "luks", "node-name": "l0",
        "file": {"driver": "file", "filename": path.to_str().unwrap()}});
    if let Some(s) = secret {
        v["key-secret"] = s.into();
    }
    v
}

fn backend(n: &NodeRef) -> BlockBackend {
    BlockBackend::new(n.clone(), "export 'test'", Perm::ALL, Perm::ALL).unwrap()
}

fn pattern(len: usize, seed: u8) -> IoBuf {
    let mut b = IoBuf::new(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    b
}

#[tokio::test]
async fn test_luks_write_read_every_spec_round_trips_and_encrypts() {
    for mode in [CipherMode::Xts, CipherMode::Cbc] {
        for ivgen in [IvGen::Plain, IvGen::Plain64, IvGen::EssivSha256] {
            let spec = CipherSpec { mode, ivgen };
            let kb = spec.key_sizes()[2];
            let (_d, path, mk, payload) = volume(spec, kb, 1 << 20, 0);
            let mut g = graph();
            let node = add(&mut g, opts(&path, Some("s0"))).await.unwrap();
            assert_eq!(node.len(), 1 << 20);
            let blk = backend(&node);
            let data = pattern(8192, 5);
            let back = blk
                .write(4096, data.clone(), WriteFlags::default())
                .await
                .unwrap();
            assert_eq!(&back[..], &data[..], "caller buffer unchanged");
            let got = blk.read(4096, IoBuf::new(8192)).await.unwrap();
            assert_eq!(&got[..], &data[..]);
            // Unaligned requests are padded by the node.
            let got = blk.read(4100, IoBuf::new(10)).await.unwrap();
            assert_eq!(&got[..], &data[4..14]);
            // On disk: ciphertext with IV = sector number within the payload.
            let disk = std::fs::read(&path).unwrap();
            let at = (payload + 4096) as usize;
            let mut ct = data.to_vec();
            qsd_luks::SectorCipher::new(spec, &mk)
                .unwrap()
                .encrypt(8, &mut ct)
                .unwrap();
            assert_eq!(&disk[at..at + 8192], &ct[..], "{spec:?}");
        }
    }
}

#[tokio::test]
async fn test_luks_write_zeroes_falls_back_to_encrypted_zeroes() {
    let (_d, path, _, payload) = volume(CipherSpec::XTS_PLAIN64, 64, 1 << 20, 0);
    let mut g = graph();
    let node = add(&mut g, opts(&path, Some("s0"))).await.unwrap();
    let blk = backend(&node);
    blk.write(0, pattern(4096, 1), WriteFlags::default())
        .await
        .unwrap();
    blk.write_zeroes(0, 4096, ZeroFlags::default())
        .await
        .unwrap();
    let got = blk.read(0, IoBuf::new(4096)).await.unwrap();
    assert!(got.iter().all(|&b| b == 0));
    let disk = std::fs::read(&path).unwrap();
    assert!(disk[payload as usize..payload as usize + 4096]
        .iter()
        .any(|&b| b != 0));
}

#[tokio::test]
async fn test_luks_open_errors_match_qemu() {
    let (_d, path, _, _) = volume(CipherSpec::XTS_PLAIN64, 32, 4096, 0);
    let before = std::fs::read(&path).unwrap();
    let mut g = graph();
    let e = |r: qsd_block::Result<NodeRef>| r.unwrap_err().message().to_string();
    assert_eq!(
        e(add(&mut g, opts(&path, Some("bad"))).await),
        "Invalid password, cannot unlock any keyslot"
    );
    assert_eq!(
        e(add(&mut g, opts(&path, Some("nosuch"))).await),
        "No secret with id 'nosuch'"
    );
    assert_eq!(
        e(add(&mut g, opts(&path, None)).await),
        "Parameter 'key-secret' is required for cipher"
    );
    let mut v = opts(&path, Some("s0"));
    v["bogus"] = 1.into();
    assert_eq!(e(add(&mut g, v).await), "Parameter 'bogus' is unexpected");
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
    let plain = path.with_extension("raw");
    std::fs::write(&plain, vec![0u8; 100]).unwrap();
    assert_eq!(
        e(add(&mut g, opts(&plain, Some("s0"))).await),
        "Volume is not in LUKS format"
    );
    put_secret(&g, "nul", b"a\0b");
    assert_eq!(
        e(add(&mut g, opts(&path, Some("nul"))).await),
        "Data from secret nul is not valid UTF-8"
    );
}

#[tokio::test]
async fn test_luks_secret_in_use_until_node_deleted() {
    let (_d, path, _, _) = volume(CipherSpec::XTS_PLAIN64, 32, 4096, 0);
    let mut g = graph();
    let node = add(&mut g, opts(&path, Some("s0"))).await.unwrap();
    let err = g.secrets().remove("s0").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    drop(node);
    g.delete("l0").await.unwrap();
    g.secrets().remove("s0").unwrap();
}

#[tokio::test]
async fn test_luks_image_info_reports_header_without_keys() {
    let spec = CipherSpec {
        mode: CipherMode::Cbc,
        ivgen: IvGen::EssivSha256,
    };
    let (_d, path, mk, payload) = volume(spec, 16, 4096, 0);
    let mut g = graph();
    let node = add(&mut g, opts(&path, Some("s0"))).await.unwrap();
    let info = node.driver().image_info();
    assert!(info.encrypted);
    let fs = info.format_specific.unwrap();
    assert_eq!(fs["type"], "luks");
    let d = &fs["data"];
    assert_eq!(d["cipher-alg"], "aes-128");
    assert_eq!(d["cipher-mode"], "cbc");
    assert_eq!(d["ivgen-alg"], "essiv");
    assert_eq!(d["ivgen-hash-alg"], "sha256");
    assert_eq!(d["hash-alg"], "sha256");
    assert_eq!(d["detached-header"], false);
    assert_eq!(d["payload-offset"], payload);
    assert_eq!(d["slots"][0]["key-offset"], 4096);
    assert_eq!(d["slots"][0]["iters"], 7);
    assert_eq!(d["slots"][1], json!({"active": false, "key-offset": 69632}));
    assert_eq!(
        info.filename,
        format!(
            "json:{{\"driver\": \"luks\", \"file\": {{\"driver\": \"file\", \"filename\": \"{}\"}}, \"key-secret\": \"s0\"}}",
            path.to_str().unwrap()
        )
    );
    let hex: String = mk.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let shown = format!("{fs} {:?} {node:?}", node.driver().image_info());
    assert!(!shown.contains("correct horse") && !shown.contains(&hex));
    let dbg = format!(
        "{:?}",
        (node.driver() as &dyn std::any::Any).downcast_ref::<crate::LuksDriver>()
    );
    assert!(dbg.contains("LuksDriver") && !dbg.contains(&hex));
}

#[tokio::test]
async fn test_luks_truncate_resizes_payload() {
    let (_d, path, _, payload) = volume(CipherSpec::XTS_PLAIN64, 32, 4096, 0);
    let mut g = graph();
    let node = add(&mut g, opts(&path, Some("s0"))).await.unwrap();
    let blk = backend(&node);
    blk.truncate(1 << 20).await.unwrap();
    assert_eq!(node.len(), 1 << 20);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), payload + (1 << 20));
    blk.write((1 << 20) - 512, pattern(512, 9), WriteFlags::default())
        .await
        .unwrap();
    let got = blk.read((1 << 20) - 512, IoBuf::new(512)).await.unwrap();
    assert_eq!(&got[..], &pattern(512, 9)[..]);
}

#[tokio::test]
async fn test_luks_detached_header_child_used() {
    let (_d, path, mk, payload) = volume(CipherSpec::XTS_PLAIN64, 32, 0, 0);
    let data = path.with_extension("data");
    std::fs::write(&data, vec![0u8; (payload + 8192) as usize]).unwrap();
    let mut g = graph();
    let v = json!({"driver": "luks", "node-name": "l0", "key-secret": "s0",
        "file": {"driver": "file", "filename": data.to_str().unwrap()},
        "header": {"driver": "file", "filename": path.to_str().unwrap()}});
    let node = add(&mut g, v).await.unwrap();
    assert_eq!(node.len(), 8192);
    let blk = backend(&node);
    blk.write(0, pattern(1024, 3), WriteFlags::default())
        .await
        .unwrap();
    let disk = std::fs::read(&data).unwrap();
    let mut ct = pattern(1024, 3).to_vec();
    qsd_luks::SectorCipher::new(CipherSpec::XTS_PLAIN64, &mk)
        .unwrap()
        .encrypt(0, &mut ct)
        .unwrap();
    assert_eq!(&disk[payload as usize..payload as usize + 1024], &ct[..]);
    assert!(node
        .driver()
        .image_info()
        .filename
        .contains("\"header\": {\"driver\": \"file\""));
}

#[tokio::test]
async fn test_unlock_luks_at_reads_embedded_header() {
    let (_d, path, mk, payload) = volume(CipherSpec::XTS_PLAIN64, 64, 0, 65536);
    let mut g = graph();
    let file = add(
        &mut g,
        json!({"driver": "file", "node-name": "f0", "filename": path.to_str().unwrap()}),
    )
    .await
    .unwrap();
    let (hdr, cipher) = crate::unlock_luks_at(&file, 65536, payload, PASS, "q0")
        .await
        .unwrap();
    assert_eq!(hdr.key_bytes(), 64);
    let mut a = vec![7u8; 512];
    let mut b = a.clone();
    cipher.encrypt(3, &mut a).unwrap();
    qsd_luks::SectorCipher::new(CipherSpec::XTS_PLAIN64, &mk)
        .unwrap()
        .encrypt(3, &mut b)
        .unwrap();
    assert_eq!(a, b);
    let e = crate::unlock_luks_at(&file, 65536, payload, b"nope", "q0")
        .await
        .unwrap_err();
    assert_eq!(e.message(), "Invalid password, cannot unlock any keyslot");
    let e = crate::unlock_luks_at(&file, 65536, 4096, PASS, "q0")
        .await
        .unwrap_err();
    assert!(e.message().contains("overlapping"), "{}", e.message());
    let e = crate::unlock_luks_at(&file, 0, payload, PASS, "q0")
        .await
        .unwrap_err();
    assert_eq!(e.message(), "Volume is not in LUKS format");
}
