//! Reading a JSON body so that a client learns which field is wrong, in the
//! product's words: the path of the field (`seats.hard_cap`,
//! `features.api.included`) and a reason without Rust type names.

use serde::Deserialize;

use super::ValidationError;

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not JSON at all (or cut short).
    #[error("{0}")]
    Syntax(String),
    /// JSON, but a field is missing, unknown, of the wrong type or breaks a rule.
    #[error(transparent)]
    Invalid(ValidationError),
}

/// Decodes `body` as `T`, naming the field at fault. The body is decoded
/// as usual first; only a body that fails is decoded again with the path
/// tracked (which costs on every field), so a good call pays nothing.
/// A number written with a zero fraction (`5.0`) is a whole number, as
/// JSON Schema counts it: a body that fails only for that is read with its
/// whole numbers written plainly.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, JsonError> {
    match decode_borrowed(body) {
        Ok(v) => Ok(v),
        Err(e) => match with_whole_numbers(body) {
            Some(plain) => serde_json::from_slice(&plain).map_err(|_| e),
            None => Err(e),
        },
    }
}

/// [`decode`] of an optional body: none (or only whitespace) is `T`'s
/// default, as `{}` would be.
pub fn decode_optional<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
) -> Result<T, JsonError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    decode(body)
}

/// [`decode`] of a `T` that borrows from the body (no whole-number retry).
pub fn decode_borrowed<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<T, JsonError> {
    let first = match serde_json::from_slice(body) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Err(e) => {
            let path = e.path().to_string();
            Err(classify(&path, e.into_inner()))
        }
        // Cannot happen (the same input, the same decoder); keep the first error.
        Ok(_) => Err(from_serde(first)),
    }
}

/// `body` with every number that has a zero fraction written as a whole
/// number, if it has any (`None`: nothing to change, or not JSON).
fn with_whole_numbers(body: &[u8]) -> Option<Vec<u8>> {
    fn plain(v: &mut serde_json::Value) -> bool {
        match v {
            serde_json::Value::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                // Exactly representable: up to 2^53.
                if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 {
                    *v = if f >= 0.0 {
                        serde_json::Value::from(f as u64)
                    } else {
                        serde_json::Value::from(f as i64)
                    };
                    true
                } else {
                    false
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().fold(false, |c, i| plain(i) | c),
            serde_json::Value::Object(map) => map.values_mut().fold(false, |c, i| plain(i) | c),
            _ => false,
        }
    }
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if plain(&mut value) {
        serde_json::to_vec(&value).ok()
    } else {
        None
    }
}

/// [`decode`] of text already known to be UTF-8 (a batch's events).
pub fn decode_str<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, JsonError> {
    match serde_json::from_str(body) {
        Ok(v) => Ok(v),
        Err(_) => decode(body.as_bytes()),
    }
}

/// A query string as `T`, naming the parameter at fault (an unknown one
/// too) in the product's words.
pub fn decode_query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, ValidationError> {
    let pairs = form_urlencoded_pairs(query);
    let de = serde_urlencoded::Deserializer::new(pairs);
    serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
        let path = e.path().to_string();
        let message = in_product_words(&e.into_inner().to_string());
        let message = message.replace("invalid digit found in string", "not a whole number");
        let named = field(&path, &message);
        let named = if named == "body" {
            "query".to_string()
        } else {
            named
        };
        ValidationError::new(named, message)
    })
}

fn form_urlencoded_pairs(query: &str) -> url::form_urlencoded::Parse<'_> {
    url::form_urlencoded::parse(query.as_bytes())
}

/// serde_json's error of a document read as a whole (no path known).
pub fn from_serde(e: serde_json::Error) -> JsonError {
    classify(".", e)
}

fn classify(path: &str, e: serde_json::Error) -> JsonError {
    use serde_json::error::Category;
    let message = in_product_words(&e.to_string());
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => JsonError::Syntax(message),
        Category::Data => JsonError::Invalid(ValidationError::new(field(path, &message), message)),
    }
}

/// The field a message is about: the path, and for a missing or unknown
/// field, that field below it.
fn field(path: &str, message: &str) -> String {
    let base = if path == "." { "" } else { path };
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|p| {
            message
                .split_once(p)
                .and_then(|(_, rest)| rest.split_once('`'))
        })
        .map(|(name, _)| name);
    match (base, named) {
        ("", Some(n)) => n.to_string(),
        ("", None) => "body".to_string(),
        (b, Some(n)) if !b.ends_with(n) => format!("{b}.{n}"),
        (b, _) => b.to_string(),
    }
}

/// serde's message with Rust's type names replaced by what a client sends,
/// and without the position (which is of the whole body).
fn in_product_words(message: &str) -> String {
    let mut out = message.to_string();
    if let Some(i) = out.find(" at line ") {
        out.truncate(i);
    }
    for (rust, words) in [
        ("u64", "a whole number of at least 0"),
        ("u32", "a whole number of at least 0"),
        ("u16", "a whole number of at least 0"),
        ("u8", "a whole number of at least 0"),
        ("usize", "a whole number of at least 0"),
        ("i64", "a whole number"),
        ("i32", "a whole number"),
        ("f64", "a number"),
    ] {
        out = out.replace(&format!("expected {rust}"), &format!("expected {words}"));
    }
    // `expected struct SeatConfig`, `expected enum Period`, `expected a map`.
    for (prefix, words) in [
        ("expected struct ", "an object"),
        ("expected enum ", "one of the documented values"),
    ] {
        while let Some(i) = out.find(prefix) {
            let start = i + "expected ".len();
            let end = out[i + prefix.len()..]
                .find(|c: char| !c.is_alphanumeric() && c != '_')
                .map_or(out.len(), |e| i + prefix.len() + e);
            out.replace_range(start..end, words);
        }
    }
    out.replace("expected a map", "expected an object")
        .replace("expected a sequence", "expected an array")
        .replace("invalid type: map", "invalid type: object")
        .replace("invalid type: sequence", "invalid type: array")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        purchased: u64,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        seats: Inner,
    }

    fn invalid(body: &str) -> ValidationError {
        match decode::<Outer>(body.as_bytes()) {
            Err(JsonError::Invalid(v)) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_field_is_named_and_no_rust_type_leaks() {
        let e = invalid(r#"{"seats": {"purchased": "ten"}}"#);
        assert_eq!(e.field, "seats.purchased");
        assert!(e.message.contains("a whole number"), "{}", e.message);
        let e = invalid(r#"{"seats": 5}"#);
        assert_eq!(e.field, "seats");
        assert!(!e.message.contains("Inner"), "{}", e.message);
        assert!(e.message.contains("an object"), "{}", e.message);
        let e = invalid(r#"{"seats": {"purchased": 1, "colour": 2}}"#);
        assert_eq!(e.field, "seats.colour");
        let e = invalid(r#"{}"#);
        assert_eq!(e.field, "seats");
        assert!(matches!(decode::<Outer>(b"{"), Err(JsonError::Syntax(_))));
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Page {
        limit: Option<usize>,
    }

    #[test]
    fn a_query_error_names_the_parameter() {
        let e = decode_query::<Page>("limit=abc").expect_err("not a number");
        assert_eq!(e.field, "limit");
        assert!(e.message.contains("not a whole number"), "{}", e.message);
        let e = decode_query::<Page>("colour=red").expect_err("unknown");
        assert_eq!(e.field, "colour");
        assert!(decode_query::<Page>("limit=5").is_ok());
    }

    #[test]
    fn a_whole_number_with_a_zero_fraction_is_a_whole_number() {
        let ok: Inner = decode(br#"{"purchased": 5.0}"#).expect("5.0 is 5");
        assert_eq!(ok.purchased, 5);
        let e = decode::<Inner>(br#"{"purchased": 5.5}"#).expect_err("5.5 is not");
        assert!(e.to_string().contains("purchased"), "{e}");
        assert!(
            decode::<Inner>(br#"{"purchased": -1.0}"#).is_err(),
            "still not negative"
        );
    }
}
