//! blkdebug's rule engine, free of I/O: a state number, the rules keyed by
//! debug event, and the list of armed ("active") error rules.
//!
//! qemu's semantics, which test configurations rely on:
//! - the state starts at 1; a rule's `state` of 0 means "in any state";
//! - when an event fires, every rule of that event whose state matches is
//!   taken; if any of them injects errors, they replace the armed list (in
//!   the order the rules were added); a matching set-state rule changes the
//!   state once all rules were looked at (the first added wins), so all
//!   rules of one event see the state from before it fired;
//! - an armed rule fails every later request it matches (I/O type, and the
//!   sector if one is given) until another event re-arms the list; `once`
//!   deletes the rule after its first error; `errno` 0 matches but fails
//!   nothing.

use qsd_block::DebugEvent;
use serde::Deserialize;

/// The kinds of request an error rule can fail (qemu's `BlkdebugIOType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes (including zero buffers written as a write-zeroes fallback).
    Write,
    /// Write-zeroes requests.
    WriteZeroes,
    /// Discards.
    Discard,
    /// Flushes.
    Flush,
    /// Block-status queries.
    BlockStatus,
}

impl IoType {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The type called `name` in options and config files.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
    }

    /// The name used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::WriteZeroes => "write-zeroes",
            IoType::Discard => "discard",
            IoType::Flush => "flush",
            IoType::BlockStatus => "block-status",
        }
    }
}

/// The I/O types a rule without `iotype` fails: all but block-status.
const DEFAULT_IOTYPES: u8 = (1 << IoType::Read as u8)
    | (1 << IoType::Write as u8)
    | (1 << IoType::WriteZeroes as u8)
    | (1 << IoType::Discard as u8)
    | (1 << IoType::Flush as u8);

/// An `inject-error` rule as given (defaults not yet applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectSpec {
    /// The event that arms the rule.
    pub event: DebugEvent,
    /// The state the event must fire in (None or 0: any).
    pub state: Option<i64>,
    /// Only this kind of request (None: all but block-status).
    pub iotype: Option<IoType>,
    /// The error (None: EIO).
    pub errno: Option<i64>,
    /// Only requests touching this 512-byte sector (None or -1: any).
    pub sector: Option<i64>,
    /// Delete the rule after its first error.
    pub once: Option<bool>,
    /// Fail without first yielding to other tasks.
    pub immediately: Option<bool>,
}

/// A `set-state` rule as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetStateSpec {
    /// The event that changes the state.
    pub event: DebugEvent,
    /// The state the event must fire in (None or 0: any).
    pub state: Option<i64>,
    /// The state afterwards.
    pub new_state: i64,
}

/// What an error rule does once armed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inject {
    errno: i32,
    once: bool,
    immediately: bool,
    /// Byte offset the request must cover; None for any request.
    offset: Option<u64>,
    iotypes: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Inject(Inject),
    SetState(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    id: u64,
    event: DebugEvent,
    /// 0 = any state.
    state: i64,
    action: Action,
}

/// An error a request must fail with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    /// The errno (positive).
    pub errno: i32,
    /// Fail at once rather than after yielding.
    pub immediately: bool,
}

/// The rules of one blkdebug node and its state.
#[derive(Debug, Clone)]
pub struct RuleEngine {
    state: i64,
    /// In the order the rules were added.
    rules: Vec<Rule>,
    /// Ids of the armed error rules, in the order they are tried.
    active: Vec<u64>,
}

impl RuleEngine {
    /// An engine in state 1 with error rules `inject` and state rules
    /// `set_state`, each in the order given (config file first, then options).
    pub fn new(inject: &[InjectSpec], set_state: &[SetStateSpec]) -> Self {
        let mut rules = Vec::with_capacity(inject.len() + set_state.len());
        for spec in inject {
            // As qemu: the sector is multiplied out, -1 meaning any.
            let offset = match spec.sector.unwrap_or(-1) {
                -1 => None,
                s => Some((s as u64).wrapping_mul(512)),
            };
            let action = Action::Inject(Inject {
                // qemu keeps the errno in a C int.
                errno: spec.errno.unwrap_or(libc_eio()) as i32,
                once: spec.once.unwrap_or(false),
                immediately: spec.immediately.unwrap_or(false),
                offset,
                iotypes: spec.iotype.map_or(DEFAULT_IOTYPES, IoType::bit),
            });
            rules.push((spec.event, spec.state, action));
        }
        for spec in set_state {
            rules.push((spec.event, spec.state, Action::SetState(spec.new_state)));
        }
        let rules = rules
            .into_iter()
            .zip(0u64..)
            .map(|((event, state, action), id)| Rule {
                id,
                event,
                state: state.unwrap_or(0),
                action,
            })
            .collect();
        RuleEngine {
            state: 1,
            rules,
            active: Vec::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> i64 {
        self.state
    }

    /// Number of rules left (`once` rules are deleted when they fire).
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Event `ev` happened: arm its error rules and apply its state change.
    pub fn fire(&mut self, ev: DebugEvent) {
        let state = self.state;
        let matching = self
            .rules
            .iter()
            .filter(|r| r.event == ev && (r.state == 0 || r.state == state));
        let mut armed = Vec::new();
        let mut new_state = None;
        for rule in matching {
            match rule.action {
                Action::Inject(_) => armed.push(rule.id),
                Action::SetState(s) => {
                    new_state.get_or_insert(s);
                }
            }
        }
        if !armed.is_empty() {
            self.active = armed;
        }
        if let Some(s) = new_state {
            self.state = s;
        }
    }

    /// A request of `iotype` on `bytes` bytes at `offset` is about to run:
    /// the error it must fail with, if an armed rule matches it.
    pub fn check(&mut self, offset: u64, bytes: u64, iotype: IoType) -> Option<Injection> {
        let (pos, id, inject) = self.active.iter().enumerate().find_map(|(pos, id)| {
            let rule = self.rules.iter().find(|r| r.id == *id)?;
            let Action::Inject(inj) = &rule.action else {
                return None;
            };
            let covers = inj
                .offset
                .is_none_or(|at| bytes != 0 && at >= offset && at - offset < bytes);
            (covers && inj.iotypes & iotype.bit() != 0).then(|| (pos, *id, inj.clone()))
        })?;
        // The first matching rule decides, even one whose errno is 0.
        if inject.errno == 0 {
            return None;
        }
        if inject.once {
            self.active.remove(pos);
            self.rules.retain(|r| r.id != id);
        }
        // qemu returns -errno; a negative errno turns into a non-error.
        (inject.errno > 0).then_some(Injection {
            errno: inject.errno,
            immediately: inject.immediately,
        })
    }
}

fn libc_eio() -> i64 {
    i64::from(qsd_block::error::libc_errno::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject(event: DebugEvent) -> InjectSpec {
        InjectSpec {
            event,
            state: None,
            iotype: None,
            errno: None,
            sector: None,
            once: None,
            immediately: None,
        }
    }

    fn set(event: DebugEvent, state: Option<i64>, new_state: i64) -> SetStateSpec {
        SetStateSpec {
            event,
            state,
            new_state,
        }
    }

    #[test]
    fn test_check_before_event_finds_nothing() {
        let mut e = RuleEngine::new(&[inject(DebugEvent::ReadAio)], &[]);
        assert_eq!(e.check(0, 512, IoType::Read), None);
        e.fire(DebugEvent::WriteAio);
        assert_eq!(e.check(0, 512, IoType::Read), None);
    }

    #[test]
    fn test_armed_rule_fails_every_request_until_rearmed() {
        let mut e = RuleEngine::new(&[inject(DebugEvent::ReadAio)], &[]);
        e.fire(DebugEvent::ReadAio);
        let inj = e.check(0, 512, IoType::Read).unwrap();
        assert_eq!(inj.errno, 5);
        assert!(!inj.immediately);
        assert!(e.check(4096, 512, IoType::Write).is_some());
        assert!(e.check(0, 0, IoType::Flush).is_some());
        // block-status is not in the default set
        assert_eq!(e.check(0, 512, IoType::BlockStatus), None);
    }

    #[test]
    fn test_once_rule_fails_one_request_then_is_deleted() {
        let spec = InjectSpec {
            once: Some(true),
            errno: Some(28),
            ..inject(DebugEvent::WriteAio)
        };
        let mut e = RuleEngine::new(&[spec], &[]);
        e.fire(DebugEvent::WriteAio);
        assert_eq!(e.check(0, 512, IoType::Write).map(|i| i.errno), Some(28));
        assert_eq!(e.check(0, 512, IoType::Write), None);
        e.fire(DebugEvent::WriteAio);
        assert_eq!(e.check(0, 512, IoType::Write), None);
        assert_eq!(e.rule_count(), 0);
    }

    #[test]
    fn test_sector_limits_rule_to_requests_covering_it() {
        let spec = InjectSpec {
            sector: Some(8),
            ..inject(DebugEvent::ReadAio)
        };
        let mut e = RuleEngine::new(&[spec], &[]);
        e.fire(DebugEvent::ReadAio);
        assert_eq!(e.check(0, 4096, IoType::Read), None);
        assert_eq!(e.check(4097, 512, IoType::Read), None);
        assert!(e.check(4096, 1, IoType::Read).is_some());
        assert!(e.check(0, 4097, IoType::Read).is_some());
        // a flush covers no sector
        assert_eq!(e.check(0, 0, IoType::Flush), None);
    }

    #[test]
    fn test_iotype_limits_rule_to_that_kind() {
        let spec = InjectSpec {
            iotype: Some(IoType::BlockStatus),
            ..inject(DebugEvent::None)
        };
        let mut e = RuleEngine::new(&[spec], &[]);
        e.fire(DebugEvent::None);
        assert_eq!(e.check(0, 512, IoType::Read), None);
        assert!(e.check(0, 512, IoType::BlockStatus).is_some());
    }

    #[test]
    fn test_state_rules_walk_through_states() {
        let err = InjectSpec {
            state: Some(3),
            ..inject(DebugEvent::WriteAio)
        };
        let mut e = RuleEngine::new(
            &[err],
            &[
                set(DebugEvent::WriteAio, Some(1), 2),
                set(DebugEvent::WriteAio, Some(2), 3),
            ],
        );
        assert_eq!(e.state(), 1);
        e.fire(DebugEvent::WriteAio);
        assert_eq!(e.state(), 2);
        assert_eq!(e.check(0, 512, IoType::Write), None);
        e.fire(DebugEvent::WriteAio);
        assert_eq!(e.state(), 3);
        // The error rule saw state 2 when the event fired: not armed yet.
        assert_eq!(e.check(0, 512, IoType::Write), None);
        e.fire(DebugEvent::WriteAio);
        assert!(e.check(0, 512, IoType::Write).is_some());
    }

    #[test]
    fn test_state_zero_matches_any_state_and_first_rule_wins() {
        let mut e = RuleEngine::new(
            &[],
            &[
                set(DebugEvent::L2Update, None, 7),
                set(DebugEvent::L2Update, Some(0), 9),
            ],
        );
        e.fire(DebugEvent::L2Update);
        assert_eq!(e.state(), 7);
        e.fire(DebugEvent::L2Update);
        assert_eq!(e.state(), 7);
    }

    #[test]
    fn test_new_event_rearms_list_and_drops_older_rules() {
        let a = InjectSpec {
            errno: Some(5),
            ..inject(DebugEvent::ReadAio)
        };
        let b = InjectSpec {
            errno: Some(28),
            ..inject(DebugEvent::WriteAio)
        };
        let mut e = RuleEngine::new(&[a, b], &[]);
        e.fire(DebugEvent::ReadAio);
        assert_eq!(e.check(0, 1, IoType::Write).map(|i| i.errno), Some(5));
        e.fire(DebugEvent::WriteAio);
        assert_eq!(e.check(0, 1, IoType::Write).map(|i| i.errno), Some(28));
        // an event without error rules leaves the armed list alone
        e.fire(DebugEvent::FlushToDisk);
        assert_eq!(e.check(0, 1, IoType::Read).map(|i| i.errno), Some(28));
    }

    #[test]
    fn test_first_added_rule_decides_and_errno_zero_shadows() {
        let zero = InjectSpec {
            errno: Some(0),
            once: Some(true),
            ..inject(DebugEvent::ReadAio)
        };
        let real = InjectSpec {
            errno: Some(5),
            ..inject(DebugEvent::ReadAio)
        };
        let mut e = RuleEngine::new(&[zero, real], &[]);
        e.fire(DebugEvent::ReadAio);
        assert_eq!(e.check(0, 1, IoType::Read), None);
        // the errno-0 rule is not consumed either
        assert_eq!(e.rule_count(), 2);
    }

    #[test]
    fn test_negative_errno_is_no_error_but_consumes_once() {
        let spec = InjectSpec {
            errno: Some(-1),
            once: Some(true),
            ..inject(DebugEvent::ReadAio)
        };
        let mut e = RuleEngine::new(&[spec], &[]);
        e.fire(DebugEvent::ReadAio);
        assert_eq!(e.check(0, 1, IoType::Read), None);
        assert_eq!(e.rule_count(), 0);
    }

    #[test]
    fn test_iotype_names_round_trip() {
        for t in [
            IoType::Read,
            IoType::Write,
            IoType::WriteZeroes,
            IoType::Discard,
            IoType::Flush,
            IoType::BlockStatus,
        ] {
            assert_eq!(IoType::from_name(t.as_str()), Some(t));
        }
        assert_eq!(IoType::from_name("write_zeroes"), None);
    }
}
