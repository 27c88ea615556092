//! A throttle group: one set of buckets shared by every member node, with
//! qemu's scheduling. Per direction, at most one timer is armed in the
//! whole group; when it fires, the member it was armed for (the "token")
//! lets its oldest queued request go, and that request, after counting
//! itself, passes the turn to the next member with queued requests in
//! round-robin order. So members share the budget fairly whatever their
//! queue depths.
//!
//! Timers are tasks sleeping on the runtime where the member's requests
//! run (an I/O thread's), holding only a weak reference to the group.
//! Queued requests wait on a oneshot channel: no polling, no threads.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use serde_json::Value;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::config::{ThrottleConfig, ThrottleGroupProps, ThrottleLimits};
use crate::state::{Direction, ThrottleState};
use crate::Result;

/// A member's queues.
#[derive(Debug, Default)]
struct Member {
    /// Requests waiting for their turn; a closed sender is a request that
    /// was cancelled while queued.
    queues: [VecDeque<oneshot::Sender<()>>; 2],
    /// Requests queued or woken but not yet counted (qemu's `pending_reqs`).
    pending: [usize; 2],
    /// The runtime the member's requests last ran on, for its timers.
    runtime: Option<Handle>,
    /// Drains in progress (qemu's `io_limits_disabled`): requests go at once.
    disabled: usize,
}

/// The armed timer of one direction.
#[derive(Debug)]
struct Timer {
    member: u64,
    generation: u64,
    task: AbortHandle,
}

#[derive(Debug)]
struct Inner {
    ts: ThrottleState,
    members: BTreeMap<u64, Member>,
    next_id: u64,
    /// Per direction: the member whose turn it is.
    tokens: [Option<u64>; 2],
    timers: [Option<Timer>; 2],
    generation: u64,
}

impl Inner {
    fn has_pending(&self, id: u64, dir: Direction) -> bool {
        self.members
            .get(&id)
            .is_some_and(|m| m.pending[dir.index()] > 0)
    }

    fn done_waiting(&mut self, id: u64, dir: Direction) {
        if let Some(m) = self.members.get_mut(&id) {
            m.pending[dir.index()] = m.pending[dir.index()].saturating_sub(1);
        }
    }

    /// Let the oldest live queued request of `id` go; false if none.
    fn restart_queue(&mut self, id: u64, dir: Direction) -> bool {
        let Some(m) = self.members.get_mut(&id) else {
            return false;
        };
        while let Some(tx) = m.queues[dir.index()].pop_front() {
            if tx.send(()).is_ok() {
                return true;
            }
        }
        false
    }

    /// The next member after the current token with queued requests, in
    /// round-robin order (the token itself last); `tgm` if there is none.
    fn next_token(&self, tgm: u64, dir: Direction) -> u64 {
        let start = self.tokens[dir.index()].unwrap_or(tgm);
        let after = self.members.range(start.saturating_add(1)..);
        let before = self.members.range(..=start);
        after
            .chain(before)
            .map(|(id, _)| *id)
            .find(|id| self.has_pending(*id, dir))
            .unwrap_or(tgm)
    }
}

/// A `throttle-group` object.
pub struct ThrottleGroup {
    me: Weak<ThrottleGroup>,
    origin: Instant,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for ThrottleGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never block here: a Debug print may happen with the lock held.
        let limits = self
            .inner
            .try_lock()
            .ok()
            .map(|i| i.ts.config().to_limits());
        f.debug_struct("ThrottleGroup")
            .field("limits", &limits)
            .finish()
    }
}

impl ThrottleGroup {
    /// A group with `limits` (absent members are 0, burst lengths 1).
    pub fn new(limits: &ThrottleLimits) -> Result<Arc<Self>> {
        let mut cfg = ThrottleConfig::default();
        cfg.apply_limits(limits)?;
        Ok(Self::with_config(cfg))
    }

    /// A group from `object-add` / `--object` properties.
    pub fn from_props(props: &ThrottleGroupProps) -> Result<Arc<Self>> {
        Ok(Self::with_config(props.to_config()?))
    }

    /// A group with a configuration already validated.
    pub fn with_config(cfg: ThrottleConfig) -> Arc<Self> {
        Arc::new_cyclic(|me| ThrottleGroup {
            me: me.clone(),
            origin: Instant::now(),
            inner: Mutex::new(Inner {
                ts: ThrottleState::new(cfg, 0),
                members: BTreeMap::new(),
                next_id: 0,
                tokens: [None, None],
                timers: [None, None],
                generation: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The current limits, every member set (qemu's `qom-get` of `limits`).
    pub fn limits(&self) -> ThrottleLimits {
        self.lock().ts.config().to_limits()
    }

    /// The current configuration (levels included).
    pub fn config(&self) -> ThrottleConfig {
        self.lock().ts.config().clone()
    }

    /// `qom-get` of a group property: `limits`, or one `x-` member.
    pub fn property(&self, name: &str) -> Option<Value> {
        let inner = self.lock();
        let cfg = inner.ts.config();
        if name == "limits" {
            return Some(cfg.to_json());
        }
        cfg.param(name.strip_prefix("x-")?).map(Value::from)
    }

    /// Change the limits at run time (`qom-set` of `limits`): members of
    /// `limits` that are absent keep their value. Buckets start empty, and
    /// a request waiting for a timer re-evaluates at once under the new
    /// limits; no request is dropped.
    pub fn set_limits(&self, limits: &ThrottleLimits) -> Result<()> {
        let mut inner = self.lock();
        let mut cfg = inner.ts.config().clone();
        cfg.apply_limits(limits)?;
        let now = self.now();
        inner.ts.configure(cfg, now);
        for dir in Direction::ALL {
            if let Some(t) = inner.timers[dir.index()].take() {
                t.task.abort();
                self.fire(&mut inner, t.member, dir);
            }
        }
        Ok(())
    }

    /// Number of member nodes.
    pub fn member_count(&self) -> usize {
        self.lock().members.len()
    }

    /// Join the group (a `throttle` node opening).
    pub fn join(self: &Arc<Self>) -> GroupMember {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.members.insert(id, Member::default());
        GroupMember {
            group: self.clone(),
            id,
        }
    }

    fn leave(&self, id: u64) {
        let mut inner = self.lock();
        let Some(mut m) = inner.members.remove(&id) else {
            return;
        };
        // Nothing should be queued after a drain; let stragglers go.
        for q in &mut m.queues {
            for tx in q.drain(..) {
                let _ = tx.send(());
            }
        }
        for dir in Direction::ALL {
            let d = dir.index();
            if inner.tokens[d] == Some(id) {
                inner.tokens[d] = None;
            }
            if inner.timers[d].as_ref().is_some_and(|t| t.member == id) {
                if let Some(t) = inner.timers[d].take() {
                    t.task.abort();
                }
                // Hand the turn to the other members.
                self.schedule_next(&mut inner, id, dir);
            }
        }
    }

    /// Arm the direction's timer for `member`, `delay_ns` from now. False
    /// when there is no runtime to run it on.
    fn arm(&self, inner: &mut Inner, member: u64, dir: Direction, delay_ns: u64) -> bool {
        let runtime = inner
            .members
            .get(&member)
            .and_then(|m| m.runtime.clone())
            .or_else(|| Handle::try_current().ok());
        let Some(runtime) = runtime else {
            return false;
        };
        inner.generation += 1;
        let generation = inner.generation;
        let deadline = Instant::now() + Duration::from_nanos(delay_ns);
        let weak = self.me.clone();
        let task = runtime.spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(group) = weak.upgrade() {
                group.timer_fired(dir, generation);
            }
        });
        inner.timers[dir.index()] = Some(Timer {
            member,
            generation,
            task: task.abort_handle(),
        });
        true
    }

    fn timer_fired(&self, dir: Direction, generation: u64) {
        let mut inner = self.lock();
        let d = dir.index();
        if inner.timers[d]
            .as_ref()
            .is_none_or(|t| t.generation != generation)
        {
            return;
        }
        if let Some(t) = inner.timers[d].take() {
            self.fire(&mut inner, t.member, dir);
        }
    }

    /// What a timer does when it fires: the member's oldest request goes;
    /// if it has none, the turn passes on.
    fn fire(&self, inner: &mut Inner, member: u64, dir: Direction) {
        if !inner.restart_queue(member, dir) {
            self.schedule_next(inner, member, dir);
        }
    }

    /// qemu's `throttle_group_schedule_timer`: true if a request of
    /// `member` must wait (a timer is armed, possibly just now).
    fn schedule_timer(&self, inner: &mut Inner, member: u64, dir: Direction) -> bool {
        if inner.timers[dir.index()].is_some() {
            return true;
        }
        let wait = inner.ts.wait_at(dir, self.now());
        if wait == 0 || !self.arm(inner, member, dir, wait) {
            return false;
        }
        inner.tokens[dir.index()] = Some(member);
        true
    }

    /// qemu's `schedule_next_request`: after a request of `tgm` went (or
    /// gave up), let the next member in turn with queued requests go, now
    /// or when its timer fires.
    fn schedule_next(&self, inner: &mut Inner, tgm: u64, dir: Direction) {
        let mut token = inner.next_token(tgm, dir);
        if !inner.has_pending(token, dir) {
            return;
        }
        if self.schedule_timer(inner, token, dir) {
            return;
        }
        // It may go now. Prefer the member that just ran, as qemu does;
        // otherwise the token's request goes from a timer due now.
        if inner.restart_queue(tgm, dir) {
            token = tgm;
        } else if !self.arm(inner, token, dir, 0) {
            inner.restart_queue(token, dir);
        }
        inner.tokens[dir.index()] = Some(token);
    }

    /// Wait until a request of `bytes` by member `id` may go, and count it.
    async fn intercept(&self, id: u64, dir: Direction, bytes: u64) {
        let rx = {
            let mut inner = self.lock();
            if let (Some(m), Ok(h)) = (inner.members.get_mut(&id), Handle::try_current()) {
                m.runtime = Some(h);
            }
            if inner.members.get(&id).is_some_and(|m| m.disabled > 0) {
                inner.ts.account(dir, bytes);
                return;
            }
            let must_wait = self.schedule_timer(&mut inner, id, dir);
            let queue = (must_wait || inner.has_pending(id, dir))
                .then(|| inner.members.get_mut(&id))
                .flatten();
            match queue {
                Some(m) => {
                    let (tx, rx) = oneshot::channel();
                    m.pending[dir.index()] += 1;
                    m.queues[dir.index()].push_back(tx);
                    rx
                }
                None => {
                    inner.ts.account(dir, bytes);
                    self.schedule_next(&mut inner, id, dir);
                    return;
                }
            }
        };
        let mut waiting = Waiting {
            group: self,
            id,
            dir,
            rx,
            finished: false,
        };
        // An error means the group let every request go (member left).
        let _ = (&mut waiting.rx).await;
        waiting.finished = true;
        let mut inner = self.lock();
        inner.done_waiting(id, dir);
        inner.ts.account(dir, bytes);
        self.schedule_next(&mut inner, id, dir);
    }
}

/// A queued request; if it is dropped (the request was cancelled) before
/// it ran, it leaves the queue and, if its turn had come, passes it on.
struct Waiting<'a> {
    group: &'a ThrottleGroup,
    id: u64,
    dir: Direction,
    rx: oneshot::Receiver<()>,
    finished: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut inner = self.group.lock();
        // Under the lock no one sends concurrently: after `close`, either
        // the wake-up already arrived or it never will.
        self.rx.close();
        let woken = self.rx.try_recv().is_ok();
        inner.done_waiting(self.id, self.dir);
        if woken {
            self.group.schedule_next(&mut inner, self.id, self.dir);
        }
    }
}

/// One node's membership of a group; leaving happens on drop.
#[derive(Debug)]
pub struct GroupMember {
    group: Arc<ThrottleGroup>,
    id: u64,
}

impl GroupMember {
    /// The group.
    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }

    /// A drain of the member's node begins: its queued requests go now, and
    /// new ones do not wait, until [`GroupMember::end_drain`]. Nests.
    pub fn begin_drain(&self) {
        let mut inner = self.group.lock();
        let Some(m) = inner.members.get_mut(&self.id) else {
            return;
        };
        m.disabled += 1;
        for q in &mut m.queues {
            for tx in q.drain(..) {
                let _ = tx.send(());
            }
        }
    }

    /// The drain is over: limits apply again.
    pub fn end_drain(&self) {
        let mut inner = self.group.lock();
        if let Some(m) = inner.members.get_mut(&self.id) {
            m.disabled = m.disabled.saturating_sub(1);
        }
    }

    /// Wait until a request of `bytes` in `dir` may go under the group's
    /// limits, and count it. Cancel-safe.
    pub async fn throttle(&self, dir: Direction, bytes: u64) {
        self.group.intercept(self.id, dir, bytes).await;
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        self.group.leave(self.id);
    }
}

#[cfg(test)]
#[path = "group_tests.rs"]
mod tests;
