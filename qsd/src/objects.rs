//! `--object` / `object-add` / `object-del`. Only `iothread` exists so far;
//! other qemu object types are refused with a clear message.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use qsd_qapi::options::{IothreadProps, ObjectAddArgs};
use qsd_qapi::{InputMode, Raw};
use qsd_rt::IoThread;
use serde_json::{json, Map, Value};

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

/// Create an object from `object-add` arguments or `--object` options.
pub fn add(threads: &mut IoThreads, args: Map<String, Value>, mode: InputMode) -> Result<()> {
    let args = ObjectAddArgs::from_raw(&Raw::new(Value::Object(args), mode))?;
    let id = args.id.clone();
    match args.qom_type.as_str() {
        "iothread" => {
            let props: IothreadProps = args.props()?;
            if threads.threads.contains_key(&id) {
                bail!("attempt to add duplicate property '{id}' to object (type 'container')");
            }
            let t =
                IoThread::spawn(&id).map_err(|e| anyhow!("cannot start iothread '{id}': {e}"))?;
            threads.threads.insert(id, (t, props));
            Ok(())
        }
        t if QEMU_OBJECT_TYPES.contains(&t) => {
            bail!("object type '{t}' is not supported by qsd yet")
        }
        t => bail!("Parameter 'qom-type' does not accept value '{t}'"),
    }
}

/// Delete an object. An I/O thread still used by an export is refused.
pub fn del(threads: &mut IoThreads, id: &str, in_use: bool) -> Result<()> {
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
