//! Feature bits and the virtio-blk configuration space, with the values
//! qemu-storage-daemon's vhost-user-blk export advertises.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Bytes of a virtio-blk sector (the unit of request offsets).
pub(crate) const SECTOR: u64 = 512;
/// Segments per request the guest may use (qemu: 128 - 2).
pub(crate) const SEG_MAX: u32 = 126;
/// Largest discard / write-zeroes request, in sectors (qemu's limits).
pub(crate) const MAX_DISCARD_SECTORS: u32 = 32768;
pub(crate) const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;
/// Largest queue a front-end may configure (qemu's VIRTQUEUE_MAX_SIZE).
pub(crate) const MAX_QUEUE_SIZE: usize = 1024;
/// Size of `struct virtio_blk_config` as qemu exposes it (with the zoned fields).
pub(crate) const CONFIG_LEN: usize = 96;
/// Offset of the `writeback` byte (CONFIG_WCE) in the config space.
pub(crate) const WCE_OFFSET: usize = 32;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: protocol feature negotiation is supported.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// The virtio feature bits offered (qemu-storage-daemon's set, plus RO).
pub(crate) fn features(writable: bool) -> u64 {
    let bits = [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VHOST_USER_F_PROTOCOL_FEATURES,
    ];
    let mut f = bits.iter().fold(0u64, |acc, b| acc | (1u64 << b));
    if !writable {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// Inputs of the configuration space.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConfigInputs {
    pub capacity_bytes: u64,
    pub blk_size: u32,
    pub num_queues: u16,
    pub writeback: bool,
}

/// The little-endian `struct virtio_blk_config`.
pub(crate) fn config_space(c: &ConfigInputs) -> [u8; CONFIG_LEN] {
    let mut b = [0u8; CONFIG_LEN];
    let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
    put(0, &(c.capacity_bytes / SECTOR).to_le_bytes());
    put(8, &0u32.to_le_bytes()); // size_max: no limit
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &c.blk_size.to_le_bytes());
    // topology: physical_block_exp 0, alignment_offset 0, min_io_size 1, opt_io_size 1
    put(26, &1u16.to_le_bytes());
    put(28, &1u32.to_le_bytes());
    put(WCE_OFFSET, &[u8::from(c.writeback)]);
    put(34, &c.num_queues.to_le_bytes());
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &1u32.to_le_bytes()); // max_discard_seg
    let align = (u64::from(c.blk_size) / SECTOR) as u32;
    put(44, &align.to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    b
}

/// The `[offset, offset + size)` window of the config space; out-of-range
/// bytes read as nothing (the front-end asked for more than exists).
pub(crate) fn config_window(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(space.len());
    let end = start.saturating_add(size as usize).min(space.len());
    space[start..end].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_features_read_only_sets_ro_bit() {
        assert_eq!(
            features(false) & (1 << VIRTIO_BLK_F_RO),
            1 << VIRTIO_BLK_F_RO
        );
        assert_eq!(features(true) & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(features(true) & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    }

    #[test]
    fn test_config_space_capacity_and_limits_little_endian() {
        let c = config_space(&ConfigInputs {
            capacity_bytes: 1 << 20,
            blk_size: 4096,
            num_queues: 2,
            writeback: true,
        });
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[WCE_OFFSET], 1);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn test_config_window_beyond_end_is_truncated() {
        let space = [7u8; CONFIG_LEN];
        assert_eq!(config_window(&space, 90, 10).len(), 6);
        assert!(config_window(&space, 200, 4).is_empty());
    }
}
