//! Throttling configuration: qemu's `ThrottleLimits` (the QMP view), the
//! `throttle-group` object properties, and the bucket configuration they
//! turn into, with qemu's validation rules and messages.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Largest rate or burst rate accepted (qemu's `THROTTLE_VALUE_MAX`).
pub const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

/// The six buckets, in qemu's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketType {
    /// Bytes per second, reads and writes.
    BpsTotal,
    /// Bytes per second, reads.
    BpsRead,
    /// Bytes per second, writes.
    BpsWrite,
    /// Operations per second, reads and writes.
    OpsTotal,
    /// Operations per second, reads.
    OpsRead,
    /// Operations per second, writes.
    OpsWrite,
}

impl BucketType {
    /// Every bucket, in qemu's order.
    pub const ALL: [BucketType; 6] = [
        BucketType::BpsTotal,
        BucketType::BpsRead,
        BucketType::BpsWrite,
        BucketType::OpsTotal,
        BucketType::OpsRead,
        BucketType::OpsWrite,
    ];

    /// Index into [`ThrottleConfig::buckets`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Which part of a bucket (or the config) a parameter sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    Avg(BucketType),
    Max(BucketType),
    BurstLength(BucketType),
    OpSize,
}

/// One parameter: its `ThrottleLimits` member name and what it sets. The
/// order is the order in which qemu applies (and so checks) them.
const PARAMS: [(&str, Category); 19] = {
    use BucketType::*;
    use Category::*;
    [
        ("bps-total", Avg(BpsTotal)),
        ("bps-read", Avg(BpsRead)),
        ("bps-write", Avg(BpsWrite)),
        ("iops-total", Avg(OpsTotal)),
        ("iops-read", Avg(OpsRead)),
        ("iops-write", Avg(OpsWrite)),
        ("bps-total-max", Max(BpsTotal)),
        ("bps-read-max", Max(BpsRead)),
        ("bps-write-max", Max(BpsWrite)),
        ("iops-total-max", Max(OpsTotal)),
        ("iops-read-max", Max(OpsRead)),
        ("iops-write-max", Max(OpsWrite)),
        ("bps-total-max-length", BurstLength(BpsTotal)),
        ("bps-read-max-length", BurstLength(BpsRead)),
        ("bps-write-max-length", BurstLength(BpsWrite)),
        ("iops-total-max-length", BurstLength(OpsTotal)),
        ("iops-read-max-length", BurstLength(OpsRead)),
        ("iops-write-max-length", BurstLength(OpsWrite)),
        ("iops-size", OpSize),
    ]
};

/// Names of the parameters (`iops-total`, ...), in qemu's order; the
/// group's `x-` properties are these names with an `x-` prefix.
pub fn param_names() -> impl Iterator<Item = &'static str> {
    PARAMS.iter().map(|(n, _)| *n)
}

fn category(name: &str) -> Option<Category> {
    PARAMS.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// Declares `ThrottleLimits` and `ThrottleGroupProps` from one member list,
/// so the two cannot drift apart.
macro_rules! limit_types {
    ($($field:ident: $name:literal, $xname:literal;)*) => {
        /// qemu's `ThrottleLimits`: every member optional; absent members
        /// keep their current value when applied.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ThrottleLimits {
            $(
                #[allow(missing_docs)]
                #[serde(rename = $name, default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<i64>,
            )*
        }

        impl ThrottleLimits {
            /// The members that are set, as (name, value).
            pub fn entries(&self) -> Vec<(&'static str, i64)> {
                let mut v = Vec::new();
                $( if let Some(x) = self.$field { v.push(($name, x)); } )*
                v
            }

            /// Set member `name` (a `ThrottleLimits` name); false if unknown.
            pub fn set(&mut self, name: &str, value: i64) -> bool {
                match name {
                    $( $name => self.$field = Some(value), )*
                    _ => return false,
                }
                true
            }
        }

        /// Properties of a `throttle-group` object (qemu's
        /// `ThrottleGroupProperties`): `limits`, or the unstable `x-`
        /// members one by one.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ThrottleGroupProps {
            /// All limits at once.
            #[serde(default)]
            pub limits: Option<ThrottleLimits>,
            $(
                #[allow(missing_docs)]
                #[serde(rename = $xname, default)]
                pub $field: Option<i64>,
            )*
        }

        impl ThrottleGroupProps {
            /// Every `x-` member's name, in declaration order (for `qom-list`).
            pub const X_NAMES: &'static [&'static str] = &[$($xname),*];

            /// The `x-` members that are set, as (name without `x-`, value).
            pub fn x_entries(&self) -> Vec<(&'static str, i64)> {
                let mut v = Vec::new();
                $( if let Some(x) = self.$field { v.push(($name, x)); } )*
                v
            }
        }
    };
}

limit_types! {
    iops_total: "iops-total", "x-iops-total";
    iops_total_max: "iops-total-max", "x-iops-total-max";
    iops_total_max_length: "iops-total-max-length", "x-iops-total-max-length";
    iops_read: "iops-read", "x-iops-read";
    iops_read_max: "iops-read-max", "x-iops-read-max";
    iops_read_max_length: "iops-read-max-length", "x-iops-read-max-length";
    iops_write: "iops-write", "x-iops-write";
    iops_write_max: "iops-write-max", "x-iops-write-max";
    iops_write_max_length: "iops-write-max-length", "x-iops-write-max-length";
    bps_total: "bps-total", "x-bps-total";
    bps_total_max: "bps-total-max", "x-bps-total-max";
    bps_total_max_length: "bps-total-max-length", "x-bps-total-max-length";
    bps_read: "bps-read", "x-bps-read";
    bps_read_max: "bps-read-max", "x-bps-read-max";
    bps_read_max_length: "bps-read-max-length", "x-bps-read-max-length";
    bps_write: "bps-write", "x-bps-write";
    bps_write_max: "bps-write-max", "x-bps-write-max";
    bps_write_max_length: "bps-write-max-length", "x-bps-write-max-length";
    iops_size: "iops-size", "x-iops-size";
}

/// One leaky bucket's configuration and fill level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeakyBucket {
    /// Average rate (units per second); 0 = no limit.
    pub avg: u64,
    /// Burst rate; 0 = no burst beyond a tenth of a second at `avg`.
    pub max: u64,
    /// Seconds a burst at `max` may last (at least 1).
    pub burst_length: u32,
    /// Units in the bucket.
    pub level: f64,
    /// Units in the burst bucket (only used when `burst_length > 1`).
    pub burst_level: f64,
}

impl Default for LeakyBucket {
    fn default() -> Self {
        LeakyBucket {
            avg: 0,
            max: 0,
            burst_length: 1,
            level: 0.0,
            burst_level: 0.0,
        }
    }
}

/// The limits of a group as buckets (qemu's `ThrottleConfig`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ThrottleConfig {
    /// Indexed by [`BucketType::index`].
    pub buckets: [LeakyBucket; 6],
    /// Requests larger than this count as several operations (0 = off).
    pub op_size: u64,
}

impl ThrottleConfig {
    /// The bucket of `t`.
    pub fn bucket(&self, t: BucketType) -> &LeakyBucket {
        &self.buckets[t.index()]
    }

    fn bucket_mut(&mut self, t: BucketType) -> &mut LeakyBucket {
        &mut self.buckets[t.index()]
    }

    /// True if any limit is set.
    pub fn is_enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0)
    }

    /// qemu's `throttle_is_valid`, with its messages.
    pub fn validate(&self) -> Result<()> {
        let b = |t| self.bucket(t);
        let mixed = |total: BucketType, read, write, f: fn(&LeakyBucket) -> u64| {
            f(b(total)) != 0 && (f(b(read)) != 0 || f(b(write)) != 0)
        };
        use BucketType::*;
        if mixed(BpsTotal, BpsRead, BpsWrite, |x| x.avg)
            || mixed(OpsTotal, OpsRead, OpsWrite, |x| x.avg)
            || mixed(BpsTotal, BpsRead, BpsWrite, |x| x.max)
            || mixed(OpsTotal, OpsRead, OpsWrite, |x| x.max)
        {
            return Err(invalid(
                "bps/iops/max total values and read/write values cannot be used at the same time",
            ));
        }
        if self.op_size != 0 && b(OpsTotal).avg == 0 && b(OpsRead).avg == 0 && b(OpsWrite).avg == 0
        {
            return Err(invalid("iops size requires an iops value to be set"));
        }
        self.buckets.iter().try_for_each(validate_bucket)
    }

    /// Apply the members of `limits` that are set (qemu's
    /// `throttle_limits_to_config`), then validate the result.
    pub fn apply_limits(&mut self, limits: &ThrottleLimits) -> Result<()> {
        let set = limits.entries();
        // qemu applies members in its own fixed order and stops at the
        // first bad burst length.
        for (name, cat) in PARAMS {
            if let Some(&(_, v)) = set.iter().find(|(n, _)| *n == name) {
                self.set_param(name, cat, v)?;
            }
        }
        self.validate()
    }

    fn set_param(&mut self, name: &str, cat: Category, v: i64) -> Result<()> {
        // Negative numbers wrap as in qemu's unsigned fields, then fail
        // the range checks of `validate`.
        match cat {
            Category::Avg(t) => self.bucket_mut(t).avg = v.cast_unsigned(),
            Category::Max(t) => self.bucket_mut(t).max = v.cast_unsigned(),
            Category::BurstLength(t) => {
                if v > i64::from(u32::MAX) {
                    return Err(invalid(format!(
                        "{name} value must be in the range [0, {}]",
                        u32::MAX
                    )));
                }
                self.bucket_mut(t).burst_length = v as u32;
            }
            Category::OpSize => self.op_size = v.cast_unsigned(),
        }
        Ok(())
    }

    /// Set one `x-` property before the group is complete (qemu's
    /// property setter: no negative values, burst lengths fit 32 bits).
    /// `name` has no `x-` prefix.
    pub fn set_x_property(&mut self, name: &str, v: i64) -> Result<()> {
        let cat =
            category(name).ok_or_else(|| invalid(format!("Property 'x-{name}' not found")))?;
        if v < 0 {
            return Err(invalid("Property values cannot be negative"));
        }
        if matches!(cat, Category::BurstLength(_)) && v > i64::from(u32::MAX) {
            // qemu's message really lacks the space.
            return Err(invalid(format!(
                "x-{name} value must be in therange [0, {}]",
                u32::MAX
            )));
        }
        self.set_param(name, cat, v)
    }

    /// The value of parameter `name` (a `ThrottleLimits` name).
    pub fn param(&self, name: &str) -> Option<i64> {
        let v = match category(name)? {
            Category::Avg(t) => self.bucket(t).avg,
            Category::Max(t) => self.bucket(t).max,
            Category::BurstLength(t) => u64::from(self.bucket(t).burst_length),
            Category::OpSize => self.op_size,
        };
        Some(v.cast_signed())
    }

    /// Every parameter, as qemu's `qom-get` of `limits` shows it.
    pub fn to_limits(&self) -> ThrottleLimits {
        let mut l = ThrottleLimits::default();
        for name in param_names() {
            if let Some(v) = self.param(name) {
                l.set(name, v);
            }
        }
        l
    }

    /// [`ThrottleConfig::to_limits`] as a JSON object.
    pub fn to_json(&self) -> Value {
        let m: Map<String, Value> = param_names()
            .filter_map(|n| Some((n.to_string(), Value::from(self.param(n)?))))
            .collect();
        Value::Object(m)
    }
}

fn validate_bucket(b: &LeakyBucket) -> Result<()> {
    if b.avg > THROTTLE_VALUE_MAX || b.max > THROTTLE_VALUE_MAX {
        return Err(invalid(format!(
            "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
        )));
    }
    if b.burst_length == 0 {
        return Err(invalid("the burst length cannot be 0"));
    }
    if b.burst_length > 1 && b.max == 0 {
        return Err(invalid("burst length set without burst rate"));
    }
    if b.max != 0 && u64::from(b.burst_length) > THROTTLE_VALUE_MAX / b.max {
        return Err(invalid("burst length too high for this burst rate"));
    }
    if b.max != 0 && b.avg == 0 {
        return Err(invalid(
            "bps_max/iops_max require corresponding bps/iops values",
        ));
    }
    if b.max != 0 && b.max < b.avg {
        return Err(invalid("bps_max/iops_max cannot be lower than bps/iops"));
    }
    Ok(())
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

impl ThrottleGroupProps {
    /// The configuration these properties describe: the `x-` members
    /// first, then `limits` over them (qemu's outcome when both are
    /// given), validated.
    pub fn to_config(&self) -> Result<ThrottleConfig> {
        let mut cfg = ThrottleConfig::default();
        for (name, v) in self.x_entries() {
            cfg.set_x_property(name, v)?;
        }
        match &self.limits {
            Some(l) => cfg.apply_limits(l)?,
            None => cfg.validate()?,
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qsd_qapi::InputMode;
    use serde_json::json;

    fn cfg(limits: Value) -> Result<ThrottleConfig> {
        let l: ThrottleLimits = serde_json::from_value(limits).unwrap();
        let mut c = ThrottleConfig::default();
        c.apply_limits(&l)?;
        Ok(c)
    }

    fn err(limits: Value) -> String {
        cfg(limits).unwrap_err().to_string()
    }

    #[test]
    fn test_limits_default_config_shows_qemu_defaults() {
        let v = ThrottleConfig::default().to_json();
        assert_eq!(v["iops-total"], 0);
        assert_eq!(v["iops-total-max-length"], 1);
        assert_eq!(v["iops-size"], 0);
        assert_eq!(v.as_object().unwrap().len(), 19);
    }

    #[test]
    fn test_limits_apply_keeps_absent_members() {
        let mut c = cfg(json!({"iops-total": 100, "bps-read": 5})).unwrap();
        c.apply_limits(&ThrottleLimits {
            iops_total: Some(7),
            ..ThrottleLimits::default()
        })
        .unwrap();
        assert_eq!(c.param("iops-total"), Some(7));
        assert_eq!(c.param("bps-read"), Some(5));
        assert_eq!(c.to_limits().bps_read, Some(5));
    }

    #[test]
    fn test_limits_invalid_combinations_give_qemu_messages() {
        assert_eq!(
            err(json!({"bps-total": 1000, "bps-read": 5})),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            err(json!({"iops-total": 100, "iops-total-max": 50})),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
        assert_eq!(
            err(json!({"iops-total-max-length": 5})),
            "burst length set without burst rate"
        );
        assert_eq!(
            err(json!({"iops-total": -1})),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            err(json!({"iops-total-max-length": 8_589_934_592_i64})),
            "iops-total-max-length value must be in the range [0, 4294967295]"
        );
        assert_eq!(
            err(json!({"iops-total-max-length": -1})),
            "burst length set without burst rate"
        );
        assert_eq!(
            err(
                json!({"iops-total": 1000, "iops-total-max": 1_000_000_000_000_000_i64,
                       "iops-total-max-length": 2})
            ),
            "burst length too high for this burst rate"
        );
        assert_eq!(
            err(json!({"iops-total-max": 1000, "iops-total-max-length": 10})),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        assert_eq!(
            err(json!({"iops-size": 512})),
            "iops size requires an iops value to be set"
        );
        assert_eq!(
            err(json!({"iops-total-max-length": 0})),
            "the burst length cannot be 0"
        );
        cfg(json!({"bps-total": 1, "bps-total-max": 1000, "bps-total-max-length": 1})).unwrap();
    }

    #[test]
    fn test_props_x_members_then_limits_win() {
        let p: ThrottleGroupProps = qsd_qapi::from_value(
            &json!({"x-iops-total": "4", "limits": {"iops-total": "5"}, "x-bps-read-max-length": "1"}),
            InputMode::Keyval,
        )
        .unwrap();
        let c = p.to_config().unwrap();
        assert_eq!(c.param("iops-total"), Some(5));
    }

    #[test]
    fn test_props_x_member_errors_follow_qemu() {
        let mut c = ThrottleConfig::default();
        assert_eq!(
            c.set_x_property("iops-total", -1).unwrap_err().to_string(),
            "Property values cannot be negative"
        );
        assert_eq!(
            c.set_x_property("iops-total-max-length", 1 << 33)
                .unwrap_err()
                .to_string(),
            "x-iops-total-max-length value must be in therange [0, 4294967295]"
        );
        let p = ThrottleGroupProps {
            iops_total: Some(200),
            iops_read: Some(4),
            ..ThrottleGroupProps::default()
        };
        assert_eq!(
            p.to_config().unwrap_err().to_string(),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
    }

    #[test]
    fn test_props_unknown_member_is_refused() {
        let e = qsd_qapi::from_value::<ThrottleGroupProps>(
            &json!({"limits": {"bogus": 1}}),
            InputMode::Qmp,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'limits.bogus' is unexpected");
        let e = qsd_qapi::from_value::<ThrottleGroupProps>(
            &json!({"limits": {"iops-total": "x"}}),
            InputMode::Qmp,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid parameter type for 'limits.iops-total', expected: integer"
        );
    }
}
