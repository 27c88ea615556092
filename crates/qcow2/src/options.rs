//! `BlockdevOptionsQcow2` (without the child members) and what follows from
//! it: cache sizes and the overlap check mask.

use qsd_block::{Error, Result};
use serde::Deserialize;
use serde_json::Value;

/// The options of a qcow2 node other than its children.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Qcow2Opts {
    pub lazy_refcounts: Option<bool>,
    pub pass_discard_request: Option<bool>,
    pub pass_discard_snapshot: Option<bool>,
    pub pass_discard_other: Option<bool>,
    pub discard_no_unref: Option<bool>,
    pub overlap_check: Option<Value>,
    pub cache_size: Option<u64>,
    pub l2_cache_size: Option<u64>,
    pub l2_cache_entry_size: Option<u64>,
    pub refcount_cache_size: Option<u64>,
    pub cache_clean_interval: Option<u64>,
    pub encrypt: Option<Value>,
}

/// Metadata structures an overlap check covers (qemu's QCow2MetadataOverlap).
pub mod overlap {
    pub const MAIN_HEADER: u32 = 1 << 0;
    pub const ACTIVE_L1: u32 = 1 << 1;
    pub const ACTIVE_L2: u32 = 1 << 2;
    pub const REFCOUNT_TABLE: u32 = 1 << 3;
    pub const REFCOUNT_BLOCK: u32 = 1 << 4;
    pub const SNAPSHOT_TABLE: u32 = 1 << 5;
    pub const INACTIVE_L1: u32 = 1 << 6;
    pub const INACTIVE_L2: u32 = 1 << 7;
    pub const BITMAP_DIRECTORY: u32 = 1 << 8;
    /// Checks that need no I/O and little time.
    pub const CONSTANT: u32 =
        MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | INACTIVE_L1 | BITMAP_DIRECTORY;
    /// The default.
    pub const CACHED: u32 = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK;
    /// Everything.
    pub const ALL: u32 = CACHED | INACTIVE_L2;

    /// Names of the per-structure flags, as in the option object.
    pub const NAMES: [(&str, u32); 9] = [
        ("main-header", MAIN_HEADER),
        ("active-l1", ACTIVE_L1),
        ("active-l2", ACTIVE_L2),
        ("refcount-table", REFCOUNT_TABLE),
        ("refcount-block", REFCOUNT_BLOCK),
        ("snapshot-table", SNAPSHOT_TABLE),
        ("inactive-l1", INACTIVE_L1),
        ("inactive-l2", INACTIVE_L2),
        ("bitmap-directory", BITMAP_DIRECTORY),
    ];
}

fn template(name: &str) -> Result<u32> {
    match name {
        "none" => Ok(0),
        "constant" => Ok(overlap::CONSTANT),
        "cached" => Ok(overlap::CACHED),
        "all" => Ok(overlap::ALL),
        _ => Err(Error::invalid(format!(
            "Parameter 'overlap-check' does not accept value '{name}'"
        ))),
    }
}

fn flag(v: &Value, key: &str) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => match s.as_str() {
            "on" | "yes" | "true" | "y" => Ok(true),
            "off" | "no" | "false" | "n" => Ok(false),
            _ => Err(Error::invalid(format!(
                "Parameter 'overlap-check.{key}' expects 'on' or 'off'"
            ))),
        },
        _ => Err(Error::invalid(format!(
            "Invalid parameter type for 'overlap-check.{key}', expected: boolean"
        ))),
    }
}

/// The overlap check mask: a template name, or an object with a template
/// and per-structure flags (default template `cached`).
pub fn overlap_mask(v: Option<&Value>) -> Result<u32> {
    match v {
        None => Ok(overlap::CACHED),
        Some(Value::String(s)) => template(s),
        Some(Value::Object(m)) => {
            let mut mask = match m.get("template") {
                Some(Value::String(t)) => template(t)?,
                Some(_) => {
                    return Err(Error::invalid(
                        "Invalid parameter type for 'overlap-check.template', expected: string",
                    ))
                }
                None => overlap::CACHED,
            };
            for (key, val) in m {
                if key == "template" {
                    continue;
                }
                let Some((_, bit)) = overlap::NAMES.iter().find(|(n, _)| n == key) else {
                    return Err(Error::invalid(format!(
                        "Parameter 'overlap-check.{key}' is unexpected"
                    )));
                };
                if flag(val, key)? {
                    mask |= bit;
                } else {
                    mask &= !bit;
                }
            }
            Ok(mask)
        }
        Some(_) => Err(Error::invalid(
            "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks",
        )),
    }
}

/// Cache sizes in bytes: (L2, refcount).
pub fn cache_sizes(
    o: &Qcow2Opts,
    disk_size: u64,
    cluster_size: u64,
    l2_entry: u64,
) -> Result<(u64, u64)> {
    const MAX_L2_DEFAULT: u64 = 32 << 20;
    let min_l2 = 2 * cluster_size;
    let min_rc = 4 * cluster_size;
    let max_l2_cache = disk_size
        .div_ceil(cluster_size)
        .saturating_mul(l2_entry)
        .next_multiple_of(cluster_size);
    let (l2, rc) =
        match (o.cache_size, o.l2_cache_size, o.refcount_cache_size) {
            (Some(_), Some(_), Some(_)) => return Err(Error::invalid(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
            )),
            (Some(c), Some(l2), None) => {
                if l2 > c {
                    return Err(Error::invalid("l2-cache-size may not exceed cache-size"));
                }
                (l2, c - l2)
            }
            (Some(c), None, Some(rc)) => {
                if rc > c {
                    return Err(Error::invalid(
                        "refcount-cache-size may not exceed cache-size",
                    ));
                }
                (c - rc, rc)
            }
            (Some(c), None, None) => {
                let l2 = max_l2_cache.min(c.saturating_sub(min_rc));
                (l2, c - l2.min(c))
            }
            (None, l2, rc) => (
                l2.unwrap_or_else(|| max_l2_cache.min(MAX_L2_DEFAULT)),
                rc.unwrap_or(min_rc),
            ),
        };
    Ok((l2.max(min_l2), rc.max(min_rc)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_overlap_mask_template_and_flags() {
        assert_eq!(overlap_mask(None).unwrap(), overlap::CACHED);
        assert_eq!(overlap_mask(Some(&json!("none"))).unwrap(), 0);
        let m = overlap_mask(Some(&json!({"template": "none", "main-header": true}))).unwrap();
        assert_eq!(m, overlap::MAIN_HEADER);
        let m = overlap_mask(Some(&json!({"active-l2": "off"}))).unwrap();
        assert_eq!(m, overlap::CACHED & !overlap::ACTIVE_L2);
        assert!(overlap_mask(Some(&json!("sometimes"))).is_err());
        assert!(overlap_mask(Some(&json!({"bogus": true}))).is_err());
    }

    #[test]
    fn test_cache_sizes_default_covers_small_image() {
        let o = Qcow2Opts::default();
        let (l2, rc) = cache_sizes(&o, 1 << 30, 65536, 8).unwrap();
        assert_eq!(l2, 131072);
        assert_eq!(rc, 4 * 65536);
        let (l2, _) = cache_sizes(&o, 1 << 50, 65536, 8).unwrap();
        assert_eq!(l2, 32 << 20);
    }

    #[test]
    fn test_cache_sizes_all_three_is_refused() {
        let o = Qcow2Opts {
            cache_size: Some(1),
            l2_cache_size: Some(1),
            refcount_cache_size: Some(1),
            ..Qcow2Opts::default()
        };
        assert!(cache_sizes(&o, 1 << 30, 65536, 8).is_err());
    }
}
