//! Secrets (`--object secret`) as drivers see them: bytes looked up by id at
//! open, zeroised when the last holder lets go, never printed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use zeroize::Zeroizing;

use crate::{Error, ErrorKind, Result};

/// The plain bytes of one secret. `Debug` never shows them.
pub struct Secret {
    bytes: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The secret's bytes (a passphrase or key).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A shared handle on a secret. A node that keeps one keeps the secret "in
/// use": `object-del` refuses to delete it.
pub type SecretRef = Arc<Secret>;

/// The daemon's secrets by id. Cheap to clone; all clones share one table.
#[derive(Debug, Clone, Default)]
pub struct SecretStore(Arc<Mutex<BTreeMap<String, SecretRef>>>);

impl SecretStore {
    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SecretRef>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Add a secret; the id must be new.
    pub fn insert(&self, id: &str, bytes: Zeroizing<Vec<u8>>) -> Result<()> {
        let mut t = self.table();
        if t.contains_key(id) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("attempt to add duplicate property '{id}' to object (type 'container')"),
            ));
        }
        t.insert(id.to_string(), Arc::new(Secret { bytes }));
        Ok(())
    }

    /// Every secret's id, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.table().keys().cloned().collect()
    }

    /// True if a secret `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.table().contains_key(id)
    }

    /// Look a secret up for a driver (qemu's message when it is missing).
    pub fn get(&self, id: &str) -> Result<SecretRef> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::invalid(format!("No secret with id '{id}'")))
    }

    /// Delete a secret; refused while a node holds it.
    pub fn remove(&self, id: &str) -> Result<()> {
        let mut t = self.table();
        let Some(s) = t.get(id) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("object '{id}' not found"),
            ));
        };
        if Arc::strong_count(s) > 1 {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("object '{id}' is in use, can not be deleted"),
            ));
        }
        t.remove(id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn z(b: &[u8]) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(b.to_vec())
    }

    #[test]
    fn test_secret_store_lookup_and_missing() {
        let s = SecretStore::default();
        s.insert("s0", z(b"pw")).unwrap();
        assert_eq!(s.get("s0").unwrap().bytes(), b"pw");
        assert_eq!(s.get("s9").unwrap_err().message(), "No secret with id 's9'");
        assert!(s.insert("s0", z(b"x")).is_err());
    }

    #[test]
    fn test_secret_store_remove_in_use_refused() {
        let s = SecretStore::default();
        s.insert("s0", z(b"pw")).unwrap();
        let held = s.get("s0").unwrap();
        assert!(s.remove("s0").is_err());
        drop(held);
        s.remove("s0").unwrap();
        assert!(!s.contains("s0"));
    }

    #[test]
    fn test_secret_debug_hides_bytes() {
        let s = SecretStore::default();
        s.insert("s0", z(b"hunter2")).unwrap();
        let shown = format!("{:?}", s.get("s0").unwrap());
        assert!(!shown.contains("hunter2"));
    }
}
