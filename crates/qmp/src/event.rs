//! Asynchronous events, broadcast to every negotiated monitor.
//!
//! A bounded broadcast channel: emitting never blocks, whatever the clients
//! do. A session that falls more than the channel's capacity behind (a client
//! that stops reading while events keep coming) is disconnected with a
//! warning rather than silently missing events: a client waiting for, say, a
//! job's completion would otherwise hang forever. qemu instead buffers
//! without bound.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

/// Default number of events a session may fall behind before it is dropped.
pub const DEFAULT_EVENT_BACKLOG: usize = 4096;

/// Handle for emitting events; clones share one channel.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Value>>,
    limited: Arc<crate::ratelimit::Shared>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus with the default backlog.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_EVENT_BACKLOG)
    }

    /// A bus where a session may fall `capacity` events behind.
    pub fn with_capacity(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        let limited = crate::ratelimit::Shared::new(tx.clone());
        Self { tx, limited }
    }

    /// Emit event `name` now.
    ///
    /// Pass `Value::Null` for an event without data: the `data` member is
    /// then left out, as qemu does for events that have no arguments. Every
    /// event qemu-storage-daemon defines has arguments, so normally `data`
    /// is an object (possibly empty, which is sent as `{}`).
    /// `QUORUM_REPORT_BAD` and `QUORUM_FAILURE` are rate limited as in
    /// qemu (see [`crate::ratelimit`]).
    pub fn emit(&self, name: &str, data: Value) {
        let key = crate::ratelimit::limit_key(name, &data);
        let message = event_message(name, data, SystemTime::now());
        tracing::debug!(event = name, "emitting QMP event");
        if let Some(key) = key {
            self.limited.offer(key, Arc::new(message));
            return;
        }
        // No receivers is fine: nobody is listening.
        let _ = self.tx.send(Arc::new(message));
    }

    /// A receiver for events emitted from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Value>> {
        self.tx.subscribe()
    }

    /// Number of subscribed (negotiated) sessions.
    pub fn receiver_count(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// The wire form of an event emitted at `when`.
pub fn event_message(name: &str, data: Value, when: SystemTime) -> Value {
    let since = when.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut map = Map::new();
    map.insert("event".to_owned(), Value::String(name.to_owned()));
    map.insert(
        "timestamp".to_owned(),
        json!({"seconds": since.as_secs(), "microseconds": since.subsec_micros()}),
    );
    if !data.is_null() {
        map.insert("data".to_owned(), data);
    }
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::to_json;
    use std::time::Duration;

    #[test]
    fn test_event_message_layout_matches_qemu() {
        let when = UNIX_EPOCH + Duration::from_micros(1_795_237_321_620_458);
        let v = event_message("BLOCK_EXPORT_DELETED", json!({"id": "e0"}), when);
        assert_eq!(
            to_json(&v, false),
            r#"{"timestamp": {"seconds": 1795237321, "microseconds": 620458}, "event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}}"#
        );
    }

    #[test]
    fn test_event_message_null_data_is_omitted() {
        let v = event_message("X", Value::Null, UNIX_EPOCH);
        assert!(v.get("data").is_none());
        let v = event_message("X", json!({}), UNIX_EPOCH);
        assert_eq!(v.get("data"), Some(&json!({})));
    }
}
