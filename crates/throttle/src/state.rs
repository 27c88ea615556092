//! qemu's leaky-bucket throttling algorithm, pure: time is passed in (in
//! nanoseconds from any fixed origin), nothing sleeps here.
//!
//! Every request adds its size (bytes buckets) and its operation count
//! (operations buckets) to the buckets of its direction and to the total
//! buckets. Buckets leak at their average rate. A bucket may hold a tenth
//! of a second's worth of units (or, with a burst rate, `max *
//! burst_length` units, leaking from a burst bucket of a tenth of a second
//! at `max`) before requests must wait until enough has leaked.

use crate::config::{BucketType, LeakyBucket, ThrottleConfig};

const NANOS_PER_SEC: f64 = 1e9;

/// Direction of a request: reads, or writes (writes, write-zeroes, discards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Reads.
    Read,
    /// Writes, write-zeroes and discards.
    Write,
}

impl Direction {
    /// Both directions.
    pub const ALL: [Direction; 2] = [Direction::Read, Direction::Write];

    /// 0 for reads, 1 for writes.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The buckets a request of this direction must respect.
    fn buckets(self) -> [BucketType; 4] {
        use BucketType::*;
        match self {
            Direction::Read => [BpsTotal, OpsTotal, BpsRead, OpsRead],
            Direction::Write => [BpsTotal, OpsTotal, BpsWrite, OpsWrite],
        }
    }
}

/// Let `delta_ns` worth of units leak out of `b`.
fn leak_bucket(b: &mut LeakyBucket, delta_ns: u64) {
    let leak = b.avg as f64 * delta_ns as f64 / NANOS_PER_SEC;
    b.level = (b.level - leak).max(0.0);
    // Bursts longer than a second keep a burst level too, so that the
    // rate during the burst stays at `max`.
    if b.burst_length > 1 {
        let leak = b.max as f64 * delta_ns as f64 / NANOS_PER_SEC;
        b.burst_level = (b.burst_level - leak).max(0.0);
    }
}

/// Nanoseconds until `extra` units leak at `rate` per second.
fn wait_for(rate: u64, extra: f64) -> u64 {
    (extra * NANOS_PER_SEC / rate as f64) as u64
}

/// Nanoseconds a request must wait because of bucket `b` (0 = none).
pub fn bucket_wait(b: &LeakyBucket) -> u64 {
    if b.avg == 0 {
        return 0;
    }
    let (size, burst_size) = if b.max == 0 {
        // Without a burst rate, still allow short bursts (a tenth of a
        // second at the average rate), or every other request would wait.
        (b.avg as f64 / 10.0, 0.0)
    } else {
        // With one, the whole burst must have been used first.
        (
            b.max as f64 * f64::from(b.burst_length),
            b.max as f64 / 10.0,
        )
    };
    let extra = b.level - size;
    if extra > 0.0 {
        return wait_for(b.avg, extra);
    }
    if b.burst_length > 1 && b.max > 0 {
        let extra = b.burst_level - burst_size;
        if extra > 0.0 {
            return wait_for(b.max, extra);
        }
    }
    0
}

/// The fill state of a group's buckets (qemu's `ThrottleState`).
#[derive(Debug, Clone)]
pub struct ThrottleState {
    cfg: ThrottleConfig,
    previous_leak: u64,
}

impl ThrottleState {
    /// Buckets for `cfg`, empty at time `now`.
    pub fn new(cfg: ThrottleConfig, now: u64) -> Self {
        let mut s = ThrottleState {
            cfg: ThrottleConfig::default(),
            previous_leak: now,
        };
        s.configure(cfg, now);
        s
    }

    /// The configuration with the current levels.
    pub fn config(&self) -> &ThrottleConfig {
        &self.cfg
    }

    /// Replace the configuration; every bucket starts empty (as qemu's
    /// `throttle_config`).
    pub fn configure(&mut self, mut cfg: ThrottleConfig, now: u64) {
        for b in &mut cfg.buckets {
            b.level = 0.0;
            b.burst_level = 0.0;
        }
        self.cfg = cfg;
        self.previous_leak = now;
    }

    /// Leak every bucket up to `now` (time never goes back).
    pub fn leak(&mut self, now: u64) {
        let delta = now.saturating_sub(self.previous_leak);
        self.previous_leak = self.previous_leak.max(now);
        if delta == 0 {
            return;
        }
        for b in &mut self.cfg.buckets {
            leak_bucket(b, delta);
        }
    }

    /// Nanoseconds a request in `dir` must wait, given current levels.
    pub fn wait(&self, dir: Direction) -> u64 {
        dir.buckets()
            .iter()
            .map(|&t| bucket_wait(self.cfg.bucket(t)))
            .max()
            .unwrap_or(0)
    }

    /// Leak up to `now`, then the wait for a request in `dir`.
    pub fn wait_at(&mut self, dir: Direction, now: u64) -> u64 {
        self.leak(now);
        self.wait(dir)
    }

    /// Count a request of `bytes` in `dir` that is going ahead.
    pub fn account(&mut self, dir: Direction, bytes: u64) {
        let op_size = self.cfg.op_size;
        let units = if op_size != 0 && bytes > op_size {
            bytes as f64 / op_size as f64
        } else {
            1.0
        };
        let (bps, ops) = match dir {
            Direction::Read => (BucketType::BpsRead, BucketType::OpsRead),
            Direction::Write => (BucketType::BpsWrite, BucketType::OpsWrite),
        };
        for (t, amount) in [
            (BucketType::BpsTotal, bytes as f64),
            (bps, bytes as f64),
            (BucketType::OpsTotal, units),
            (ops, units),
        ] {
            let b = &mut self.cfg.buckets[t.index()];
            b.level += amount;
            if b.burst_length > 1 {
                b.burst_level += amount;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ThrottleLimits;

    const SEC: u64 = 1_000_000_000;

    fn state(limits: ThrottleLimits) -> ThrottleState {
        let mut c = ThrottleConfig::default();
        c.apply_limits(&limits).unwrap();
        ThrottleState::new(c, 0)
    }

    fn iops(total: i64) -> ThrottleLimits {
        ThrottleLimits {
            iops_total: Some(total),
            ..ThrottleLimits::default()
        }
    }

    /// Run requests back to back, each as soon as it may go, for `secs`
    /// seconds of virtual time; returns how many went.
    fn simulate(s: &mut ThrottleState, dir: Direction, bytes: u64, secs: u64) -> u64 {
        simulate_between(s, dir, bytes, 0, secs)
    }

    fn simulate_between(
        s: &mut ThrottleState,
        dir: Direction,
        bytes: u64,
        from: u64,
        to: u64,
    ) -> u64 {
        let mut now = from * SEC;
        let mut done = 0;
        loop {
            let w = s.wait_at(dir, now);
            now += w;
            if now >= to * SEC {
                return done;
            }
            if w == 0 {
                s.account(dir, bytes);
                done += 1;
            }
        }
    }

    #[test]
    fn test_state_unlimited_never_waits() {
        let mut s = state(ThrottleLimits::default());
        for _ in 0..10_000 {
            assert_eq!(s.wait_at(Direction::Read, 0), 0);
            s.account(Direction::Read, 1 << 20);
        }
    }

    #[test]
    fn test_state_iops_allows_tenth_second_burst_then_waits() {
        let mut s = state(iops(200));
        // 20 operations fill the bucket exactly; the 21st overflows it.
        for _ in 0..21 {
            assert_eq!(s.wait_at(Direction::Read, 0), 0);
            s.account(Direction::Read, 4096);
        }
        // One unit over the bucket: 1/200 s.
        assert_eq!(s.wait_at(Direction::Read, 0), SEC / 200);
        assert_eq!(s.wait_at(Direction::Write, 0), SEC / 200);
        // After it leaked, the next may go.
        assert_eq!(s.wait_at(Direction::Read, SEC / 200), 0);
    }

    #[test]
    fn test_state_iops_rate_over_five_seconds_matches_limit() {
        let mut s = state(iops(200));
        let n = simulate(&mut s, Direction::Read, 4096, 5);
        // 5 s at 200/s plus the initial bucket of 20 (+1 to overflow it).
        assert!((1000..=1022).contains(&n), "{n}");
    }

    #[test]
    fn test_state_read_limit_leaves_writes_alone() {
        let mut s = state(ThrottleLimits {
            iops_read: Some(10),
            ..ThrottleLimits::default()
        });
        for _ in 0..5 {
            s.account(Direction::Read, 512);
        }
        assert!(s.wait_at(Direction::Read, 0) > 0);
        assert_eq!(s.wait_at(Direction::Write, 0), 0);
    }

    #[test]
    fn test_state_bps_limit_counts_bytes() {
        let mut s = state(ThrottleLimits {
            bps_total: Some(1 << 20),
            ..ThrottleLimits::default()
        });
        let n = simulate(&mut s, Direction::Write, 64 << 10, 4);
        // 4 MiB/4 s in 64 KiB requests = 64, plus the bucket of 0.1 MiB.
        assert!((64..=67).contains(&n), "{n}");
    }

    #[test]
    fn test_state_iops_size_counts_large_requests_as_several() {
        let mut s = state(ThrottleLimits {
            iops_total: Some(100),
            iops_size: Some(4096),
            ..ThrottleLimits::default()
        });
        s.account(Direction::Read, 16384);
        assert!((s.config().bucket(BucketType::OpsTotal).level - 4.0).abs() < 1e-9);
        s.account(Direction::Read, 512);
        assert!((s.config().bucket(BucketType::OpsTotal).level - 5.0).abs() < 1e-9);
    }

    #[test]
    fn test_state_burst_allows_max_rate_for_burst_length() {
        let mut s = state(ThrottleLimits {
            iops_total: Some(100),
            iops_total_max: Some(1000),
            iops_total_max_length: Some(2),
            ..ThrottleLimits::default()
        });
        // During the first ~2 s the rate is about 1000/s (plus the leak at
        // 100/s), then it falls back to 100/s.
        let burst = simulate(&mut s, Direction::Read, 512, 2);
        assert!((2000..=2300).contains(&burst), "{burst}");
        // The next 4 s: the end of the burst, then 100/s.
        let more = simulate_between(&mut s, Direction::Read, 512, 2, 6);
        assert!((450..=700).contains(&more), "{more}");
    }

    #[test]
    fn test_state_configure_empties_buckets() {
        let mut s = state(iops(10));
        for _ in 0..10 {
            s.account(Direction::Read, 1);
        }
        assert!(s.wait_at(Direction::Read, 0) > 0);
        let cfg = s.config().clone();
        s.configure(cfg, 0);
        assert_eq!(s.wait_at(Direction::Read, 0), 0);
    }

    #[test]
    fn test_state_time_going_back_is_ignored() {
        let mut s = state(iops(10));
        for _ in 0..10 {
            s.account(Direction::Read, 1);
        }
        let w = s.wait_at(Direction::Read, SEC);
        assert_eq!(w, 0);
        s.account(Direction::Read, 1);
        s.account(Direction::Read, 1);
        let before = s.wait_at(Direction::Read, SEC);
        assert_eq!(s.wait_at(Direction::Read, SEC / 2), before);
    }
}
