//! Group scheduling tests on tokio's paused clock: virtual seconds pass
//! instantly and deterministically.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;

fn iops(n: i64) -> ThrottleLimits {
    ThrottleLimits {
        iops_total: Some(n),
        ..ThrottleLimits::default()
    }
}

/// Start `workers` tasks issuing reads through `m` back to back until
/// `end`; the returned counter counts reads that went before `end`.
fn load(m: &Arc<GroupMember>, workers: usize, end: Instant) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    for _ in 0..workers {
        let (m, count) = (m.clone(), count.clone());
        tokio::spawn(async move {
            while Instant::now() < end {
                m.throttle(Direction::Read, 4096).await;
                if Instant::now() < end {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                // Each request takes a little time, like real I/O.
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
        });
    }
    count
}

async fn run_until(end: Instant) {
    tokio::time::sleep_until(end + Duration::from_millis(10)).await;
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[tokio::test(start_paused = true)]
async fn test_group_unlimited_never_waits() {
    let g = ThrottleGroup::new(&ThrottleLimits::default()).unwrap();
    let m = g.join();
    let start = Instant::now();
    for _ in 0..10_000 {
        m.throttle(Direction::Write, 1 << 20).await;
    }
    assert_eq!(Instant::now(), start);
}

#[tokio::test(start_paused = true)]
async fn test_group_200_iops_over_5s_within_2_percent() {
    let g = ThrottleGroup::new(&iops(200)).unwrap();
    let m = Arc::new(g.join());
    let end = Instant::now() + Duration::from_secs(5);
    let n = load(&m, 8, end);
    run_until(end).await;
    // 1000 plus the initial bucket (a tenth of a second's worth).
    let n = get(&n);
    assert!((1000..=1025).contains(&n), "{n}");
}

#[tokio::test(start_paused = true)]
async fn test_group_two_members_share_budget_fairly() {
    let g = ThrottleGroup::new(&iops(200)).unwrap();
    let a = Arc::new(g.join());
    let b = Arc::new(g.join());
    assert_eq!(g.member_count(), 2);
    let end = Instant::now() + Duration::from_secs(5);
    // Very different queue depths still get equal shares.
    let na = load(&a, 16, end);
    let nb = load(&b, 1, end);
    run_until(end).await;
    let (na, nb) = (get(&na), get(&nb));
    assert!((1000..=1025).contains(&(na + nb)), "{na} + {nb}");
    assert!(na.abs_diff(nb) <= 60, "{na} vs {nb}");
}

#[tokio::test(start_paused = true)]
async fn test_group_set_limits_takes_effect_while_requests_wait() {
    // 1 IOPS: a waiting request would wait a second for its timer.
    let g = ThrottleGroup::new(&iops(1)).unwrap();
    let m = Arc::new(g.join());
    let end = Instant::now() + Duration::from_secs(4);
    let n = load(&m, 4, end);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = get(&n);
    assert!(before <= 3, "{before}");
    g.set_limits(&iops(1000)).unwrap();
    assert_eq!(g.limits().iops_total, Some(1000));
    run_until(end).await;
    let after = get(&n) - before;
    // 2.5 s at 1000/s, plus a bucket of 100.
    assert!((2500..=2610).contains(&after), "{after}");
}

#[tokio::test(start_paused = true)]
async fn test_group_set_limits_bad_value_keeps_old_limits() {
    let g = ThrottleGroup::new(&iops(100)).unwrap();
    let bad = ThrottleLimits {
        iops_total_max: Some(50),
        ..ThrottleLimits::default()
    };
    assert_eq!(
        g.set_limits(&bad).unwrap_err().to_string(),
        "bps_max/iops_max cannot be lower than bps/iops"
    );
    assert_eq!(g.limits().iops_total, Some(100));
    assert_eq!(g.limits().iops_total_max, Some(0));
    assert_eq!(g.property("x-iops-total"), Some(Value::from(100)));
    assert_eq!(g.property("limits").unwrap()["iops-total"], 100);
    assert_eq!(g.property("x-nope"), None);
}

#[tokio::test(start_paused = true)]
async fn test_group_cancelled_waiter_does_not_stall_others() {
    let g = ThrottleGroup::new(&iops(10)).unwrap();
    let m = Arc::new(g.join());
    // Use up the bucket.
    for _ in 0..2 {
        m.throttle(Direction::Read, 512).await;
    }
    // Queue two requests and cancel the first one.
    let m1 = m.clone();
    let first = tokio::spawn(async move { m1.throttle(Direction::Read, 512).await });
    tokio::task::yield_now().await;
    let m2 = m.clone();
    let second = tokio::spawn(async move { m2.throttle(Direction::Read, 512).await });
    tokio::task::yield_now().await;
    first.abort();
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), second)
        .await
        .expect("second request stalled")
        .unwrap();
    assert!(Instant::now() - start <= Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn test_group_member_leaving_hands_turn_to_others() {
    let g = ThrottleGroup::new(&iops(10)).unwrap();
    let a = Arc::new(g.join());
    let b = Arc::new(g.join());
    for _ in 0..2 {
        a.throttle(Direction::Write, 512).await;
    }
    // `a` arms the timer; `b` queues behind it.
    let a2 = a.clone();
    let ta = tokio::spawn(async move { a2.throttle(Direction::Write, 512).await });
    tokio::task::yield_now().await;
    let b2 = b.clone();
    let tb = tokio::spawn(async move { b2.throttle(Direction::Write, 512).await });
    tokio::task::yield_now().await;
    ta.abort();
    let _ = ta.await;
    drop(a);
    assert_eq!(g.member_count(), 1);
    tokio::time::timeout(Duration::from_secs(2), tb)
        .await
        .expect("b stalled")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn test_group_reads_and_writes_have_separate_queues() {
    let g = ThrottleGroup::new(&ThrottleLimits {
        iops_read: Some(10),
        ..ThrottleLimits::default()
    })
    .unwrap();
    let m = Arc::new(g.join());
    let end = Instant::now() + Duration::from_secs(2);
    let reads = load(&m, 2, end);
    // Writes are not limited and never wait behind queued reads.
    let start = Instant::now();
    for _ in 0..100 {
        m.throttle(Direction::Write, 512).await;
    }
    assert_eq!(Instant::now(), start);
    run_until(end).await;
    assert!((20..=22).contains(&get(&reads)), "{}", get(&reads));
}

#[tokio::test(start_paused = true)]
async fn test_group_dropped_group_object_leaves_no_strong_refs() {
    let g = ThrottleGroup::new(&iops(5)).unwrap();
    let m = Arc::new(g.join());
    let end = Instant::now() + Duration::from_secs(1);
    let _n = load(&m, 2, end);
    run_until(end).await;
    // Timers hold the group weakly: only `g` and the member hold it.
    assert_eq!(Arc::strong_count(&g), 2);
}

#[tokio::test(start_paused = true)]
async fn test_group_drain_releases_queued_requests_at_once() {
    let g = ThrottleGroup::new(&iops(1)).unwrap();
    let m = Arc::new(g.join());
    let done = Arc::new(AtomicU64::new(0));
    for _ in 0..16 {
        let (m, done) = (m.clone(), done.clone());
        tokio::spawn(async move {
            m.throttle(Direction::Write, 4096).await;
            done.fetch_add(1, Ordering::Relaxed);
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // At 1 IOPS with a tenth of a second's burst, most still wait.
    assert!(get(&done) < 16);
    let start = Instant::now();
    m.begin_drain();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(get(&done), 16);
    // New requests do not wait during the drain...
    m.throttle(Direction::Write, 4096).await;
    assert!(Instant::now() - start < Duration::from_millis(10));
    // ...and do again once it ended.
    m.end_drain();
    let before = Instant::now();
    m.throttle(Direction::Write, 4096).await;
    m.throttle(Direction::Write, 4096).await;
    assert!(Instant::now() - before >= Duration::from_millis(500));
}
