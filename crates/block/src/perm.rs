//! Permissions with share masks, as qemu's block layer defines them.
//!
//! Every user of a node (an export's backend, a parent node) states the
//! permissions it takes (`perm`) and the ones it lets others take (`shared`).
//! A new user is refused when it takes something another user does not share,
//! or does not share something another user takes.

use std::fmt;
use std::ops::{BitAnd, BitOr, Not};
use std::sync::{Arc, Weak};

use crate::node::Node;
use crate::{Error, ErrorKind, Result};

/// A set of permissions.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Perm(u8);

impl Perm {
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// Reads return consistent data (nobody writes behind the node's back).
    pub const CONSISTENT_READ: Perm = Perm(1);
    /// Data may be changed.
    pub const WRITE: Perm = Perm(2);
    /// Writes that leave the visible data unchanged (copy-on-read, stream).
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// The size may change.
    pub const RESIZE: Perm = Perm(8);
    /// Every permission.
    pub const ALL: Perm = Perm(15);

    const NAMES: [(Perm, &'static str); 4] = [
        (Perm::CONSISTENT_READ, "consistent read"),
        (Perm::WRITE, "write"),
        (Perm::WRITE_UNCHANGED, "write unchanged"),
        (Perm::RESIZE, "resize"),
    ];

    /// True when every permission of `other` is in `self`.
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// True when no permission is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The bits, for lock byte offsets (bit 0 = consistent read, ...).
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Each single permission in this set, in qemu's order.
    pub fn iter(self) -> impl Iterator<Item = Perm> {
        Self::NAMES
            .into_iter()
            .map(|(p, _)| p)
            .filter(move |p| self.contains(*p))
    }
}

impl fmt::Display for Perm {
    /// qemu's names, comma separated: "write, resize".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Self::NAMES
            .iter()
            .filter(|(p, _)| self.contains(*p))
            .map(|(_, n)| *n)
            .collect();
        f.write_str(&names.join(", "))
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm({self})")
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

impl BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, rhs: Perm) -> Perm {
        Perm(self.0 & rhs.0)
    }
}

impl Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }
}

/// Who uses a node, for error messages: "node 'fmt'" and its child role.
#[derive(Debug, Clone)]
pub struct UserDesc {
    /// A description in qemu's words: "an unnamed block device", "node 'fmt'", "export 'e0'".
    pub who: String,
    /// The role: "root" for backends, "file", "backing", ... for parents.
    pub role: String,
}

#[derive(Debug, Clone)]
pub(crate) struct UserEntry {
    pub id: u64,
    pub desc: UserDesc,
    pub perm: Perm,
    pub shared: Perm,
}

/// Checks a candidate (perm, shared) against the other users of `node`.
pub(crate) fn check_conflict(
    node_name: &str,
    desc: &UserDesc,
    perm: Perm,
    shared: Perm,
    others: &[UserEntry],
) -> Result<()> {
    for other in others {
        let taken_not_shared = perm & !other.shared;
        if !taken_not_shared.is_empty() {
            return Err(conflict(node_name, taken_not_shared, desc, &other.desc));
        }
        let unshared_but_taken = other.perm & !shared;
        if !unshared_but_taken.is_empty() {
            return Err(conflict(node_name, unshared_but_taken, &other.desc, desc));
        }
    }
    Ok(())
}

fn conflict(node: &str, perms: Perm, requirer: &UserDesc, unsharer: &UserDesc) -> Error {
    Error::new(
        ErrorKind::PermissionConflict,
        format!(
            "Permission conflict on node '{node}': permissions '{perms}' are both required by {} \
             (uses node '{node}' as '{}' child) and unshared by {} (uses node '{node}' as '{}' child).",
            requirer.who, requirer.role, unsharer.who, unsharer.role
        ),
    )
}

/// A registered use of a node. Dropping it gives the permissions back.
#[derive(Debug)]
pub struct PermUser {
    node: Weak<Node>,
    id: u64,
}

impl PermUser {
    pub(crate) fn new(node: &Arc<Node>, id: u64) -> Self {
        PermUser {
            node: Arc::downgrade(node),
            id,
        }
    }

    /// Change what this user takes and shares; refused on conflict, in which
    /// case the previous permissions stay in force.
    pub fn update(&self, perm: Perm, shared: Perm) -> Result<()> {
        match self.node.upgrade() {
            Some(node) => node.update_user(self.id, perm, shared),
            None => Ok(()),
        }
    }
}

impl Drop for PermUser {
    fn drop(&mut self) {
        if let Some(node) = self.node.upgrade() {
            node.remove_user(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(who: &str, perm: Perm, shared: Perm) -> UserEntry {
        UserEntry {
            id: 1,
            desc: UserDesc {
                who: who.into(),
                role: "root".into(),
            },
            perm,
            shared,
        }
    }

    #[test]
    fn test_perm_display_lists_qemu_names() {
        assert_eq!((Perm::WRITE | Perm::RESIZE).to_string(), "write, resize");
        assert_eq!(
            (!Perm::WRITE).to_string(),
            "consistent read, write unchanged, resize"
        );
    }

    #[test]
    fn test_check_conflict_writer_against_unsharing_reader_is_refused() {
        let reader = user(
            "export 'a'",
            Perm::CONSISTENT_READ,
            Perm::ALL & !Perm::WRITE,
        );
        let desc = UserDesc {
            who: "export 'b'".into(),
            role: "root".into(),
        };
        let err = check_conflict("n", &desc, Perm::WRITE, Perm::ALL, &[reader]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionConflict);
        assert!(err
            .message()
            .contains("permissions 'write' are both required by export 'b'"));
    }

    #[test]
    fn test_check_conflict_compatible_users_pass() {
        let a = user("a", Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL);
        let desc = UserDesc {
            who: "b".into(),
            role: "root".into(),
        };
        check_conflict("n", &desc, Perm::WRITE, Perm::ALL, &[a]).unwrap();
    }
}
