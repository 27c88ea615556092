//! The quorum node: its children, permissions, and the data plane.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use qsd_block::perm::UserDesc;
use qsd_block::{
    BlockDriver, BlockStatus, BoxFut, DriverFactory, Error, ErrorKind, EventSink, ImageInfo,
    Limits, NodeRef, OpenCtx, Perm, PermUser, Result, WriteFlags, ZeroFlags,
};
use qsd_drivers::jsonname::{json_filename, node_options};
use qsd_rt::IoBuf;
use serde_json::{Map, Value};

use crate::events::{report_bad, report_failure, OpType};
use crate::join::join_all;
use crate::options::{self, Config, ReadPattern};
use crate::vote::{tally, winner};

/// Factory for `quorum`.
#[derive(Debug, Default)]
pub struct QuorumFactory;

impl DriverFactory for QuorumFactory {
    fn name(&self) -> &'static str {
        "quorum"
    }

    fn open<'a>(
        &'a self,
        ctx: &'a mut OpenCtx<'_>,
        opts: Map<String, Value>,
    ) -> BoxFut<'a, Box<dyn BlockDriver>> {
        Box::pin(async move {
            let (cfg, refs) = options::parse(ctx, opts)?;
            let mut nodes = Vec::with_capacity(refs.len());
            for (i, r) in refs.into_iter().enumerate() {
                nodes.push(ctx.child_from(&format!("children.{i}"), r).await?);
            }
            let d = QuorumDriver::new(ctx.node_name(), cfg, ctx.events(), nodes)?;
            Ok(Box::new(d) as Box<dyn BlockDriver>)
        })
    }
}

/// One child: its name ("children.N"), node and the permissions we hold.
#[derive(Debug)]
struct Child {
    name: String,
    node: NodeRef,
    /// Dropped (permissions given back) when the last request that may
    /// still use the child has finished with it.
    user: PermUser,
}

type Children = Arc<Vec<Arc<Child>>>;

#[derive(Debug)]
struct State {
    /// The live list; requests take a snapshot, so changing it never waits.
    children: Children,
    /// Index for the next child's name; qemu's rules (see `remove_child`).
    next_index: u64,
    /// What our own users take and share, to derive the children's.
    perm: Perm,
    shared: Perm,
}

/// A write-like request to send to every child.
#[derive(Debug, Clone, Copy)]
enum WriteOp {
    Data(WriteFlags),
    Zeroes(ZeroFlags),
}

/// A `quorum` node.
#[derive(Debug)]
pub struct QuorumDriver {
    name: String,
    cfg: Config,
    events: EventSink,
    state: RwLock<State>,
}

impl QuorumDriver {
    fn new(name: &str, cfg: Config, events: EventSink, nodes: Vec<NodeRef>) -> Result<Self> {
        let d = QuorumDriver {
            name: name.to_string(),
            cfg,
            events,
            state: RwLock::new(State {
                children: Arc::new(Vec::new()),
                next_index: 0,
                perm: Perm::NONE,
                shared: Perm::ALL,
            }),
        };
        let mut kids = Vec::with_capacity(nodes.len());
        for (i, node) in nodes.into_iter().enumerate() {
            kids.push(Arc::new(d.attach(
                node,
                format!("children.{i}"),
                Perm::NONE,
                Perm::ALL,
            )?));
        }
        // qemu fails the open when the children's sizes differ.
        if let Some(first) = kids.first() {
            let len = first.node.len();
            if kids.iter().any(|c| c.node.len() != len) {
                return Err(Error::new(
                    ErrorKind::Io,
                    "Could not refresh total sector count: Input/output error",
                ));
            }
        }
        {
            let mut st = d.write_state();
            st.next_index = kids.len() as u64;
            st.children = Arc::new(kids);
        }
        Ok(d)
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        match self.state.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        match self.state.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn snapshot(&self) -> Children {
        self.read_state().children.clone()
    }

    /// qemu's `quorum_child_perm`: everything our users take passes down
    /// (plus write when we may rewrite), and children never share write or
    /// resize, which would let them drift apart.
    fn child_perms(&self, perm: Perm, shared: Perm) -> (Perm, Perm) {
        let take = if self.cfg.rewrite {
            perm | Perm::WRITE
        } else {
            perm
        };
        (
            take,
            shared & (Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED),
        )
    }

    /// Take `node` as child `name` with the permissions our users' `(perm,
    /// shared)` imply.
    fn attach(&self, node: NodeRef, name: String, perm: Perm, shared: Perm) -> Result<Child> {
        let (take, share) = self.child_perms(perm, shared);
        if take.contains(Perm::WRITE) && node.is_read_only() {
            return Err(Error::new(ErrorKind::ReadOnly, "Block node is read-only"));
        }
        let desc = UserDesc {
            who: format!("node '{}'", self.name),
            role: name.clone(),
        };
        let user = node.add_user(desc, take, share)?;
        Ok(Child { name, node, user })
    }

    /// The vote threshold.
    pub fn vote_threshold(&self) -> usize {
        self.cfg.threshold
    }

    /// The read pattern.
    pub fn read_pattern(&self) -> ReadPattern {
        self.cfg.pattern
    }

    /// The live children: (child name such as "children.2", node), in
    /// voting order. `Node::children()` of the quorum node lists only those
    /// given at open.
    pub fn children(&self) -> Vec<(String, NodeRef)> {
        self.snapshot()
            .iter()
            .map(|c| (c.name.clone(), c.node.clone()))
            .collect()
    }

    /// `x-blockdev-change parent=Q node=N`: add `node` as the last child.
    /// Returns the new child's name ("children.N"). Errors are qemu's: the
    /// node has a parent (any user, an export too), blkverify mode, or a
    /// permission conflict.
    pub fn add_child(&self, node: NodeRef) -> Result<String> {
        if !node.user_names().is_empty() {
            return Err(Error::invalid(format!(
                "The node {} already has a parent",
                node.name()
            )));
        }
        if self.cfg.blkverify {
            return Err(Error::invalid(
                "Cannot add a child to a quorum in blkverify mode",
            ));
        }
        let mut st = self.write_state();
        if st.next_index >= u64::from(u32::MAX) {
            return Err(Error::invalid("Too many children"));
        }
        let name = format!("children.{}", st.next_index);
        let child = self.attach(node, name.clone(), st.perm, st.shared)?;
        st.next_index += 1;
        let mut list: Vec<Arc<Child>> = st.children.iter().cloned().collect();
        list.push(Arc::new(child));
        st.children = Arc::new(list);
        Ok(name)
    }

    /// `x-blockdev-change parent=Q child=NAME`: remove a child. Requests in
    /// flight finish with the old list; the child's permissions are given
    /// back when the last of them is done.
    pub fn remove_child(&self, child: &str) -> Result<()> {
        let mut st = self.write_state();
        let Some(pos) = st.children.iter().position(|c| c.name == child) else {
            return Err(Error::invalid(format!(
                "Node '{}' does not have child '{child}'",
                self.name
            )));
        };
        if st.children.len() <= self.cfg.threshold {
            return Err(Error::invalid(format!(
                "The number of children cannot be lower than the vote threshold {}",
                self.cfg.threshold
            )));
        }
        // As qemu: only removing the newest child frees its index.
        if st.next_index > 0 && child == format!("children.{}", st.next_index - 1) {
            st.next_index -= 1;
        }
        let mut list: Vec<Arc<Child>> = st.children.iter().cloned().collect();
        list.remove(pos);
        st.children = Arc::new(list);
        Ok(())
    }

    fn bad(&self, op: OpType, offset: u64, bytes: u64, child: &Child, err: Option<&Error>) {
        report_bad(
            &self.events,
            op,
            offset,
            bytes,
            child.node.name(),
            err.map(Error::errno),
        );
    }

    /// The error most failed children agree on (qemu's error vote).
    fn voted_error<T>(results: &[Result<T>]) -> Error {
        let failed: Vec<usize> = (0..results.len())
            .filter(|&i| results[i].is_err())
            .collect();
        let errno = |i: usize| results[i].as_ref().err().map(Error::errno);
        let versions = tally(&failed, |a, b| errno(a) == errno(b));
        winner(&versions)
            .and_then(|w| results[versions[w].first].as_ref().err().cloned())
            .unwrap_or_else(|| Error::new(ErrorKind::Io, "quorum has no children"))
    }

    /// qemu's `quorum_has_too_much_io_failed`: fewer successes than the
    /// threshold fail the request with the voted error and QUORUM_FAILURE.
    fn check_failures<T>(&self, offset: u64, len: u64, results: &[Result<T>]) -> Result<()> {
        let ok = results.iter().filter(|r| r.is_ok()).count();
        if ok >= self.cfg.threshold {
            return Ok(());
        }
        let err = Self::voted_error(results);
        report_failure(&self.events, &self.name, offset, len);
        Err(err)
    }

    async fn read_fifo(&self, kids: &[Arc<Child>], offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len();
        let mut buf = Some(buf);
        let mut last = None;
        for c in kids {
            let b = buf.take().unwrap_or_else(|| IoBuf::new(len));
            match c.node.read(offset, b).await {
                Ok(b) => return Ok(b),
                Err(e) => {
                    self.bad(OpType::Read, offset, len as u64, c, Some(&e));
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::new(ErrorKind::Io, "quorum has no children")))
    }

    async fn read_quorum(&self, kids: &[Arc<Child>], offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len();
        let mut first = Some(buf);
        let futs: Vec<BoxFut<'_, IoBuf>> = kids
            .iter()
            .map(|c| {
                let b = first.take().unwrap_or_else(|| IoBuf::new(len));
                Box::pin(c.node.read(offset, b)) as BoxFut<'_, IoBuf>
            })
            .collect();
        let mut results = join_all(futs).await;
        for (c, r) in kids.iter().zip(&results) {
            if let Err(e) = r {
                self.bad(OpType::Read, offset, len as u64, c, Some(e));
            }
        }
        self.check_failures(offset, len as u64, &results)?;
        let ok: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_ok()).collect();
        let data = |i: usize| results[i].as_ref().map_or(&[][..], |b| &b[..]);
        // Not empty: at least `threshold` (>= 1) children succeeded.
        let base = ok[0];
        if self.cfg.blkverify {
            for &j in &ok[1..] {
                if let Some(at) = data(base).iter().zip(data(j)).position(|(a, b)| a != b) {
                    return Err(blkverify_mismatch(offset, len as u64, offset + at as u64));
                }
            }
        }
        if ok[1..].iter().all(|&j| data(base) == data(j)) {
            return take_buf(&mut results, base);
        }
        let versions = tally(&ok, |a, b| data(a) == data(b));
        let Some(w) = winner(&versions).filter(|&w| versions[w].voters.len() >= self.cfg.threshold)
        else {
            report_failure(&self.events, &self.name, offset, len as u64);
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "quorum '{}': no version of {len} bytes at offset {offset} reached the vote \
                     threshold of {}",
                    self.name, self.cfg.threshold
                ),
            ));
        };
        let losers: Vec<usize> = versions
            .iter()
            .enumerate()
            .filter(|&(pos, _)| pos != w)
            .flat_map(|(_, v)| v.voters.iter().copied())
            .collect();
        for &i in &losers {
            self.bad(OpType::Read, offset, len as u64, &kids[i], None);
        }
        let good = take_buf(&mut results, versions[w].first)?;
        if self.cfg.rewrite {
            self.rewrite(kids, &losers, offset, &good).await;
        }
        Ok(good)
    }

    /// Write the winning data back to the children that lost the vote;
    /// errors are ignored (it is only an attempt to repair).
    async fn rewrite(&self, kids: &[Arc<Child>], losers: &[usize], offset: u64, good: &IoBuf) {
        let futs: Vec<BoxFut<'_, IoBuf>> = losers
            .iter()
            .map(|&i| {
                let node = &kids[i].node;
                Box::pin(node.write(offset, good.clone(), WriteFlags::default()))
                    as BoxFut<'_, IoBuf>
            })
            .collect();
        for (i, r) in losers.iter().zip(join_all(futs).await) {
            if let Err(e) = r {
                tracing::warn!(node = kids[*i].node.name(), "quorum rewrite failed: {e}");
            }
        }
    }

    /// Send a write or write-zeroes to every child at once; returns a buffer
    /// a child gave back, for data writes.
    async fn write_all(
        &self,
        offset: u64,
        len: u64,
        buf: Option<IoBuf>,
        op: WriteOp,
    ) -> Result<Option<IoBuf>> {
        let kids = self.snapshot();
        let mut bufs: Vec<Option<IoBuf>> = Vec::with_capacity(kids.len());
        for _ in 1..kids.len() {
            bufs.push(buf.clone());
        }
        bufs.push(buf);
        let futs: Vec<BoxFut<'_, Option<IoBuf>>> = kids
            .iter()
            .zip(bufs)
            .map(|(c, b)| {
                let node = c.node.clone();
                Box::pin(async move {
                    match (op, b) {
                        (WriteOp::Data(f), Some(b)) => node.write(offset, b, f).await.map(Some),
                        (WriteOp::Zeroes(f), _) => {
                            node.write_zeroes(offset, len, f).await.map(|()| None)
                        }
                        (WriteOp::Data(_), None) => Ok(None),
                    }
                }) as BoxFut<'_, Option<IoBuf>>
            })
            .collect();
        let mut results = join_all(futs).await;
        if let WriteOp::Zeroes(f) = op {
            // A fast-zero request some child cannot do fast: the caller
            // writes zeroes itself, nothing is wrong with the child.
            if f.no_fallback {
                if let Some(Err(e)) = results
                    .iter()
                    .find(|r| matches!(r, Err(e) if e.kind() == ErrorKind::Unsupported))
                {
                    return Err(e.clone());
                }
            }
        }
        for (c, r) in kids.iter().zip(&results) {
            if let Err(e) = r {
                self.bad(OpType::Write, offset, len, c, Some(e));
            }
        }
        self.check_failures(offset, len, &results)?;
        Ok(results
            .iter_mut()
            .find_map(|r| r.as_mut().ok().and_then(Option::take)))
    }

    async fn flush_all(&self) -> Result<()> {
        let kids = self.snapshot();
        let futs: Vec<BoxFut<'_, ()>> = kids
            .iter()
            .map(|c| Box::pin(c.node.flush()) as BoxFut<'_, ()>)
            .collect();
        let results = join_all(futs).await;
        for (c, r) in kids.iter().zip(&results) {
            if let Err(e) = r {
                // qemu reports flush failures with an empty range.
                self.bad(OpType::Flush, 0, 0, c, Some(e));
            }
        }
        // Unlike reads and writes, a failed flush raises no QUORUM_FAILURE.
        let ok = results.iter().filter(|r| r.is_ok()).count();
        if ok >= self.cfg.threshold {
            Ok(())
        } else {
            Err(Self::voted_error(&results))
        }
    }

    /// Zeroes only where every child reads zeroes (the shortest such run),
    /// otherwise data (the longest data run), as qemu.
    async fn status_all(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let kids = self.snapshot();
        let futs: Vec<BoxFut<'_, BlockStatus>> = kids
            .iter()
            .map(|c| Box::pin(c.node.block_status(offset, len)) as BoxFut<'_, BlockStatus>)
            .collect();
        let results = join_all(futs).await;
        let (mut zero_len, mut data_len) = (len, 0);
        for (c, r) in kids.iter().zip(&results) {
            match r {
                Err(e) => {
                    self.bad(OpType::Read, offset, len, c, Some(e));
                    data_len = len;
                    break;
                }
                Ok(st) if st.zero => zero_len = zero_len.min(st.len),
                Ok(st) => data_len = data_len.max(st.len),
            }
        }
        Ok(if data_len > 0 {
            BlockStatus::data(data_len)
        } else {
            BlockStatus::hole(zero_len)
        })
    }
}

/// Move the buffer of a successful child out of `results`.
fn take_buf(results: &mut [Result<IoBuf>], i: usize) -> Result<IoBuf> {
    let placeholder = Err(Error::new(ErrorKind::Io, "quorum: buffer already taken"));
    std::mem::replace(&mut results[i], placeholder)
}

/// blkverify mode found two children that differ: log qemu's message and
/// fail the read with EIO. qemu exits the process here; qsd keeps serving
/// its other nodes and exports, and the client sees the error.
fn blkverify_mismatch(offset: u64, bytes: u64, at: u64) -> Error {
    let msg = format!("quorum: offset={offset} bytes={bytes} contents mismatch at offset {at}");
    tracing::error!("{msg}");
    Error::new(ErrorKind::Io, msg)
}

impl BlockDriver for QuorumDriver {
    fn driver_name(&self) -> &'static str {
        "quorum"
    }

    fn len(&self) -> u64 {
        self.snapshot().first().map_or(0, |c| c.node.len())
    }

    fn limits(&self) -> Limits {
        // Children pad their own requests; transfer sizes merge as in qemu.
        let mut l = Limits::default();
        for c in self.snapshot().iter() {
            let cl = c.node.driver().limits();
            if cl.max_transfer != 0 && (l.max_transfer == 0 || cl.max_transfer < l.max_transfer) {
                l.max_transfer = cl.max_transfer;
            }
            l.opt_transfer = l.opt_transfer.max(cl.opt_transfer);
        }
        l
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            let kids = self.snapshot();
            match self.cfg.pattern {
                ReadPattern::Fifo => self.read_fifo(&kids, offset, buf).await,
                ReadPattern::Quorum => self.read_quorum(&kids, offset, buf).await,
            }
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFut<'_, IoBuf> {
        Box::pin(async move {
            let len = buf.len();
            let back = self
                .write_all(offset, len as u64, Some(buf), WriteOp::Data(flags))
                .await?;
            Ok(back.unwrap_or_else(|| IoBuf::new(len)))
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFut<'_, ()> {
        Box::pin(async move {
            self.write_all(offset, len, None, WriteOp::Zeroes(flags))
                .await
                .map(|_| ())
        })
    }

    fn flush(&self) -> BoxFut<'_, ()> {
        Box::pin(self.flush_all())
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFut<'_, BlockStatus> {
        Box::pin(self.status_all(offset, len))
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        let mut st = self.write_state();
        let (take, share) = self.child_perms(perm, shared);
        let (old_take, old_share) = self.child_perms(st.perm, st.shared);
        if take.contains(Perm::WRITE) && st.children.iter().any(|c| c.node.is_read_only()) {
            return Err(Error::new(ErrorKind::ReadOnly, "Block node is read-only"));
        }
        for (i, c) in st.children.iter().enumerate() {
            if let Err(e) = c.user.update(take, share) {
                for done in &st.children[..i] {
                    let _ = done.user.update(old_take, old_share);
                }
                return Err(e);
            }
        }
        st.perm = perm;
        st.shared = shared;
        Ok(())
    }

    fn image_info(&self) -> ImageInfo {
        let kids = self.snapshot();
        let mut m = self.cfg.shown.clone();
        m.insert("driver".into(), "quorum".into());
        let list: Vec<Value> = kids.iter().map(|c| node_options(&c.node)).collect();
        m.insert("children".into(), Value::Array(list));
        // As qemu: the space the children take together.
        let sizes: Vec<u64> = kids
            .iter()
            .filter_map(|c| c.node.driver().image_info().actual_size)
            .collect();
        ImageInfo {
            filename: json_filename(&m),
            actual_size: (!sizes.is_empty()).then(|| sizes.iter().sum()),
            ..ImageInfo::default()
        }
    }
}
