//! A load generator for any vhost-user-blk server, with libblkio as the
//! front-end (the same client code for qsd and qemu-storage-daemon).
//!
//! ```text
//! blkio_load SOCKET PATTERN BLOCK_SIZE QUEUE_DEPTH SECONDS [REGION_SIZE]
//!   PATTERN      randread | randwrite | read | write
//!   BLOCK_SIZE   bytes, with an optional k/M/G suffix (4k, 1M)
//!   REGION_SIZE  the first REGION_SIZE bytes of the disk are used
//!                (default and upper bound: the disk's capacity)
//! ```
//!
//! It keeps QUEUE_DEPTH requests in flight on one queue for SECONDS, then
//! drains, and prints one JSON line:
//! `{"ios":..,"bytes":..,"seconds":..,"iops":..,"mib_s":..}`.
//!
//! Buffers live in one libblkio memory region (memfd), which vhost-user
//! requires: the server maps it as guest memory. Write data is random and
//! every write stamps a counter into its block, so no zero-detection or
//! deduplication shortcut applies. A failed request is an error (exit 1).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    RandRead,
    RandWrite,
    Read,
    Write,
}

impl Pattern {
    fn parse(s: &str) -> Result<Pattern, String> {
        match s {
            "randread" => Ok(Pattern::RandRead),
            "randwrite" => Ok(Pattern::RandWrite),
            "read" => Ok(Pattern::Read),
            "write" => Ok(Pattern::Write),
            _ => Err(format!(
                "unknown pattern {s:?} (randread, randwrite, read, write)"
            )),
        }
    }

    fn writes(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::Write)
    }

    fn random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

#[derive(Debug)]
struct Args {
    socket: String,
    pattern: Pattern,
    bs: u64,
    qd: usize,
    seconds: f64,
    region: Option<u64>,
}

const USAGE: &str =
    "usage: blkio_load SOCKET randread|randwrite|read|write BLOCK_SIZE QUEUE_DEPTH SECONDS [REGION_SIZE]";

/// `4096`, `4k`, `1M`, `1G` (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("bad size {s:?}"))
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    if !(6..=7).contains(&argv.len()) {
        return Err(USAGE.to_string());
    }
    let bs = parse_size(&argv[3])?;
    if bs % 512 != 0 || bs > 32 << 20 {
        return Err(format!(
            "block size {bs} must be a multiple of 512, at most 32M"
        ));
    }
    let qd = argv[4]
        .parse::<usize>()
        .ok()
        .filter(|q| (1..=1024).contains(q))
        .ok_or_else(|| format!("bad queue depth {:?} (1..=1024)", argv[4]))?;
    let seconds = argv[5]
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .ok_or_else(|| format!("bad runtime {:?}", argv[5]))?;
    let region = argv.get(6).map(|s| parse_size(s)).transpose()?;
    Ok(Args {
        socket: argv[1].clone(),
        pattern: Pattern::parse(&argv[2])?,
        bs,
        qd,
        seconds,
        region,
    })
}

/// Offsets of the next requests: uniform random blocks or a wrapping scan.
#[derive(Debug)]
struct Offsets {
    random: bool,
    bs: u64,
    blocks: u64,
    next: u64,
    rng: u64,
}

impl Offsets {
    fn new(random: bool, bs: u64, region: u64) -> Offsets {
        Offsets {
            random,
            bs,
            blocks: region / bs,
            next: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    fn next(&mut self) -> u64 {
        let block = if self.random {
            xorshift(&mut self.rng) % self.blocks
        } else {
            let b = self.next;
            self.next = (self.next + 1) % self.blocks;
            b
        };
        block * self.bs
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    s.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// The client's buffers: `qd` slots of `bs` bytes in a mapped memory region.
#[derive(Debug)]
struct Slots {
    base: *mut u8,
    bs: usize,
    qd: usize,
}

impl Slots {
    fn ptr(&self, slot: usize) -> *mut u8 {
        self.base.wrapping_add(slot * self.bs)
    }

    fn fill_random(&mut self) {
        let mut rng = 0x0123_4567_89ab_cdefu64;
        // SAFETY: `base` maps `qd * bs` bytes (allocated in `connect`) that
        // live as long as the Blkio instance; no request is in flight yet.
        let all = unsafe { std::slice::from_raw_parts_mut(self.base, self.qd * self.bs) };
        for chunk in all.chunks_mut(8) {
            let v = xorshift(&mut rng).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// Make the next write from `slot` differ from its last one.
    fn stamp(&mut self, slot: usize, counter: u64) {
        // SAFETY: the slot's first 8 bytes are inside the mapping (bs >= 512)
        // and the slot's previous request has completed.
        let head = unsafe { std::slice::from_raw_parts_mut(self.ptr(slot), 8) };
        head.copy_from_slice(&(counter | 1 << 63).to_le_bytes());
    }
}

struct Client {
    // Field order: the queue is dropped before the instance owning the memory.
    q: Blkioq,
    b: Blkio,
    slots: Slots,
    capacity: u64,
}

fn blk_err(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn connect(args: &Args) -> Result<Client, String> {
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blk_err("blkio"))?;
    b.set_str("path", &args.socket).map_err(blk_err("path"))?;
    b.connect()
        .map_err(blk_err(&format!("connect to {}", args.socket)))?;
    b.set_i32("num-queues", 1).map_err(blk_err("num-queues"))?;
    let qsize = args.qd.next_power_of_two().max(256);
    b.set_i32("queue-size", i32::try_from(qsize).unwrap_or(1024))
        .map_err(blk_err("queue-size"))?;
    let mut out = b.start().map_err(blk_err("start"))?;
    let q = out.queues.pop().ok_or("the driver started no queue")?;
    let capacity = b.get_u64("capacity").map_err(blk_err("capacity"))?;
    let align = b
        .get_u64("mem-region-alignment")
        .map_err(blk_err("mem-region-alignment"))?
        .max(1);
    let bytes = args.bs * args.qd as u64;
    let len = usize::try_from(bytes.div_ceil(align) * align).map_err(|e| e.to_string())?;
    let mr = b
        .alloc_mem_region(len)
        .map_err(blk_err("alloc_mem_region"))?;
    b.map_mem_region(&mr).map_err(blk_err("map_mem_region"))?;
    let slots = Slots {
        base: mr.addr as *mut u8,
        bs: args.bs as usize,
        qd: args.qd,
    };
    Ok(Client {
        q,
        b,
        slots,
        capacity,
    })
}

#[derive(Debug, Default)]
struct Totals {
    ios: u64,
    bytes: u64,
    seconds: f64,
}

fn submit(c: &mut Client, writes: bool, slot: usize, off: u64, counter: u64) {
    let (p, len) = (c.slots.ptr(slot), c.slots.bs);
    if writes {
        c.slots.stamp(slot, counter);
        c.q.write(off, p, len, slot, ReqFlags::empty());
    } else {
        c.q.read(off, p, len, slot, ReqFlags::empty());
    }
}

/// Keep `qd` requests in flight until the deadline, then drain them all.
fn run(c: &mut Client, args: &Args, region: u64) -> Result<Totals, String> {
    let writes = args.pattern.writes();
    let mut offs = Offsets::new(args.pattern.random(), args.bs, region);
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..args.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut submitted = 0u64;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(args.seconds);
    for slot in 0..args.qd {
        submit(c, writes, slot, offs.next(), submitted);
        submitted += 1;
    }
    let mut tot = Totals::default();
    let mut in_flight = args.qd;
    let mut stopping = false;
    while in_flight > 0 {
        let n =
            c.q.do_io(&mut comps, 1, None, None)
                .map_err(blk_err("do_io"))?;
        stopping = stopping || Instant::now() >= deadline;
        for comp in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let comp = unsafe { comp.assume_init_read() };
            if comp.ret != 0 {
                return Err(format!("request failed: errno {}", -comp.ret));
            }
            tot.ios += 1;
            tot.bytes += args.bs;
            in_flight -= 1;
            if !stopping {
                submit(c, writes, comp.user_data, offs.next(), submitted);
                submitted += 1;
                in_flight += 1;
            }
        }
    }
    tot.seconds = t0.elapsed().as_secs_f64();
    Ok(tot)
}

fn json_line(t: &Totals) -> String {
    let iops = t.ios as f64 / t.seconds;
    let mib_s = t.bytes as f64 / t.seconds / f64::from(1u32 << 20);
    format!(
        "{{\"ios\":{},\"bytes\":{},\"seconds\":{:.6},\"iops\":{:.1},\"mib_s\":{:.2}}}",
        t.ios, t.bytes, t.seconds, iops, mib_s
    )
}

fn real_main() -> Result<(), String> {
    let argv: Vec<String> = std::env::args().collect();
    let args = parse_args(&argv)?;
    let mut c = connect(&args)?;
    let region = args.region.unwrap_or(c.capacity).min(c.capacity);
    if region < args.bs {
        return Err(format!(
            "region {region} is smaller than a block of {}",
            args.bs
        ));
    }
    if args.pattern.writes() {
        if c.b.get_bool("read-only").unwrap_or(false) {
            return Err("the export is read-only".to_string());
        }
        c.slots.fill_random();
    }
    let totals = run(&mut c, &args, region)?;
    println!("{}", json_line(&totals));
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkio_load: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_size_suffixes_scale_binary() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("k").is_err());
    }

    #[test]
    fn test_parse_args_bad_block_size_is_rejected() {
        let a = |v: &[&str]| parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(a(&["x", "s", "randread", "4k", "32", "5"]).is_ok());
        assert!(a(&["x", "s", "randread", "1000", "32", "5"]).is_err());
        assert!(a(&["x", "s", "trim", "4k", "32", "5"]).is_err());
        assert!(a(&["x", "s", "read", "1M", "0", "5"]).is_err());
        let ok = a(&["x", "s", "write", "1M", "8", "4.5", "256M"]).unwrap();
        assert_eq!(ok.region, Some(256 << 20));
        assert_eq!(ok.pattern, Pattern::Write);
    }

    #[test]
    fn test_offsets_stay_aligned_inside_region() {
        let mut r = Offsets::new(true, 4096, 1 << 20);
        for _ in 0..10_000 {
            let o = r.next();
            assert_eq!(o % 4096, 0);
            assert!(o + 4096 <= 1 << 20);
        }
        let mut s = Offsets::new(false, 1 << 20, 3 << 20);
        let seq: Vec<u64> = (0..4).map(|_| s.next()).collect();
        assert_eq!(seq, [0, 1 << 20, 2 << 20, 0]);
    }
}
