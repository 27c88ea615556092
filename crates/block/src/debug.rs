//! Debug events: named points in a driver's work (an L2 table update, a
//! cluster allocation, a flush) that a `blkdebug` node below can react to,
//! by injecting an error or changing its state. The names are qemu's
//! `BlkdebugEvent` enum, so test configurations carry over.
//!
//! A driver fires an event on the child it is about to touch with
//! [`crate::Node::debug_event`]; the node hands it to its driver, and a
//! driver that does not handle events passes it on to its primary child
//! (as qemu's `bdrv_debug_event` does), so events reach a `blkdebug` node
//! through filters such as `raw`.

use serde::Deserialize;

macro_rules! debug_events {
    ($($variant:ident = $name:literal,)*) => {
        /// One debug event (qemu's `BlkdebugEvent`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
        pub enum DebugEvent {
            $(
                #[doc = concat!("`", $name, "`")]
                #[serde(rename = $name)]
                $variant,
            )*
        }

        impl DebugEvent {
            /// Every event, in qemu's order.
            pub const ALL: &'static [DebugEvent] = &[$(DebugEvent::$variant,)*];

            /// The event's name in options and config files.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(DebugEvent::$variant => $name,)*
                }
            }

            /// The event called `name`, if there is one.
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($name => Some(DebugEvent::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

debug_events! {
    L1Update = "l1_update",
    L1GrowAllocTable = "l1_grow_alloc_table",
    L1GrowWriteTable = "l1_grow_write_table",
    L1GrowActivateTable = "l1_grow_activate_table",
    L2Load = "l2_load",
    L2Update = "l2_update",
    L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc_cow_read",
    L2AllocWrite = "l2_alloc_write",
    ReadAio = "read_aio",
    ReadBackingAio = "read_backing_aio",
    ReadCompressed = "read_compressed",
    WriteAio = "write_aio",
    WriteCompressed = "write_compressed",
    VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save",
    CowRead = "cow_read",
    CowWrite = "cow_write",
    ReftableLoad = "reftable_load",
    ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update",
    RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update",
    RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc",
    RefblockAllocHookup = "refblock_alloc_hookup",
    RefblockAllocWrite = "refblock_alloc_write",
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes",
    ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os",
    FlushToDisk = "flush_to_disk",
    PwritevRmwHead = "pwritev_rmw_head",
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    PwritevRmwTail = "pwritev_rmw_tail",
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    Pwritev = "pwritev",
    PwritevZero = "pwritev_zero",
    PwritevDone = "pwritev_done",
    EmptyImagePrepare = "empty_image_prepare",
    L1ShrinkWriteTable = "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    CorWrite = "cor_write",
    ClusterAllocSpace = "cluster_alloc_space",
    None = "none",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_debug_event_names_round_trip() {
        for ev in DebugEvent::ALL {
            assert_eq!(DebugEvent::from_name(ev.as_str()), Some(*ev));
            let parsed: DebugEvent =
                serde_json::from_value(serde_json::json!(ev.as_str())).unwrap();
            assert_eq!(parsed, *ev);
        }
        assert_eq!(DebugEvent::ALL.len(), 48);
        assert_eq!(DebugEvent::from_name("l2-update"), None);
    }
}
