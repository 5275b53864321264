//! Reading requests: the JSON body (media type, syntax, then each field's type and range) and
//! query parameters, collecting every bad field into one `validation_failed` answer. The limits
//! are those of [`crate::limits`].

use axum::http::{HeaderMap, StatusCode, header};
use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::problem::Problem;
use crate::error::FieldError;
use crate::limits;

/// Parses a JSON object body, refusing other media types and malformed JSON.
pub fn json_object(headers: &HeaderMap, body: &Bytes) -> Result<Map<String, Value>, Problem> {
    let media = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = media.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence != "application/json" && !(essence.starts_with("application/") && essence.ends_with("+json")) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON: send Content-Type: application/json",
        ));
    }
    match parse_strict(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Problem::validation(vec![FieldError::new("body", "must be a JSON object")])),
        Err(e) => {
            Err(Problem::new(StatusCode::BAD_REQUEST, "malformed_json", format!("the body is not valid JSON: {e}")))
        }
    }
}

/// Parses JSON refusing what `serde_json::Value` lets through: a member given twice in one
/// object (whose meaning depends on the parser: serde_json keeps the last, others the first, so a
/// proxy and this service could read two different requests), and nesting deeper than
/// [`limits::JSON_DEPTH`]. The error says where, as serde_json's do.
pub fn parse_strict(body: &[u8]) -> Result<Value, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = Strict { depth: 0 }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// Builds a [`Value`] one level down from `depth`.
#[derive(Clone, Copy)]
struct Strict {
    depth: usize,
}

impl Strict {
    fn deeper<E: de::Error>(self) -> Result<Strict, E> {
        if self.depth >= limits::JSON_DEPTH {
            return Err(E::custom(format_args!("nested deeper than {} levels", limits::JSON_DEPTH)));
        }
        Ok(Strict { depth: self.depth + 1 })
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json refuses what does not fit a finite f64 (1e309) before it gets here.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(inner)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.deeper()?;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                // The name is the client's own; shown short, so an answer never grows with it.
                let shown: String = key.chars().take(64).collect();
                return Err(de::Error::custom(format_args!("the member {shown:?} appears twice")));
            }
            let value = map.next_value_seed(inner)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// Reads fields of one JSON object, recording each problem instead of stopping at the first.
pub struct Fields<'a, 'e> {
    object: &'a Map<String, Value>,
    prefix: String,
    /// Every bad field found so far.
    pub errors: &'e mut Vec<FieldError>,
}

impl<'a, 'e> Fields<'a, 'e> {
    /// Fields of `object`, named under `prefix` (such as `items[2].`).
    pub fn new(object: &'a Map<String, Value>, prefix: impl Into<String>, errors: &'e mut Vec<FieldError>) -> Self {
        Self { object, prefix: prefix.into(), errors }
    }

    fn fail(&mut self, name: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(format!("{}{}", self.prefix, name), message));
    }

    fn present(&mut self, name: &str) -> Option<&'a Value> {
        match self.object.get(name) {
            None | Some(Value::Null) => {
                self.fail(name, "is required");
                None
            }
            Some(v) => Some(v),
        }
    }

    /// A string of `min..=max` characters, none of them a control character (see
    /// [`limits::TEXT_PATTERN`]).
    pub fn string(&mut self, name: &str, min: usize, max: usize) -> Option<String> {
        let value = self.present(name)?;
        let Some(s) = value.as_str() else {
            self.fail(name, "must be a string");
            return None;
        };
        let len = s.chars().count();
        if len < min || len > max {
            self.fail(name, format!("must be {min} to {max} characters long"));
            return None;
        }
        if !limits::is_text(s) {
            self.fail(name, "must not contain control characters (U+0000 to U+001F, U+007F to U+009F)");
            return None;
        }
        Some(s.to_string())
    }

    /// A product id (see [`limits::ID_PATTERN`]).
    pub fn id(&mut self, name: &str) -> Option<String> {
        let s = self.string(name, 1, limits::ID_CHARS)?;
        if !is_id(&s) {
            self.fail(name, "may contain only letters, digits, '.', '_' and '-'");
            return None;
        }
        Some(s)
    }

    /// An integer in `min..=max`.
    pub fn integer(&mut self, name: &str, min: i64, max: i64) -> Option<i64> {
        let value = self.present(name)?;
        let Some(n) =
            value.as_i64().or_else(|| value.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e18).map(|f| f as i64))
        else {
            if value.is_number() {
                self.fail(name, format!("must be an integer from {min} to {max}"));
            } else {
                self.fail(name, "must be an integer");
            }
            return None;
        };
        if n < min || n > max {
            self.fail(name, format!("must be an integer from {min} to {max}"));
            return None;
        }
        Some(n)
    }

    /// An array of `min..=max` elements.
    pub fn array(&mut self, name: &str, min: usize, max: usize) -> Option<&'a Vec<Value>> {
        let value = self.present(name)?;
        let Some(items) = value.as_array() else {
            self.fail(name, "must be an array");
            return None;
        };
        if items.len() < min || items.len() > max {
            self.fail(name, format!("must have {min} to {max} elements"));
            return None;
        }
        Some(items)
    }
}

pub use limits::is_id;

/// Reads the parameters of a query string, recording each problem instead of stopping at the
/// first. A parameter this API does not know is ignored; one it knows, given twice, is refused
/// (which of the two would count is a guess a client should not have to make).
pub struct QueryFields<'a, 'e> {
    pairs: &'a [(String, String)],
    /// Every bad parameter found so far.
    pub errors: &'e mut Vec<FieldError>,
}

impl<'a, 'e> QueryFields<'a, 'e> {
    /// The parameters `pairs`, as axum's `Query<Vec<(String, String)>>` decodes them.
    pub fn new(pairs: &'a [(String, String)], errors: &'e mut Vec<FieldError>) -> Self {
        Self { pairs, errors }
    }

    fn fail(&mut self, name: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(name, message));
    }

    /// The parameter's value if it was given once; reported if it was given more often.
    pub fn raw(&mut self, name: &str) -> Option<&'a str> {
        let mut values = self.pairs.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str());
        let first = values.next()?;
        if values.next().is_some() {
            self.fail(name, "may be given only once");
            return None;
        }
        Some(first)
    }

    /// `limit`: the page size, from [`limits::PAGE_MIN`] to [`limits::PAGE_MAX`], else the
    /// default.
    pub fn limit(&mut self) -> i64 {
        let (min, max) = (limits::PAGE_MIN, limits::PAGE_MAX);
        match self.raw("limit") {
            None => limits::PAGE_DEFAULT,
            Some(raw) => match raw.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => n,
                _ => {
                    self.fail("limit", format!("must be an integer from {min} to {max}"));
                    limits::PAGE_DEFAULT
                }
            },
        }
    }

    /// An order or saga id, such as a page's `next_cursor` (see [`limits::UUID_PATTERN`]).
    pub fn uuid(&mut self, name: &str) -> Option<String> {
        let raw = self.raw(name)?;
        if !limits::is_uuid(raw) {
            self.fail(name, "must be an id as the service writes it (a lower-case UUID), such as a next_cursor");
            return None;
        }
        Some(raw.to_string())
    }

    /// A product id or a saga kind (see [`limits::ID_PATTERN`]).
    pub fn id(&mut self, name: &str) -> Option<String> {
        let raw = self.raw(name)?;
        if !limits::is_id(raw) {
            let max = limits::ID_CHARS;
            self.fail(name, format!("must be 1 to {max} letters, digits, '.', '_' or '-'"));
            return None;
        }
        Some(raw.to_string())
    }

    /// Text of 1 to `max` characters without control characters (see [`limits::TEXT_PATTERN`]).
    pub fn text(&mut self, name: &str, max: usize) -> Option<String> {
        let raw = self.raw(name)?;
        if raw.is_empty() || raw.chars().count() > max || !limits::is_text(raw) {
            self.fail(name, format!("must be 1 to {max} characters, none of them a control character"));
            return None;
        }
        Some(raw.to_string())
    }

    /// One of a fixed set of values, read by `parse`; `allowed` lists them for the message.
    pub fn choice<T>(&mut self, name: &str, parse: impl Fn(&str) -> Option<T>, allowed: &str) -> Option<T> {
        let raw = self.raw(name)?;
        let parsed = parse(raw);
        if parsed.is_none() {
            self.fail(name, format!("must be one of {allowed}"));
        }
        parsed
    }
}

/// The 404 of a path id that cannot name a `what` (not a product id, not a UUID): such an id
/// is never looked up, and never echoed, since it may be anything of any length.
pub fn no_such(what: &str) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not_found", format!("no {what} has this id"))
}

/// Reads the `Idempotency-Key` header: 1 to [`limits::IDEMPOTENCY_KEY_CHARS`] printable ASCII
/// characters, if present, and sent once (of two keys, neither is more the request's than the
/// other).
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let mut keys = headers.get_all("idempotency-key").iter();
    let Some(raw) = keys.next() else { return Ok(None) };
    if keys.next().is_some() {
        return Err(Problem::validation(vec![FieldError::new("Idempotency-Key", "must be sent only once")]));
    }
    let bytes = raw.as_bytes();
    let max = limits::IDEMPOTENCY_KEY_CHARS;
    if bytes.is_empty() || bytes.len() > max || !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(Problem::validation(vec![FieldError::new(
            "Idempotency-Key",
            format!("must be 1 to {max} printable ASCII characters"),
        )]));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// True when a `Prefer` header asks for `respond-async`.
pub fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split([',', ';']).any(|token| token.trim().eq_ignore_ascii_case("respond-async")))
}

/// One page of a listing: `items` was fetched with `limit + 1` rows, so that one more row than
/// the page holds says there is a next page, whose cursor is the last shown item's.
pub fn page<T>(mut items: Vec<T>, limit: i64, view: impl Fn(&T) -> Value, cursor: impl Fn(&T) -> String) -> Value {
    let more = items.len() as i64 > limit;
    items.truncate(limit.max(0) as usize);
    let next_cursor = if more { items.last().map(&cursor) } else { None };
    serde_json::json!({ "items": items.iter().map(view).collect::<Vec<_>>(), "next_cursor": next_cursor })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn nested(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn strict_parsing_reads_what_serde_json_reads() {
        let body = r#"{"a": [1, -2, 18446744073709551615, 1.5, 2.0, "s\u00e9", null, true, {}], "b": {"c": []}}"#;
        assert_eq!(parse_strict(body.as_bytes()).unwrap(), serde_json::from_str::<Value>(body).unwrap());
        assert_eq!(parse_strict(b" 7 ").unwrap(), json!(7));
    }

    #[test]
    fn strict_parsing_refuses_a_member_given_twice_at_any_depth() {
        for body in [r#"{"a": 1, "a": 2}"#, r#"{"a": {"b": 1, "c": 2, "b": 1}}"#, r#"[{"x": null, "x": null}]"#] {
            let error = parse_strict(body.as_bytes()).unwrap_err().to_string();
            assert!(error.contains("appears twice") && error.contains("at line 1 column"), "{body}: {error}");
        }
        let long = format!(r#"{{"{0}": 1, "{0}": 2}}"#, "k".repeat(10_000));
        assert!(parse_strict(long.as_bytes()).unwrap_err().to_string().len() < 200, "the name is shown short");
        // The same name in two objects is no duplicate.
        assert!(parse_strict(br#"{"a": {"id": 1}, "b": {"id": 1}}"#).is_ok());
    }

    #[test]
    fn strict_parsing_bounds_the_depth_without_recursing_far() {
        assert!(parse_strict(nested(limits::JSON_DEPTH).as_bytes()).is_ok());
        for levels in [limits::JSON_DEPTH + 1, 10_000, 1_000_000] {
            let error = parse_strict(nested(levels).as_bytes()).unwrap_err().to_string();
            assert!(error.contains("nested deeper than"), "{levels}: {error}");
        }
        let objects = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
        assert!(parse_strict(objects.as_bytes()).unwrap_err().to_string().contains("nested deeper than"));
    }

    #[test]
    fn strict_parsing_refuses_trailing_text_and_bad_numbers() {
        for body in [&b"{} x"[..], b"{\"a\": 1e309}", b"", b"\xef\xbb\xbf{}", b"{\"a\": \"\xff\"}"] {
            assert!(parse_strict(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }
}
