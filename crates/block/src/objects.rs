//! User-creatable objects that drivers look up by id at open time (for
//! example a `throttle-group` that several `throttle` nodes share). The
//! daemon owns the table; a node that keeps the `Arc` it got keeps the
//! object "in use", so `object-del` refuses to delete it, as qemu does.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::{Error, ErrorKind, Result};

/// One stored object: its QOM type name and the value.
#[derive(Clone)]
struct Entry {
    qom_type: &'static str,
    value: Arc<dyn Any + Send + Sync>,
}

/// The daemon's objects by id. Cheap to clone; all clones share one table.
#[derive(Clone, Default)]
pub struct ObjectStore(Arc<Mutex<BTreeMap<String, Entry>>>);

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.table();
        f.debug_map()
            .entries(t.iter().map(|(k, e)| (k, e.qom_type)))
            .finish()
    }
}

impl ObjectStore {
    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Add object `id` of QOM type `qom_type`; the id must be new.
    pub fn insert<T: Any + Send + Sync>(
        &self,
        id: &str,
        qom_type: &'static str,
        value: Arc<T>,
    ) -> Result<()> {
        let mut t = self.table();
        if t.contains_key(id) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("attempt to add duplicate property '{id}' to object (type 'container')"),
            ));
        }
        t.insert(id.to_string(), Entry { qom_type, value });
        Ok(())
    }

    /// True if an object `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.table().contains_key(id)
    }

    /// Every object's id and QOM type, by id.
    pub fn ids(&self) -> Vec<(String, &'static str)> {
        self.table()
            .iter()
            .map(|(id, e)| (id.clone(), e.qom_type))
            .collect()
    }

    /// The QOM type of object `id`, if there is one.
    pub fn qom_type(&self, id: &str) -> Option<&'static str> {
        self.table().get(id).map(|e| e.qom_type)
    }

    /// Object `id` as a `T`, or `None` if there is no such object or it is
    /// of another type.
    pub fn get<T: Any + Send + Sync>(&self, id: &str) -> Option<Arc<T>> {
        let value = self.table().get(id)?.value.clone();
        value.downcast::<T>().ok()
    }

    /// Every object of type `T`, with its id.
    pub fn all<T: Any + Send + Sync>(&self) -> Vec<(String, Arc<T>)> {
        self.table()
            .iter()
            .filter_map(|(id, e)| Some((id.clone(), e.value.clone().downcast::<T>().ok()?)))
            .collect()
    }

    /// Delete object `id`; refused while someone else holds it.
    pub fn remove(&self, id: &str) -> Result<()> {
        let mut t = self.table();
        let Some(e) = t.get(id) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("object '{id}' not found"),
            ));
        };
        if Arc::strong_count(&e.value) > 1 {
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

    #[test]
    fn test_object_store_typed_lookup() {
        let s = ObjectStore::default();
        s.insert("g0", "throttle-group", Arc::new(7u32)).unwrap();
        assert_eq!(*s.get::<u32>("g0").unwrap(), 7);
        assert!(s.get::<String>("g0").is_none());
        assert!(s.get::<u32>("g1").is_none());
        assert_eq!(s.qom_type("g0"), Some("throttle-group"));
        assert!(s.insert("g0", "throttle-group", Arc::new(1u32)).is_err());
        assert_eq!(s.all::<u32>().len(), 1);
    }

    #[test]
    fn test_object_store_remove_in_use_refused() {
        let s = ObjectStore::default();
        s.insert("g0", "throttle-group", Arc::new(1u8)).unwrap();
        let held = s.get::<u8>("g0").unwrap();
        assert_eq!(
            s.remove("g0").unwrap_err().message(),
            "object 'g0' is in use, can not be deleted"
        );
        drop(held);
        s.remove("g0").unwrap();
        assert!(!s.contains("g0"));
        assert!(s.remove("g0").is_err());
    }
}
