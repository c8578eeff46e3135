//! A small map from feature key to value, as a sorted vector.
//!
//! An entitlement has a handful of features; a `BTreeMap` allocates a node
//! for eleven entries (≈ 1 KiB here) even for one, and every resident
//! entitlement holds two such maps. Serialized, it is a JSON object.

use std::fmt;
use std::ops::Index;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ids::FeatureKey;

#[derive(Clone, PartialEq, Eq)]
pub struct KeyMap<V>(Vec<(FeatureKey, V)>);

impl<V> Default for KeyMap<V> {
    fn default() -> Self {
        KeyMap(Vec::new())
    }
}

impl<V: fmt::Debug> fmt::Debug for KeyMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl<V> KeyMap<V> {
    fn find(&self, key: &FeatureKey) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(key))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &FeatureKey) -> Option<&V> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, key: &FeatureKey) -> Option<&mut V> {
        self.find(key).ok().map(|i| &mut self.0[i].1)
    }

    pub fn contains_key(&self, key: &FeatureKey) -> bool {
        self.find(key).is_ok()
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert(&mut self, key: FeatureKey, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// The value under `key`, inserted as its default when missing.
    pub fn get_or_default(&mut self, key: &FeatureKey) -> &mut V
    where
        V: Default,
    {
        let i = match self.find(key) {
            Ok(i) => i,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (key.clone(), V::default()));
                i
            }
        };
        &mut self.0[i].1
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&FeatureKey, &mut V) -> bool) {
        self.0.retain_mut(|(k, v)| keep(k, v));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&FeatureKey, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&FeatureKey, &mut V)> {
        self.0.iter_mut().map(|(k, v)| (&*k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &FeatureKey> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
}

impl<V> Index<&FeatureKey> for KeyMap<V> {
    type Output = V;

    fn index(&self, key: &FeatureKey) -> &V {
        match self.get(key) {
            Some(v) => v,
            None => panic!("no feature {key}"),
        }
    }
}

impl<'a, V> IntoIterator for &'a KeyMap<V> {
    type Item = (&'a FeatureKey, &'a V);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (FeatureKey, V)>,
        fn(&'a (FeatureKey, V)) -> (&'a FeatureKey, &'a V),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<V: Serialize> Serialize for KeyMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for KeyMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = KeyMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object keyed by feature")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<KeyMap<V>, A::Error> {
                let mut map = KeyMap(Vec::with_capacity(access.size_hint().unwrap_or(0).min(64)));
                while let Some((k, v)) = access.next_entry::<FeatureKey, V>()? {
                    map.insert(k, v);
                }
                map.0.shrink_to_fit();
                Ok(map)
            }
        }
        d.deserialize_map(V2(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> FeatureKey {
        FeatureKey::parse(s).unwrap()
    }

    #[test]
    fn keeps_keys_sorted_and_round_trips_as_an_object() {
        let m: KeyMap<u32> = serde_json::from_str(r#"{"b": 2, "a": 1, "c": 3, "a": 4}"#).unwrap();
        assert_eq!(
            m.keys().map(FeatureKey::as_str).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(
            m.get(&key("a")),
            Some(&4),
            "the last duplicate wins, as in a BTreeMap"
        );
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"{"a":4,"b":2,"c":3}"#);
        let mut m = m;
        *m.get_or_default(&key("aa")) += 7;
        m.retain(|k, _| k.as_str() != "b");
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"a":4,"aa":7,"c":3}"#
        );
    }
}
