//! `--object` / `object-add` / `object-del`: `iothread`, `secret`,
//! `secret_keyring` and `throttle-group`; other qemu object types are
//! refused with a clear message. Ids are one namespace (qemu's /objects).

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use qsd_block::{ObjectStore, SecretStore};
use qsd_luks::secret::{decode_secret, SecretFormat};
use qsd_qapi::options::{IothreadProps, ObjectAddArgs};
use qsd_qapi::{InputMode, Raw};
use qsd_rt::IoThread;
use qsd_throttle::{ThrottleConfig, ThrottleGroup, ThrottleGroupProps};
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

    /// Every thread's id, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.threads.keys().cloned().collect()
    }

    /// The properties thread `id` was created with (for `qom-get`).
    pub fn props(&self, id: &str) -> Option<IothreadProps> {
        self.threads.get(id).map(|(_, p)| *p)
    }

    /// Replace the recorded properties of thread `id` (`qom-set`); false
    /// if there is no such thread.
    pub fn set_props(&mut self, id: &str, props: IothreadProps) -> bool {
        match self.threads.get_mut(id) {
            Some((_, p)) => {
                *p = props;
                true
            }
            None => false,
        }
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

/// The daemon's object tables, which share one id namespace.
#[derive(Debug)]
pub struct Tables<'a> {
    /// `iothread` objects.
    pub threads: &'a mut IoThreads,
    /// `secret` and `secret_keyring` objects.
    pub secrets: &'a SecretStore,
    /// Objects drivers look up (`throttle-group`).
    pub objects: &'a ObjectStore,
}

impl Tables<'_> {
    /// Object ids are one namespace, whatever the type (qemu's /objects).
    fn id_taken(&self, id: &str) -> bool {
        self.threads.threads.contains_key(id)
            || self.secrets.contains(id)
            || self.objects.contains(id)
    }
}

/// The QOM type of object `id`, if it exists. Secrets do not remember
/// whether they came from the keyring and report `secret`.
pub fn qom_type(
    threads: &IoThreads,
    secrets: &SecretStore,
    objects: &ObjectStore,
    id: &str,
) -> Option<&'static str> {
    if threads.threads.contains_key(id) {
        Some("iothread")
    } else if secrets.contains(id) {
        Some("secret")
    } else {
        objects.qom_type(id)
    }
}

/// A new `throttle-group` in qemu's order of checks: property values
/// (and `limits`, which qemu validates when it is set), then the id, then
/// the whole configuration.
fn add_throttle_group(t: &Tables<'_>, id: &str, props: &ThrottleGroupProps) -> Result<()> {
    let mut cfg = ThrottleConfig::default();
    for (name, v) in props.x_entries() {
        cfg.set_x_property(name, v)?;
    }
    if let Some(l) = &props.limits {
        cfg.apply_limits(l)?;
    }
    if t.id_taken(id) {
        bail!("attempt to add duplicate property '{id}' to object (type 'container')");
    }
    cfg.validate()?;
    t.objects
        .insert(id, qsd_throttle::QOM_TYPE, ThrottleGroup::with_config(cfg))
        .map_err(|e| anyhow!("{}", e.message()))
}

/// Create an object from `object-add` arguments or `--object` options.
pub fn add(t: Tables<'_>, args: Map<String, Value>, mode: InputMode) -> Result<()> {
    let args = ObjectAddArgs::from_raw(&Raw::new(Value::Object(args), mode))?;
    let id = args.id.clone();
    let duplicate =
        || anyhow!("attempt to add duplicate property '{id}' to object (type 'container')");
    match args.qom_type.as_str() {
        "iothread" => {
            let props: IothreadProps = args.props()?;
            if t.id_taken(&id) {
                return Err(duplicate());
            }
            let thread =
                IoThread::spawn(&id).map_err(|e| anyhow!("cannot start iothread '{id}': {e}"))?;
            t.threads.threads.insert(id, (thread, props));
            Ok(())
        }
        "secret" => {
            let props: SecretProps = args.props()?;
            let bytes = secret_bytes(t.secrets, &props)?;
            if t.id_taken(&id) {
                return Err(duplicate());
            }
            t.secrets
                .insert(&id, bytes)
                .map_err(|e| anyhow!("{}", e.message()))
        }
        "secret_keyring" => {
            let props: SecretKeyringProps = args.props()?;
            let bytes = keyring_secret_bytes(t.secrets, &props)?;
            if t.id_taken(&id) {
                return Err(duplicate());
            }
            t.secrets
                .insert(&id, bytes)
                .map_err(|e| anyhow!("{}", e.message()))
        }
        "throttle-group" => add_throttle_group(&t, &id, &args.props()?),
        other if QEMU_OBJECT_TYPES.contains(&other) => {
            bail!("object type '{other}' is not supported by qsd yet")
        }
        other => bail!("Parameter 'qom-type' does not accept value '{other}'"),
    }
}

/// Delete an object. An I/O thread still used by an export (`in_use`), or
/// a secret or throttle group a node holds, is refused.
pub fn del(t: Tables<'_>, id: &str, in_use: bool) -> Result<()> {
    if t.secrets.contains(id) {
        return t.secrets.remove(id).map_err(|e| anyhow!("{}", e.message()));
    }
    if t.objects.contains(id) {
        return t.objects.remove(id).map_err(|e| anyhow!("{}", e.message()));
    }
    if !t.threads.threads.contains_key(id) {
        bail!("object '{id}' not found");
    }
    if in_use {
        bail!("object '{id}' is in use and cannot be deleted");
    }
    if let Some((thread, _)) = t.threads.threads.remove(id) {
        thread.stop();
    }
    Ok(())
}
