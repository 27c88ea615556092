//! Metadata contexts and the matching of client queries against what an
//! export offers.
//!
//! Query rules (the spec's for `base:`, qemu's for `qemu:`):
//! - `base:allocation` and `qemu:allocation-depth` select themselves;
//!   `qemu:dirty-bitmap:NAME` selects that bitmap if the export has it.
//! - A namespace with an empty leaf (`base:`, `qemu:`, `qemu:dirty-bitmap:`)
//!   lists everything below it, but only for `NBD_OPT_LIST_META_CONTEXT`;
//!   for `NBD_OPT_SET_META_CONTEXT` it selects nothing.
//! - A list request with no query lists every context of the export.
//! - Unknown namespaces and leaves are ignored, never an error.

use crate::consts::MAX_STRING_LEN;

/// Context id of `base:allocation` (the ids are qemu's).
pub const ID_BASE_ALLOCATION: u32 = 0;
/// Context id of `qemu:allocation-depth`.
pub const ID_ALLOCATION_DEPTH: u32 = 1;
/// Context id of the first exported dirty bitmap; bitmap `i` has `2 + i`.
pub const ID_DIRTY_BITMAP_FIRST: u32 = 2;

/// One metadata context.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`: holes and zeroes (`STATE_HOLE`, `STATE_ZERO`).
    BaseAllocation,
    /// `qemu:allocation-depth`: in which layer of a backing chain data lives.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: dirty extents of a bitmap (`STATE_DIRTY`).
    DirtyBitmap(String),
}

impl MetaContext {
    /// The name on the wire.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => "base:allocation".to_owned(),
            MetaContext::AllocationDepth => "qemu:allocation-depth".to_owned(),
            MetaContext::DirtyBitmap(n) => format!("qemu:dirty-bitmap:{n}"),
        }
    }

    /// Parse a full context name (no wildcards).
    pub fn parse(name: &str) -> Option<MetaContext> {
        match name {
            "base:allocation" => Some(MetaContext::BaseAllocation),
            "qemu:allocation-depth" => Some(MetaContext::AllocationDepth),
            _ => match name.strip_prefix("qemu:dirty-bitmap:") {
                Some(bm) if !bm.is_empty() => Some(MetaContext::DirtyBitmap(bm.to_owned())),
                _ => None,
            },
        }
    }
}

/// What an export offers beyond `base:allocation` (which every export has).
#[derive(Debug, Clone, Copy, Default)]
pub struct MetaOffer<'a> {
    /// `qemu:allocation-depth` is available.
    pub allocation_depth: bool,
    /// Names of the exported dirty bitmaps, in export order.
    pub bitmaps: &'a [String],
}

/// A set of contexts chosen by a list or set request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaSelection {
    /// `base:allocation` chosen.
    pub base_allocation: bool,
    /// `qemu:allocation-depth` chosen.
    pub allocation_depth: bool,
    /// Chosen bitmaps: index into the export's bitmap list.
    pub bitmaps: Vec<usize>,
}

impl MetaSelection {
    /// Match `queries` against `offer`. `listing` is true for
    /// `NBD_OPT_LIST_META_CONTEXT`, which enables wildcards.
    pub fn resolve<S: AsRef<str>>(queries: &[S], listing: bool, offer: MetaOffer<'_>) -> Self {
        let mut sel = MetaSelection::default();
        if listing && queries.is_empty() {
            sel.base_allocation = true;
            sel.allocation_depth = offer.allocation_depth;
            sel.bitmaps = (0..offer.bitmaps.len()).collect();
            return sel;
        }
        for q in queries {
            sel.apply(q.as_ref(), listing, offer);
        }
        sel.bitmaps.sort_unstable();
        sel.bitmaps.dedup();
        sel
    }

    fn apply(&mut self, query: &str, listing: bool, offer: MetaOffer<'_>) {
        if query.len() > MAX_STRING_LEN {
            return;
        }
        if let Some(leaf) = query.strip_prefix("base:") {
            if leaf == "allocation" || (leaf.is_empty() && listing) {
                self.base_allocation = true;
            }
        } else if let Some(leaf) = query.strip_prefix("qemu:") {
            self.apply_qemu(leaf, listing, offer);
        }
    }

    fn apply_qemu(&mut self, leaf: &str, listing: bool, offer: MetaOffer<'_>) {
        if leaf.is_empty() {
            if listing {
                self.allocation_depth |= offer.allocation_depth;
                self.bitmaps.extend(0..offer.bitmaps.len());
            }
        } else if leaf == "allocation-depth" {
            self.allocation_depth |= offer.allocation_depth;
        } else if let Some(bm) = leaf.strip_prefix("dirty-bitmap:") {
            if bm.is_empty() {
                if listing {
                    self.bitmaps.extend(0..offer.bitmaps.len());
                }
            } else if let Some(i) = offer.bitmaps.iter().position(|b| b == bm) {
                self.bitmaps.push(i);
            }
        }
    }

    /// Number of chosen contexts.
    pub fn len(&self) -> usize {
        usize::from(self.base_allocation) + usize::from(self.allocation_depth) + self.bitmaps.len()
    }

    /// True when nothing is chosen.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chosen contexts with their ids, in reply order.
    pub fn contexts(&self, bitmaps: &[String]) -> Vec<(u32, MetaContext)> {
        let mut out = Vec::with_capacity(self.len());
        if self.base_allocation {
            out.push((ID_BASE_ALLOCATION, MetaContext::BaseAllocation));
        }
        if self.allocation_depth {
            out.push((ID_ALLOCATION_DEPTH, MetaContext::AllocationDepth));
        }
        for &i in &self.bitmaps {
            if let Some(name) = bitmaps.get(i) {
                let id = ID_DIRTY_BITMAP_FIRST.saturating_add(u32::try_from(i).unwrap_or(u32::MAX));
                out.push((id, MetaContext::DirtyBitmap(name.clone())));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(bitmaps: &[String]) -> MetaOffer<'_> {
        MetaOffer {
            allocation_depth: true,
            bitmaps,
        }
    }

    #[test]
    fn test_context_name_parse_roundtrip() {
        for c in [
            MetaContext::BaseAllocation,
            MetaContext::AllocationDepth,
            MetaContext::DirtyBitmap("b0".into()),
        ] {
            assert_eq!(MetaContext::parse(&c.name()), Some(c));
        }
        assert_eq!(MetaContext::parse("qemu:dirty-bitmap:"), None);
        assert_eq!(MetaContext::parse("base:"), None);
    }

    #[test]
    fn test_resolve_list_without_queries_lists_all() {
        let bms = vec!["a".to_owned(), "b".to_owned()];
        let sel = MetaSelection::resolve::<&str>(&[], true, offer(&bms));
        assert_eq!(sel.len(), 4);
        let ctx = sel.contexts(&bms);
        assert_eq!(ctx[0], (0, MetaContext::BaseAllocation));
        assert_eq!(ctx[3], (3, MetaContext::DirtyBitmap("b".into())));
    }

    #[test]
    fn test_resolve_set_without_queries_selects_nothing() {
        let sel = MetaSelection::resolve::<&str>(&[], false, offer(&[]));
        assert!(sel.is_empty());
    }

    #[test]
    fn test_resolve_namespace_wildcard_only_when_listing() {
        let bms = vec!["a".to_owned()];
        let list = MetaSelection::resolve(&["base:", "qemu:dirty-bitmap:"], true, offer(&bms));
        assert!(list.base_allocation);
        assert_eq!(list.bitmaps, vec![0]);
        assert!(!list.allocation_depth);
        let set = MetaSelection::resolve(&["base:", "qemu:"], false, offer(&bms));
        assert!(set.is_empty());
    }

    #[test]
    fn test_resolve_unknown_queries_ignored() {
        let bms = vec!["a".to_owned()];
        let sel = MetaSelection::resolve(
            &[
                "x-foo:bar",
                "base:nope",
                "qemu:dirty-bitmap:zz",
                "nocolon",
                "base:allocation",
            ],
            false,
            offer(&bms),
        );
        assert_eq!(
            sel,
            MetaSelection {
                base_allocation: true,
                ..Default::default()
            }
        );
    }

    #[test]
    fn test_resolve_duplicates_collapse() {
        let bms = vec!["a".to_owned()];
        let sel = MetaSelection::resolve(
            &[
                "qemu:dirty-bitmap:a",
                "qemu:dirty-bitmap:a",
                "base:allocation",
                "base:allocation",
            ],
            false,
            offer(&bms),
        );
        assert_eq!(sel.len(), 2);
    }

    #[test]
    fn test_resolve_allocation_depth_requires_offer() {
        let none = MetaOffer {
            allocation_depth: false,
            bitmaps: &[],
        };
        let sel = MetaSelection::resolve(&["qemu:allocation-depth"], false, none);
        assert!(sel.is_empty());
    }
}
