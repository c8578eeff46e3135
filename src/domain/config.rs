//! Entitlement configuration: what the vendor sold, validated once at the edge.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ValidationError;
use super::ids::FeatureKey;
use super::keymap::KeyMap;
use super::period::Period;

/// Most features one entitlement may carry; keeps a single configuration, and
/// the state written with every change, small.
pub const MAX_FEATURES: usize = 256;
/// Most thresholds per feature.
pub const MAX_THRESHOLDS: usize = 32;
/// Longest lease: one year.
pub const MAX_LEASE_SECONDS: u64 = 366 * 24 * 3600;

/// A ceiling that is either a number or `"unlimited"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Finite(u64),
    Unlimited,
}

impl Limit {
    pub fn allows(self, value: u64) -> bool {
        match self {
            Limit::Finite(cap) => value <= cap,
            Limit::Unlimited => true,
        }
    }

    pub fn finite(self) -> Option<u64> {
        match self {
            Limit::Finite(cap) => Some(cap),
            Limit::Unlimited => None,
        }
    }

    /// The lower of a vendor's cap and an optional customer's ceiling.
    pub fn min_with(self, other: Option<u64>) -> Limit {
        match (self, other) {
            (Limit::Finite(a), Some(b)) => Limit::Finite(a.min(b)),
            (Limit::Unlimited, Some(b)) => Limit::Finite(b),
            (l, None) => l,
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Finite(n) => write!(f, "{n}"),
            Limit::Unlimited => f.write_str("unlimited"),
        }
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Limit::Finite(n) => s.serialize_u64(*n),
            Limit::Unlimited => s.serialize_str("unlimited"),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Limit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer or \"unlimited\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Limit, E> {
                Ok(Limit::Finite(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Limit, E> {
                u64::try_from(v)
                    .map(Limit::Finite)
                    .map_err(|_| E::custom("must not be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Limit, E> {
                if v == "unlimited" {
                    Ok(Limit::Unlimited)
                } else {
                    Err(E::custom(format!(
                        "expected a non-negative integer or \"unlimited\", got \"{v}\""
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A threshold in percent of what was included, 1 to 1000.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Percent(u16);

impl Percent {
    pub fn parse(v: u64) -> Result<Self, ValidationError> {
        if (1..=1000).contains(&v) {
            Ok(Percent(v as u16))
        } else {
            Err(ValidationError::new(
                "thresholds",
                format!("each threshold must be a percentage from 1 to 1000, got {v}"),
            ))
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }

    /// Whether `used` has reached this share of `included` (exact, no rounding).
    pub fn reached(self, used: u64, included: u64) -> bool {
        (used as u128) * 100 >= (included as u128) * (self.0 as u128)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Percent::parse(u64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SeatConfig {
    pub purchased: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hard_cap: Option<Limit>,
    #[serde(default)]
    pub customer_cap: Option<u64>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 31622400)]
    pub lease_seconds: Option<u64>,
}

impl SeatConfig {
    pub fn new(purchased: u64, hard_cap: Option<Limit>) -> Self {
        SeatConfig {
            purchased,
            hard_cap,
            customer_cap: None,
            lease_seconds: None,
        }
    }

    /// The vendor's hard cap; omitted means no overdraft.
    pub fn hard_cap(&self) -> Limit {
        self.hard_cap.unwrap_or(Limit::Finite(self.purchased))
    }

    /// The cap a call is judged against: the lower of vendor's and customer's.
    pub fn effective_cap(&self) -> Limit {
        self.hard_cap().min_with(self.customer_cap)
    }

    fn validate(&self) -> Result<(), ValidationError> {
        check_cap("seats.hard_cap", self.purchased, self.hard_cap())?;
        if let Some(l) = self.lease_seconds
            && !(1..=MAX_LEASE_SECONDS).contains(&l)
        {
            return Err(ValidationError::new(
                "seats.lease_seconds",
                format!("must be from 1 to {MAX_LEASE_SECONDS}, got {l}"),
            ));
        }
        Ok(())
    }
}

impl Default for SeatConfig {
    fn default() -> Self {
        SeatConfig::new(0, None)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    pub included: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hard_cap: Option<Limit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_cap: Option<u64>,
    #[serde(default)]
    pub period: Period,
    #[serde(default)]
    pub period_anchor: Option<DateTime<Utc>>,
    #[serde(default)]
    pub thresholds: Vec<Percent>,
}

impl FeatureConfig {
    pub fn new(included: u64, hard_cap: Option<Limit>, period: Period) -> Self {
        FeatureConfig {
            included,
            hard_cap,
            customer_cap: None,
            period,
            period_anchor: None,
            thresholds: Vec::new(),
        }
    }

    pub fn hard_cap(&self) -> Limit {
        self.hard_cap.unwrap_or(Limit::Finite(self.included))
    }

    pub fn effective_cap(&self) -> Limit {
        self.hard_cap().min_with(self.customer_cap)
    }

    fn validate(&mut self, key: &FeatureKey) -> Result<(), ValidationError> {
        check_cap(
            &format!("features.{key}.hard_cap"),
            self.included,
            self.hard_cap(),
        )?;
        if self.thresholds.len() > MAX_THRESHOLDS {
            return Err(ValidationError::new(
                format!("features.{key}.thresholds"),
                format!("at most {MAX_THRESHOLDS} thresholds"),
            ));
        }
        self.thresholds.sort_unstable();
        self.thresholds.dedup();
        self.period_anchor = self
            .period_anchor
            .map(|a| a - chrono::Duration::nanoseconds(a.timestamp_subsec_nanos() as i64));
        Ok(())
    }
}

fn check_cap(field: &str, purchased: u64, cap: Limit) -> Result<(), ValidationError> {
    match cap {
        Limit::Finite(c) if c < purchased => Err(ValidationError::new(
            field,
            format!(
                "hard_cap ({c}) must not be below what was purchased or included ({purchased})"
            ),
        )),
        _ => Ok(()),
    }
}

/// A customer's own ceilings, set from their page: for the seats and for
/// each named feature, `Some(cap)` sets one and `None` removes it; what is
/// not named stays as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CustomerCaps {
    pub seats: Option<Option<u64>>,
    pub features: Vec<(FeatureKey, Option<u64>)>,
}

fn below_vendor(field: &str, cap: Option<u64>, vendor: Limit) -> Result<(), ValidationError> {
    match (cap, vendor.finite()) {
        (Some(c), Some(v)) if c > v => Err(ValidationError::new(
            field,
            format!("{c} is above the vendor's hard cap of {v}; write at most {v}"),
        )),
        _ => Ok(()),
    }
}

impl CustomerCaps {
    /// `config` with these ceilings. A ceiling above the vendor's hard cap,
    /// or one for a feature the configuration does not have, is refused.
    pub fn applied_to(
        &self,
        config: &EntitlementConfig,
    ) -> Result<EntitlementConfig, ValidationError> {
        let mut out = config.clone();
        if let Some(cap) = self.seats {
            below_vendor("seats.customer_cap", cap, out.seats.hard_cap())?;
            out.seats.customer_cap = cap;
        }
        for (key, cap) in &self.features {
            let field = format!("features.{key}.customer_cap");
            let f = out.features.get_mut(key).ok_or_else(|| {
                ValidationError::new(&field, format!("there is no feature {key}"))
            })?;
            below_vendor(&field, *cap, f.hard_cap())?;
            f.customer_cap = *cap;
        }
        out.validate()?;
        Ok(out)
    }
}

/// What one customer bought: a seat pool and any number of metered features.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EntitlementConfig {
    #[serde(default)]
    pub seats: SeatConfig,
    #[serde(default)]
    #[schema(value_type = std::collections::BTreeMap<super::ids::FeatureKey, FeatureConfig>)]
    pub features: KeyMap<FeatureConfig>,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

impl EntitlementConfig {
    /// Parses and validates a configuration document (the body of a PUT).
    /// A configuration from a request body, validated; the error names the
    /// field at fault.
    pub fn from_json(body: &[u8]) -> Result<Self, super::json::JsonError> {
        let mut cfg: EntitlementConfig = super::json::decode(body)?;
        cfg.validate().map_err(super::json::JsonError::Invalid)?;
        Ok(cfg)
    }

    pub fn validate(&mut self) -> Result<(), ValidationError> {
        self.seats.validate()?;
        if self.features.len() > MAX_FEATURES {
            return Err(ValidationError::new(
                "features",
                format!("at most {MAX_FEATURES} features"),
            ));
        }
        for (key, f) in self.features.iter_mut() {
            f.validate(key)?;
        }
        Ok(())
    }

    /// The entity tag of this configuration (an HTTP `ETag`, quoted): a
    /// hash of its JSON, the same on every node and build.
    pub fn etag(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(&json))
    }

    /// Why nothing new may be granted now, if anything stands in the way.
    pub fn blocked(&self, now: DateTime<Utc>) -> Option<super::DenyReason> {
        if self.disabled {
            Some(super::DenyReason::Disabled)
        } else if self.expires_at.is_some_and(|e| e <= now) {
            Some(super::DenyReason::Expired)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<EntitlementConfig, crate::domain::json::JsonError> {
        EntitlementConfig::from_json(s.as_bytes())
    }

    #[test]
    fn parses_the_contract_example() {
        let cfg = parse(
            r#"{"seats": { "purchased": 100, "hard_cap": 120, "customer_cap": null, "lease_seconds": 3600 },
                "features": {"api_calls": { "included": 1000000, "hard_cap": 1200000, "period": "month",
                  "period_anchor": "2026-01-15T00:00:00Z", "thresholds": [110, 50, 80, 100] }},
                "disabled": false, "expires_at": null}"#,
        )
        .unwrap();
        assert_eq!(cfg.seats.effective_cap(), Limit::Finite(120));
        let f = &cfg.features[&FeatureKey::parse("api_calls").unwrap()];
        assert_eq!(f.period, Period::Month);
        let t: Vec<u16> = f.thresholds.iter().map(|p| p.get()).collect();
        assert_eq!(t, [50, 80, 100, 110]);
    }

    #[test]
    fn omitted_hard_cap_means_no_overdraft_and_unlimited_is_a_word() {
        let cfg = parse(r#"{"seats": {"purchased": 5}}"#).unwrap();
        assert_eq!(cfg.seats.effective_cap(), Limit::Finite(5));
        let cfg =
            parse(r#"{"seats": {"purchased": 5, "hard_cap": "unlimited", "customer_cap": 7}}"#)
                .unwrap();
        assert_eq!(cfg.seats.hard_cap(), Limit::Unlimited);
        assert_eq!(cfg.seats.effective_cap(), Limit::Finite(7));
    }

    #[test]
    fn rejects_bad_configurations() {
        for bad in [
            r#"{"seats": {"purchased": 10, "hard_cap": 9}}"#,
            r#"{"seats": {"purchased": -1}}"#,
            r#"{"seats": {"purchased": 18446744073709551616}}"#,
            r#"{"seats": {"purchased": 1, "hard_cap": "lots"}}"#,
            r#"{"seats": {"purchased": 1, "colour": "red"}}"#,
            r#"{"sets": {}}"#,
            r#"{"features": {"a": {"included": 1, "thresholds": [0]}}}"#,
            r#"{"features": {"a": {"included": 1, "thresholds": [1001]}}}"#,
            r#"{"features": {"a": {"included": 1, "period": "fortnight"}}}"#,
            r#"{"features": {"bad key": {"included": 1}}}"#,
            r#"{"seats": {"purchased": 1, "lease_seconds": 0}}"#,
            r#"[1]"#,
            r#"{"#,
        ] {
            assert!(parse(bad).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn customer_caps_stay_at_or_below_the_vendors_hard_cap() {
        let cfg = parse(
            r#"{"seats": {"purchased": 2, "hard_cap": 4},
                "features": {"api": {"included": 10, "hard_cap": "unlimited"}}}"#,
        )
        .expect("config");
        let api = FeatureKey::parse("api").expect("key");
        let caps = CustomerCaps {
            seats: Some(Some(4)),
            features: vec![(api.clone(), Some(1_000_000))],
        };
        let out = caps
            .applied_to(&cfg)
            .expect("at the cap, and any under unlimited");
        assert_eq!(out.seats.customer_cap, Some(4));
        assert_eq!(out.seats.effective_cap(), Limit::Finite(4));
        assert_eq!(
            out.features.get(&api).and_then(|f| f.customer_cap),
            Some(1_000_000)
        );
        let over = CustomerCaps {
            seats: Some(Some(5)),
            ..CustomerCaps::default()
        };
        let e = over.applied_to(&cfg).expect_err("above the vendor's cap");
        assert_eq!(e.field, "seats.customer_cap");
        let unknown = CustomerCaps {
            features: vec![(FeatureKey::parse("gpu").expect("key"), Some(1))],
            ..CustomerCaps::default()
        };
        assert!(unknown.applied_to(&cfg).is_err());
        let removed = CustomerCaps {
            seats: Some(None),
            ..CustomerCaps::default()
        };
        assert_eq!(
            removed
                .applied_to(&out)
                .expect("removed")
                .seats
                .customer_cap,
            None
        );
        assert_eq!(
            CustomerCaps::default().applied_to(&cfg).expect("nothing"),
            cfg
        );
    }
}
