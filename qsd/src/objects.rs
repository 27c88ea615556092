//! `--object` / `object-add` / `object-del`: `iothread`, `secret` and
//! `secret_keyring`; other qemu object types are refused with a clear
//! message.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use qsd_block::SecretStore;
use qsd_luks::secret::{decode_secret, SecretFormat};
use qsd_qapi::options::{IothreadProps, ObjectAddArgs};
use qsd_qapi::{InputMode, Raw};
use qsd_rt::IoThread;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

/// The running I/O threads by id.
#[derive(Debug, Default)]
pub struct IoThreads {
    threads: BTreeMap<String, (IoThread, IothreadProps)>,
}

impl IoThreads {
    /// The runtime handle of an I/O thread, for exports that run there.
    pub fn handle(&self, id: &str) -> Option<tokio::runtime::Handle> {
        self.threads.get(id).map(|(t, _)| t.handle())
    }

    /// `query-iothreads`.
    pub fn query(&self) -> Value {
        let list: Vec<Value> = self
            .threads
            .iter()
            .map(|(id, (t, p))| {
                json!({
                    "id": id, "thread-id": t.thread_id(),
                    "poll-max-ns": p.poll_max_ns.unwrap_or(32768),
                    "poll-grow": p.poll_grow.unwrap_or(0),
                    "poll-shrink": p.poll_shrink.unwrap_or(0),
                    "aio-max-batch": p.aio_max_batch.unwrap_or(0),
                })
            })
            .collect();
        Value::Array(list)
    }

    /// Stop every thread (daemon shutdown).
    pub fn stop_all(&mut self) {
        for (_, (t, _)) in std::mem::take(&mut self.threads) {
            t.stop();
        }
    }
}

/// Object types qemu knows; only those we implement are accepted.
const QEMU_OBJECT_TYPES: &[&str] = &[
    "authz-list",
    "authz-listfile",
    "authz-pam",
    "authz-simple",
    "iothread",
    "main-loop",
    "secret",
    "secret_keyring",
    "throttle-group",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
    "tls-cipher-suites",
    "memory-backend-file",
    "memory-backend-memfd",
    "memory-backend-ram",
    "pr-manager-helper",
    "x-vfio-user-server",
];

/// Properties of a `secret` object (qemu's `SecretProperties`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SecretProps {
    data: Option<String>,
    file: Option<String>,
    format: Option<SecretFormatArg>,
    keyid: Option<String>,
    iv: Option<String>,
    /// Deprecated in qemu and without effect.
    #[allow(dead_code)]
    loaded: Option<bool>,
}

/// Properties of a `secret_keyring` object (qemu's `SecretKeyringProperties`):
/// the data is the payload of a key in the kernel keyring.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct SecretKeyringProps {
    serial: i32,
    format: Option<SecretFormatArg>,
    keyid: Option<String>,
    iv: Option<String>,
    /// Deprecated in qemu and without effect.
    #[allow(dead_code)]
    loaded: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum SecretFormatArg {
    Raw,
    Base64,
}

/// The plain bytes of a new secret, as qemu computes them.
fn secret_bytes(secrets: &SecretStore, p: &SecretProps) -> Result<Zeroizing<Vec<u8>>> {
    let input = match (&p.data, &p.file) {
        (Some(_), Some(_)) => bail!("'file' and 'data' are mutually exclusive"),
        (None, None) => bail!("Either 'file' or 'data' must be provided"),
        (Some(d), None) => Zeroizing::new(d.as_bytes().to_vec()),
        (None, Some(f)) => Zeroizing::new(
            std::fs::read(f).map_err(|e| anyhow!("Unable to read {f}: {}", read_error(f, &e)))?,
        ),
    };
    decode(
        secrets,
        &input,
        p.format,
        p.keyid.as_deref(),
        p.iv.as_deref(),
    )
}

/// The plain bytes of a new `secret_keyring`.
fn keyring_secret_bytes(
    secrets: &SecretStore,
    p: &SecretKeyringProps,
) -> Result<Zeroizing<Vec<u8>>> {
    let input = Zeroizing::new(qsd_rt::process::keyring_read(p.serial).map_err(|e| {
        let why = e.raw_os_error().map_or_else(
            || e.to_string(),
            |n| nix::errno::Errno::from_raw(n).desc().to_string(),
        );
        // qemu prints the serial as eight hex digits.
        anyhow!("Unable to read serial key {:08x}: {why}", p.serial)
    })?);
    decode(
        secrets,
        &input,
        p.format,
        p.keyid.as_deref(),
        p.iv.as_deref(),
    )
}

/// Decode secret data: base64, and decryption under the master secret `keyid`.
fn decode(
    secrets: &SecretStore,
    input: &[u8],
    format: Option<SecretFormatArg>,
    keyid: Option<&str>,
    iv: Option<&str>,
) -> Result<Zeroizing<Vec<u8>>> {
    let format = match format.unwrap_or(SecretFormatArg::Raw) {
        SecretFormatArg::Raw => SecretFormat::Raw,
        SecretFormatArg::Base64 => SecretFormat::Base64,
    };
    let master = match keyid {
        Some(k) => Some(secrets.get(k).map_err(|e| anyhow!("{}", e.message()))?),
        None => None,
    };
    let master = master.as_ref().map(|m| (m.bytes(), iv));
    decode_secret(input, format, master).map_err(|e| anyhow!("{e}"))
}

/// glib's wording of a failed file read, which qemu passes on.
fn read_error(path: &str, e: &std::io::Error) -> String {
    let why = e.raw_os_error().map_or_else(
        || e.to_string(),
        |n| nix::errno::Errno::from_raw(n).desc().to_string(),
    );
    format!("Failed to open file \u{201c}{path}\u{201d}: {why}")
}

/// Object ids are one namespace, whatever the type (qemu's /objects).
fn id_taken(threads: &IoThreads, secrets: &SecretStore, id: &str) -> bool {
    threads.threads.contains_key(id) || secrets.contains(id)
}

/// Create an object from `object-add` arguments or `--object` options.
pub fn add(
    threads: &mut IoThreads,
    secrets: &SecretStore,
    args: Map<String, Value>,
    mode: InputMode,
) -> Result<()> {
    let args = ObjectAddArgs::from_raw(&Raw::new(Value::Object(args), mode))?;
    let id = args.id.clone();
    let duplicate =
        || anyhow!("attempt to add duplicate property '{id}' to object (type 'container')");
    match args.qom_type.as_str() {
        "iothread" => {
            let props: IothreadProps = args.props()?;
            if id_taken(threads, secrets, &id) {
                return Err(duplicate());
            }
            let t =
                IoThread::spawn(&id).map_err(|e| anyhow!("cannot start iothread '{id}': {e}"))?;
            threads.threads.insert(id, (t, props));
            Ok(())
        }
        "secret" => {
            let props: SecretProps = args.props()?;
            let bytes = secret_bytes(secrets, &props)?;
            if id_taken(threads, secrets, &id) {
                return Err(duplicate());
            }
            secrets
                .insert(&id, bytes)
                .map_err(|e| anyhow!("{}", e.message()))
        }
        "secret_keyring" => {
            let props: SecretKeyringProps = args.props()?;
            let bytes = keyring_secret_bytes(secrets, &props)?;
            if id_taken(threads, secrets, &id) {
                return Err(duplicate());
            }
            secrets
                .insert(&id, bytes)
                .map_err(|e| anyhow!("{}", e.message()))
        }
        t if QEMU_OBJECT_TYPES.contains(&t) => {
            bail!("object type '{t}' is not supported by qsd yet")
        }
        t => bail!("Parameter 'qom-type' does not accept value '{t}'"),
    }
}

/// Delete an object. An I/O thread still used by an export, or a secret a
/// node holds, is refused.
pub fn del(threads: &mut IoThreads, secrets: &SecretStore, id: &str, in_use: bool) -> Result<()> {
    if secrets.contains(id) {
        return secrets.remove(id).map_err(|e| anyhow!("{}", e.message()));
    }
    if !threads.threads.contains_key(id) {
        bail!("object '{id}' not found");
    }
    if in_use {
        bail!("object '{id}' is in use and cannot be deleted");
    }
    if let Some((t, _)) = threads.threads.remove(id) {
        t.stop();
    }
    Ok(())
}
