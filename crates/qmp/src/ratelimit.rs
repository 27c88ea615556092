//! qemu's rate limit for noisy events: at most one `QUORUM_REPORT_BAD` per
//! second for each node (`node-name`), one `QUORUM_FAILURE` per second. The
//! first event of a burst goes out at once; while the period runs, later
//! ones replace each other and the last one is sent when it ends (with the
//! timestamp of when it happened), which starts a new period.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::broadcast;

/// Period of the rate-limited events (qemu's 1000 ms).
const PERIOD: Duration = Duration::from_secs(1);

/// The key that event `name` is limited by, or `None` if it is not limited:
/// qemu limits some events per member value, others as a whole.
pub(crate) fn limit_key(name: &str, data: &Value) -> Option<String> {
    let member = match name {
        "QUORUM_REPORT_BAD" => "node-name",
        "QUORUM_FAILURE" => return Some(name.to_owned()),
        _ => return None,
    };
    let value = data.get(member).and_then(Value::as_str).unwrap_or("");
    Some(format!("{name}\0{value}"))
}

#[derive(Debug)]
struct Slot {
    until: Instant,
    held: Option<Arc<Value>>,
}

/// The bookkeeping, with time passed in.
#[derive(Debug, Default)]
pub(crate) struct Limiter {
    slots: HashMap<String, Slot>,
}

impl Limiter {
    /// An event arrives: returns it if it is to be sent now, else holds it.
    pub(crate) fn offer(
        &mut self,
        key: String,
        msg: Arc<Value>,
        now: Instant,
    ) -> Option<Arc<Value>> {
        if let Some(slot) = self.slots.get_mut(&key) {
            slot.held = Some(msg);
            return None;
        }
        self.slots.insert(
            key,
            Slot {
                until: now + PERIOD,
                held: None,
            },
        );
        Some(msg)
    }

    /// Close the periods that ended by `now`: their held events are due
    /// (and start a new period); idle ones are forgotten.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Arc<Value>> {
        let mut due = Vec::new();
        self.slots.retain(|_, slot| {
            if slot.until > now {
                return true;
            }
            match slot.held.take() {
                Some(msg) => {
                    due.push(msg);
                    slot.until = now + PERIOD;
                    true
                }
                None => false,
            }
        });
        due
    }

    /// When the next period ends.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.slots.values().map(|s| s.until).min()
    }
}

/// The limiter shared by an event bus and its timer thread.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<(Limiter, bool)>,
    wake: Condvar,
    tx: broadcast::Sender<Arc<Value>>,
}

impl Shared {
    pub(crate) fn new(tx: broadcast::Sender<Arc<Value>>) -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new((Limiter::default(), false)),
            wake: Condvar::new(),
            tx,
        })
    }

    /// Send `msg` now or hold it, starting the timer thread on first use.
    pub(crate) fn offer(self: &Arc<Self>, key: String, msg: Arc<Value>) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(now) = st.0.offer(key, msg, Instant::now()) {
            let _ = self.tx.send(now);
        }
        if !st.1 {
            let weak = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("qmp-event-limit".into())
                .spawn(move || run_timer(weak));
            match spawned {
                Ok(_) => st.1 = true,
                Err(e) => tracing::warn!("cannot start the event rate-limit timer: {e}"),
            }
        }
        self.wake.notify_one();
    }
}

/// Send held events when their period ends; stops once the bus is gone.
fn run_timer(weak: Weak<Shared>) {
    while let Some(shared) = weak.upgrade() {
        let mut st = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        for msg in st.0.expire(Instant::now()) {
            let _ = shared.tx.send(msg);
        }
        // Wake at least once a second so a dropped bus ends the thread.
        let wait =
            st.0.next_deadline()
                .map_or(PERIOD, |d| d.saturating_duration_since(Instant::now()))
                .min(PERIOD);
        drop(shared.wake.wait_timeout(st, wait));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(n: u64) -> Arc<Value> {
        Arc::new(json!({ "n": n }))
    }

    #[test]
    fn test_limit_key_per_node_for_report_bad() {
        let a = limit_key("QUORUM_REPORT_BAD", &json!({"node-name": "a"}));
        let b = limit_key("QUORUM_REPORT_BAD", &json!({"node-name": "b"}));
        assert!(a.is_some() && a != b);
        assert!(limit_key("QUORUM_FAILURE", &json!({"reference": "q"})).is_some());
        assert_eq!(limit_key("BLOCK_EXPORT_DELETED", &json!({})), None);
    }

    #[test]
    fn test_limiter_sends_first_holds_last_of_burst() {
        let t0 = Instant::now();
        let mut l = Limiter::default();
        assert_eq!(l.offer("k".into(), msg(1), t0), Some(msg(1)));
        assert_eq!(l.offer("k".into(), msg(2), t0), None);
        assert_eq!(l.offer("k".into(), msg(3), t0), None);
        // Another key is independent.
        assert_eq!(l.offer("j".into(), msg(9), t0), Some(msg(9)));
        assert!(l.expire(t0 + Duration::from_millis(500)).is_empty());
        let due = l.expire(t0 + PERIOD);
        assert_eq!(due, vec![msg(3)]);
        // The held event started a new period: the next one waits again.
        assert_eq!(l.offer("k".into(), msg(4), t0 + PERIOD), None);
        assert_eq!(l.expire(t0 + PERIOD * 2), vec![msg(4)]);
        // A quiet period forgets the key: the next event goes at once.
        assert!(l.expire(t0 + PERIOD * 3).is_empty());
        assert_eq!(l.next_deadline(), None);
        assert_eq!(l.offer("k".into(), msg(5), t0 + PERIOD * 3), Some(msg(5)));
    }
}
