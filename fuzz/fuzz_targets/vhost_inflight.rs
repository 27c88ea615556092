//! Feeds bytes as a vhost-user inflight region (SET_INFLIGHT_FD) through
//! the mapping checks and the per-queue recovery. Input: 8 control bytes
//! (see `qsd_export_vhost_user_blk::fuzzing::inflight`), then the region.
//! Checks: heads to resubmit are in the queue and distinct; the ring
//! position follows the used index by their number; a second recovery
//! straight away finds the same; once the resubmitted chains complete,
//! nothing is left to resubmit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qsd_export_vhost_user_blk::fuzzing::{self, RecoveryView};

fn check_one(r: &RecoveryView, used: u16, queue_size: u16) {
    let Some(avail) = r.last_avail else {
        assert_eq!(*r, RecoveryView::default(), "fresh region with a recovery");
        return;
    };
    let mut heads = r.resubmit.clone();
    heads.sort_unstable();
    heads.dedup();
    assert_eq!(heads.len(), r.resubmit.len(), "duplicate heads");
    assert!(
        heads.iter().all(|&h| h < queue_size),
        "head out of the queue"
    );
    assert_eq!(avail, used.wrapping_add(r.resubmit.len() as u16));
}

fuzz_target!(|data: &[u8]| {
    let Some(queues) = fuzzing::inflight(data).expect("region file") else {
        return;
    };
    let queue_size = u16::from_le_bytes([data[1], data[2]]);
    assert_eq!(queues.len(), usize::from(data[0]));
    for q in &queues {
        check_one(&q.first, q.used_idx, queue_size);
        check_one(&q.again, q.used_idx, queue_size);
        assert!(
            q.again.last_avail.is_some(),
            "region still fresh after recovery"
        );
        if q.first.last_avail.is_some() {
            assert_eq!(q.again, q.first, "recovery not repeatable");
            let done = q.after_completion.as_ref().expect("completion step");
            let used = q.used_idx.wrapping_add(q.first.resubmit.len() as u16);
            assert!(done.resubmit.is_empty(), "completed chains resubmitted");
            assert_eq!(done.last_avail, Some(used));
        }
    }
});
