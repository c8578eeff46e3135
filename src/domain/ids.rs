//! Identifiers checked at the edge: entitlement ids, feature keys and seat ids
//! all follow the pattern of the product contract.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ValidationError;

const MAX_ID_LEN: usize = 128;

/// Checks `^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$` without a regex engine; the
/// pattern is simple enough that a byte loop is both clearer and faster.
fn check_id(what: &'static str, s: &str) -> Result<(), ValidationError> {
    let bytes = s.as_bytes();
    let first_ok = bytes.first().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = bytes
        .iter()
        .skip(1)
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if first_ok && rest_ok && bytes.len() <= MAX_ID_LEN {
        Ok(())
    } else {
        Err(ValidationError::new(
            what,
            format!(
                "must match ^[A-Za-z0-9][A-Za-z0-9._:-]{{0,127}}$ (1 to {MAX_ID_LEN} characters, starting with a letter or digit)"
            ),
        ))
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, ValidationError> {
                check_id($what, s)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// What one customer bought.
    EntitlementId,
    "entitlement id"
);
id_type!(
    /// A metered feature of an entitlement (`api_calls`, `gpu_hours`).
    FeatureKey,
    "feature key"
);
id_type!(
    /// A caller-chosen key for one concurrent user or device.
    SeatId,
    "seat id"
);
id_type!(
    /// A caller-chosen key that makes a usage call safe to retry.
    IdempotencyKey,
    "idempotency key"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_contract_pattern() {
        for ok in ["a", "A9", "acme-corp:prod.eu_1", &"x".repeat(128)] {
            assert!(EntitlementId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_what_breaks_the_pattern() {
        for bad in ["", "-a", ".a", "a b", "a/b", "é", &"x".repeat(129), "a{b}"] {
            assert!(EntitlementId::parse(bad).is_err(), "{bad}");
        }
    }
}
