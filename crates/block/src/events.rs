//! A handle drivers use to raise QMP events (BLOCK_IMAGE_CORRUPTED, ...)
//! without knowing about monitors.

use std::sync::Arc;

use serde_json::Value;

type EmitFn = dyn Fn(&str, Value) + Send + Sync;

/// Where events go. The default sink drops them (unit tests, tools).
#[derive(Clone, Default)]
pub struct EventSink(Option<Arc<EmitFn>>);

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "EventSink(connected)"
        } else {
            "EventSink(none)"
        })
    }
}

impl EventSink {
    /// A sink that hands every event to `emit`.
    pub fn new(emit: impl Fn(&str, Value) + Send + Sync + 'static) -> Self {
        EventSink(Some(Arc::new(emit)))
    }

    /// Raise event `name` with `data`.
    pub fn emit(&self, name: &str, data: Value) {
        if let Some(f) = &self.0 {
            f(name, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn test_event_sink_default_drops_and_connected_delivers() {
        EventSink::default().emit("X", Value::Null);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let sink = EventSink::new(move |n, _| s2.lock().unwrap().push(n.to_string()));
        sink.clone().emit("BLOCK_IMAGE_CORRUPTED", Value::Null);
        assert_eq!(*seen.lock().unwrap(), vec!["BLOCK_IMAGE_CORRUPTED"]);
    }
}
