//! The `luks` format driver: a LUKS1 volume (as qemu-img and cryptsetup
//! make them) over its `file` child, optionally with the header in a
//! separate `header` child. The master key is unlocked once at open with
//! the `key-secret` passphrase; one [`SectorCipher`] then serves every
//! request without locks.

use qsd_block::perm::UserDesc;
use qsd_block::{
    BlockDriver, BoxFut, DriverFactory, Error, ImageInfo, Limits, NodeRef, OpenCtx, Perm, PermUser,
    Result, SecretRef, WriteFlags,
};
use qsd_luks::{CipherMode, IvGen, LuksError, LuksHeader, SectorCipher, HEADER_LEN, SECTOR_SIZE};
use qsd_rt::IoBuf;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::jsonname::json_filename;

/// BlockdevOptionsLUKS without its children (`file`, `header`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct LuksOpts {
    key_secret: Option<String>,
}

/// Factory for `luks`.
#[derive(Debug, Default)]
pub struct LuksFactory;

impl DriverFactory for LuksFactory {
    fn name(&self) -> &'static str {
        "luks"
    }

    fn open<'a>(
        &'a self,
        ctx: &'a mut OpenCtx<'_>,
        mut opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            let file = ctx.required_child(&mut opts, "file").await?;
            let header = ctx.child(&mut opts, "header").await?;
            let opts: LuksOpts = ctx.parse(opts)?;
            // qemu's order: the option, then the secret, then the header.
            let id = opts
                .key_secret
                .ok_or_else(|| Error::invalid("Parameter 'key-secret' is required for cipher"))?;
            let secret = ctx.secret(&id)?;
            qsd_luks::secret::passphrase_utf8(&id, secret.bytes()).map_err(luks_err)?;
            let name = ctx.node_name().to_string();
            let hdr_node = header.clone().unwrap_or_else(|| file.clone());
            let pass = Pass::Secret(secret.clone());
            let (hdr, cipher) = unlock_node(&hdr_node, 0, None, pass, header.is_some()).await?;
            let driver = LuksDriver::new(file, header, hdr, cipher, &name, id, secret)?;
            Ok(Box::new(driver) as Box<dyn BlockDriver>)
        })
    }
}

/// A luks node.
pub struct LuksDriver {
    file: NodeRef,
    header: Option<NodeRef>,
    file_user: PermUser,
    _header_user: Option<PermUser>,
    hdr: LuksHeader,
    cipher: SectorCipher,
    payload: u64,
    key_secret: String,
    /// Held for the node's lifetime: the secret stays "in use".
    _secret: SecretRef,
}

impl std::fmt::Debug for LuksDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuksDriver")
            .field("file", &self.file.name())
            .field("header", &self.hdr)
            .field("payload", &self.payload)
            .finish_non_exhaustive()
    }
}

fn luks_err(e: LuksError) -> Error {
    Error::invalid(e.to_string())
}

/// A passphrase that can move to the unlock thread; wiped when dropped
/// (the secret store wipes secrets, `MasterKey` wipes its copy).
enum Pass {
    Secret(SecretRef),
    Copy(qsd_luks::MasterKey),
}

impl Pass {
    fn bytes(&self) -> &[u8] {
        match self {
            Pass::Secret(s) => s.bytes(),
            Pass::Copy(k) => k.as_bytes(),
        }
    }
}

/// Reads `len` bytes at `offset` of `node`; bytes past its end read as
/// zeroes (qemu reads a short file's header that way, then finds no magic).
async fn read_at(node: &NodeRef, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let avail = node.len().saturating_sub(offset).min(len as u64) as usize;
    if avail > 0 {
        let buf = node.read(offset, IoBuf::new(avail)).await?;
        out[..avail].copy_from_slice(&buf);
    }
    Ok(out)
}

/// Runs PBKDF2-heavy work off the I/O thread when a runtime is there to
/// take it (unlocking costs the slot's whole iteration time).
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, LuksError> + Send + 'static,
) -> Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h
            .spawn_blocking(f)
            .await
            .map_err(|e| Error::invalid(format!("unlock task failed: {e}")))?
            .map_err(luks_err),
        Err(_) => f().map_err(luks_err),
    }
}

/// Reads a LUKS1 header at `base` of `node` (within `limit` bytes when
/// given), unlocks the master key with `pass` and builds the sector cipher.
/// The master key is dropped (and wiped) before this returns.
async fn unlock_node(
    node: &NodeRef,
    base: u64,
    limit: Option<u64>,
    pass: Pass,
    detached: bool,
) -> Result<(LuksHeader, SectorCipher)> {
    let raw = read_at(node, base, HEADER_LEN).await?;
    let hdr = if detached {
        qsd_luks::parse_header_detached(&raw)
    } else {
        qsd_luks::parse_header(&raw)
    }
    .map_err(luks_err)?;
    let mut materials = Vec::new();
    for slot in 0..qsd_luks::NUM_SLOTS {
        let Some((off, len)) = hdr.key_material_range(slot) else {
            continue;
        };
        if limit.is_some_and(|l| off + len > l) {
            return Err(luks_err(LuksError::SlotOverlapsPayload(slot)));
        }
        let m = read_at(node, base + off, len as usize).await?;
        // Encrypted key material is on disk anyway: no need to wipe it.
        materials.push((slot, m));
    }
    let h = hdr.clone();
    let cipher = off_thread(move || {
        for (slot, m) in materials {
            if let Some(key) = qsd_luks::unlock_slot(&h, slot, pass.bytes(), m)? {
                return SectorCipher::new(h.cipher_spec(), &key);
            }
        }
        Err(LuksError::WrongPassphrase)
    })
    .await?;
    Ok((hdr, cipher))
}

/// Unlocks a LUKS1 header kept inside another image (qcow2
/// `encrypt.format=luks`): the header starts at `header_offset` of `file`
/// and its key material lies within `header_len` bytes of it. `secret` is
/// the passphrase (it must be UTF-8, as qemu requires); `node_name` names
/// the node in errors. The caller computes IVs itself (qcow2 uses the host
/// offset).
pub async fn unlock_luks_at(
    file: &NodeRef,
    header_offset: u64,
    header_len: u64,
    secret: &[u8],
    node_name: &str,
) -> Result<(LuksHeader, SectorCipher)> {
    if std::str::from_utf8(secret).is_err() || secret.contains(&0) {
        return Err(Error::invalid(format!(
            "Data from the key secret of node '{node_name}' is not valid UTF-8"
        )));
    }
    if header_len < HEADER_LEN as u64 {
        return Err(luks_err(LuksError::Truncated {
            need: HEADER_LEN,
            got: header_len as usize,
        }));
    }
    // qemu checks an embedded header like an attached one (its payload
    // offset is the header area's size); the key material must also lie
    // within the area the caller gave.
    let pass = Pass::Copy(qsd_luks::MasterKey::new(secret.to_vec()));
    unlock_node(file, header_offset, Some(header_len), pass, false).await
}

impl LuksDriver {
    fn new(
        file: NodeRef,
        header: Option<NodeRef>,
        hdr: LuksHeader,
        cipher: SectorCipher,
        node_name: &str,
        key_secret: String,
        secret: SecretRef,
    ) -> Result<Self> {
        let desc = |role: &str| UserDesc {
            who: format!("node '{node_name}'"),
            role: role.into(),
        };
        // As raw: nothing taken until a parent takes it; never share resize.
        let file_user = file.add_user(desc("file"), Perm::NONE, Perm::ALL & !Perm::RESIZE)?;
        let header_user = match &header {
            Some(h) => Some(h.add_user(desc("header"), Perm::CONSISTENT_READ, Perm::ALL)?),
            None => None,
        };
        Ok(LuksDriver {
            file,
            header,
            file_user,
            _header_user: header_user,
            payload: hdr.payload_offset_bytes(),
            hdr,
            cipher,
            key_secret,
            _secret: secret,
        })
    }

    /// The payload offset in the file of a guest offset.
    fn at(&self, offset: u64) -> Result<u64> {
        offset
            .checked_add(self.payload)
            .ok_or_else(|| Error::invalid("request offset overflows"))
    }

    /// qemu's `format-specific` member for a luks node.
    fn format_specific(&self) -> Value {
        let spec = self.hdr.cipher_spec();
        let key_bits = match spec.mode {
            CipherMode::Xts => self.hdr.key_bytes() * 4,
            CipherMode::Cbc => self.hdr.key_bytes() * 8,
        };
        let mode = match spec.mode {
            CipherMode::Xts => "xts",
            CipherMode::Cbc => "cbc",
        };
        let ivgen = match spec.ivgen {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::EssivSha256 => "essiv",
        };
        let slots: Vec<Value> = self
            .hdr
            .slots()
            .iter()
            .map(|s| {
                let key_offset = u64::from(s.key_material_offset) * SECTOR_SIZE;
                if s.active {
                    json!({"active": true, "iters": s.iterations,
                           "key-offset": key_offset, "stripes": s.stripes})
                } else {
                    json!({"active": false, "key-offset": key_offset})
                }
            })
            .collect();
        let mut data = json!({
            "cipher-alg": format!("{}-{key_bits}", self.hdr.cipher_name()),
            "cipher-mode": mode,
            "ivgen-alg": ivgen,
            "hash-alg": self.hdr.hash_spec(),
            "detached-header": self.payload == 0,
            "payload-offset": self.payload,
            "master-key-iters": self.hdr.mk_digest_iterations(),
            "uuid": self.hdr.uuid(),
            "slots": slots,
        });
        if spec.ivgen == IvGen::EssivSha256 {
            data["ivgen-hash-alg"] = "sha256".into();
        }
        json!({"type": "luks", "data": data})
    }

    /// qemu's `json:{...}` file name of the node.
    fn filename(&self) -> String {
        let child = |n: &NodeRef| {
            let name = n.driver().image_info().filename;
            match name.strip_prefix("json:") {
                Some(j) => serde_json::from_str(j).unwrap_or(Value::Null),
                None => json!({"driver": n.driver().driver_name(), "filename": name}),
            }
        };
        let mut m = Map::new();
        if let Some(h) = &self.header {
            m.insert("header".into(), child(h));
        }
        m.insert("driver".into(), "luks".into());
        m.insert("file".into(), child(&self.file));
        m.insert("key-secret".into(), self.key_secret.clone().into());
        json_filename(&m)
    }
}

impl BlockDriver for LuksDriver {
    fn driver_name(&self) -> &'static str {
        "luks"
    }

    fn len(&self) -> u64 {
        self.file.len().saturating_sub(self.payload)
    }

    fn limits(&self) -> Limits {
        let child = self.file.driver().limits();
        Limits {
            request_alignment: SECTOR_SIZE as u32,
            ..child
        }
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            let at = self.at(offset)?;
            let mut buf = self.file.read(at, buf).await?;
            self.cipher
                .decrypt(offset / SECTOR_SIZE, &mut buf)
                .map_err(luks_err)?;
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            let at = self.at(offset)?;
            // Encrypt a copy: the caller gets its plaintext back unchanged.
            let mut bounce = IoBuf::from_slice(&buf);
            self.cipher
                .encrypt(offset / SECTOR_SIZE, &mut bounce)
                .map_err(luks_err)?;
            self.file.write(at, bounce, flags).await?;
            Ok(buf)
        })
    }

    // write_zeroes: the default (Unsupported) makes the node write zero
    // buffers, which are encrypted like any data. discard: the default
    // no-op, as qemu's crypto driver has no discard.

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(self.file.flush())
    }

    // block_status: the default (all data), as qemu reports luks payloads.

    fn truncate(&self, size: u64) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let end = size
                .checked_add(self.payload)
                .filter(|&e| i64::try_from(e).is_ok())
                .ok_or_else(|| Error::invalid("The requested file size is too large"))?;
            self.file.truncate(end).await
        })
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        self.file_user.update(perm, shared & !Perm::RESIZE)
    }

    fn image_info(&self) -> ImageInfo {
        let child = self.file.driver().image_info();
        ImageInfo {
            filename: self.filename(),
            actual_size: child.actual_size,
            format_specific: Some(self.format_specific()),
            encrypted: true,
            ..ImageInfo::default()
        }
    }
}

#[cfg(test)]
#[path = "luks_tests.rs"]
mod tests;
