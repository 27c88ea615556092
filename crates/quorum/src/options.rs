//! `BlockdevOptionsQuorum`: parsing and qemu's checks, in qemu's order.

use qsd_block::{Error, OpenCtx, Result};
use qsd_qapi::Raw;
use serde::Deserialize;
use serde_json::{Map, Value};

/// `read-pattern`: how reads use the children.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadPattern {
    /// Read every child and vote.
    #[default]
    Quorum,
    /// Read the first child; the next ones only if it fails.
    Fifo,
}

impl ReadPattern {
    fn as_str(self) -> &'static str {
        match self {
            ReadPattern::Quorum => "quorum",
            ReadPattern::Fifo => "fifo",
        }
    }
}

/// The driver's own members, in the schema's order (which decides which
/// error qemu reports first).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct QuorumOpts {
    blkverify: Option<bool>,
    children: Vec<Raw>,
    vote_threshold: i64,
    rewrite_corrupted: Option<bool>,
    read_pattern: Option<ReadPattern>,
}

/// Checked settings of a quorum node.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Votes a version needs to win (at least 1).
    pub threshold: usize,
    /// Compare the two children and stop the process on a difference.
    pub blkverify: bool,
    /// Write the winning data back to children that lost the vote.
    pub rewrite: bool,
    pub pattern: ReadPattern,
    /// The driver options as given (without `children`), typed, for the
    /// `json:` file name: qemu shows the options that were set.
    pub shown: Map<String, Value>,
}

/// Parse and check the options; returns the settings and the children's
/// references (node names or inline options), not yet opened.
pub(crate) fn parse(ctx: &OpenCtx<'_>, opts: Map<String, Value>) -> Result<(Config, Vec<Value>)> {
    let o: QuorumOpts = ctx.parse(opts)?;
    let mut children = Vec::with_capacity(o.children.len());
    for c in &o.children {
        match &c.value {
            Value::String(_) | Value::Object(_) => children.push(c.value.clone()),
            _ => {
                // qemu names list elements 'null' in alternate errors.
                return Err(Error::invalid(format!(
                    "Invalid parameter type for '{}', expected: BlockdevRef",
                    c.name()
                )));
            }
        }
    }
    let n = children.len();
    if n < 1 {
        return Err(Error::invalid(
            "Number of provided children must be 1 or more",
        ));
    }
    if o.vote_threshold < 1 {
        return Err(Error::invalid(
            "Parameter 'vote-threshold' expects a value >= 1",
        ));
    }
    let threshold = usize::try_from(o.vote_threshold).unwrap_or(usize::MAX);
    if threshold > n {
        return Err(Error::invalid("threshold may not exceed children count"));
    }
    let pattern = o.read_pattern.unwrap_or_default();
    // As qemu: in fifo mode blkverify and rewrite-corrupted are ignored.
    let (mut blkverify, mut rewrite) = (false, false);
    if pattern == ReadPattern::Quorum {
        blkverify = o.blkverify.unwrap_or(false);
        if blkverify && (n != 2 || threshold != 2) {
            return Err(Error::invalid(
                "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
            ));
        }
        rewrite = o.rewrite_corrupted.unwrap_or(false);
        if rewrite && blkverify {
            return Err(Error::invalid(
                "rewrite-corrupted=on cannot be used with blkverify=on",
            ));
        }
    }
    let mut shown = Map::new();
    shown.insert("vote-threshold".into(), o.vote_threshold.into());
    if let Some(b) = o.blkverify {
        shown.insert("blkverify".into(), b.into());
    }
    if let Some(r) = o.rewrite_corrupted {
        shown.insert("rewrite-corrupted".into(), r.into());
    }
    if let Some(p) = o.read_pattern {
        shown.insert("read-pattern".into(), p.as_str().into());
    }
    let cfg = Config {
        threshold,
        blkverify,
        rewrite,
        pattern,
        shown,
    };
    Ok((cfg, children))
}
