//! Every limit the API puts on its input, one constant each, with the checks that use them.
//! `openapi.yaml` states the same numbers; `tests/hostile_inputs.rs` reads them back from it, so
//! the spec and the code cannot drift apart.

use crate::inventory::MAX_SAFE_INTEGER;

/// The largest request body, in bytes (1 MiB).
pub const BODY_BYTES: usize = 1024 * 1024;

/// How deep a JSON body may nest arrays and objects. The API's own bodies need 3 levels; a
/// limit far below the parser's keeps a hostile body from costing stack or time.
pub const JSON_DEPTH: usize = 32;

/// The longest product id, in characters.
pub const ID_CHARS: usize = 64;

/// The characters of a product id (and of a saga kind), as the spec states them.
pub const ID_PATTERN: &str = "^[A-Za-z0-9._-]{1,64}$";

/// The longest product name, in characters.
pub const NAME_CHARS: usize = 200;

/// The longest customer id, in characters (also the longest token `sub`, which stands for one).
pub const CUSTOMER_ID_CHARS: usize = 128;

/// The longest operator `actor`, in characters.
pub const ACTOR_CHARS: usize = 100;

/// The longest operator `reason`, in characters.
pub const REASON_CHARS: usize = 500;

/// Free text (names, customer ids, operator actor and reason) holds no control characters:
/// PostgreSQL cannot store U+0000 at all, and the others only garble logs and pages.
pub const TEXT_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F]*$";

/// An operator's `actor` and `reason`: free text (see [`TEXT_PATTERN`]) that is not blank, so
/// with one character that is neither white space nor U+FEFF, which JSON Schema's `\s`
/// (ECMA-262) counts as space and Rust's and Python's do not (see [`is_blank`]).
pub const LINE_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F\uFEFF][^\x00-\x1F\x7F-\x9F]*$";

/// The most lines an order may have.
pub const MAX_ITEMS: usize = 100;

/// The most units of one product an order line may ask for.
pub const MAX_QUANTITY: i64 = 1_000_000;

/// The highest unit price, in cents. With [`MAX_ITEMS`] and [`MAX_QUANTITY`], the largest total
/// is 10^16, which fits an i64 with room to spare; totals past 2^53 - 1 are refused.
pub const MAX_PRICE_CENTS: i64 = 100_000_000;

/// The most stock a product may hold, and the most a restock may add (2^53 - 1).
pub const MAX_STOCK: i64 = MAX_SAFE_INTEGER;

/// The smallest page of a listing.
pub const PAGE_MIN: i64 = 1;

/// The largest page of a listing.
pub const PAGE_MAX: i64 = 500;

/// The page of a listing without `limit`.
pub const PAGE_DEFAULT: i64 = 50;

/// The longest `Idempotency-Key`, in (printable ASCII) characters.
pub const IDEMPOTENCY_KEY_CHARS: usize = 255;

/// Order and saga ids: UUIDs in their canonical lower-case form, as the service writes them.
pub const UUID_PATTERN: &str = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";

/// The most sagas an order's event stream follows (its place_order saga and its cancel sagas),
/// and so the most counts in its `Last-Event-ID`.
pub const MAX_SAGAS_PER_ORDER: usize = 64;

/// The most cancel sagas one order can have: each one after the first replaced a cancel that
/// settled before its pivot. One more cancel is refused (409 `cancel_attempts_exhausted`), so
/// that the order's stream can always follow every one of its sagas.
pub const MAX_CANCEL_SAGAS: usize = MAX_SAGAS_PER_ORDER - 1;

/// The most digits of one count of a `Last-Event-ID`.
pub const CURSOR_COUNT_DIGITS: usize = 15;

/// The pattern of a `Last-Event-ID`, as the spec states it.
pub fn last_event_id_pattern() -> String {
    let (d, more) = (CURSOR_COUNT_DIGITS, MAX_SAGAS_PER_ORDER - 1);
    format!("^[0-9]{{1,{d}}}(\\.[0-9]{{1,{d}}}){{0,{more}}}$")
}

/// True for a product id: 1 to [`ID_CHARS`] characters of `[A-Za-z0-9._-]`.
pub fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= ID_CHARS
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// True for an order or saga id as the service writes them (see [`UUID_PATTERN`]).
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// True for free text without control characters (see [`TEXT_PATTERN`]).
pub fn is_text(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// True when `text` has nothing but white space: Unicode's (what `str::trim` removes) and
/// U+FEFF, so that [`LINE_PATTERN`] refuses exactly what this refuses.
pub fn is_blank(text: &str) -> bool {
    text.chars().all(|c| c.is_whitespace() || c == '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_is_white_space_as_unicode_or_json_schema_reads_it() {
        for blank in ["", " ", "\t\n", "\u{85}", "\u{a0}\u{3000}", "\u{feff}", "\u{2028}"] {
            assert!(is_blank(blank), "{blank:?}");
        }
        for text in ["a", " a ", "\u{200b}", "_"] {
            assert!(!is_blank(text), "{text:?}");
        }
    }

    #[test]
    fn ids_uuids_and_text() {
        assert!(is_id("sku-1.a_B") && is_id(&"a".repeat(ID_CHARS)));
        assert!(!is_id("") && !is_id(&"a".repeat(ID_CHARS + 1)) && !is_id("a/b") && !is_id("a b"));
        assert!(is_uuid("0193a5c2-7e1a-7c3d-9b2e-3f4a5b6c7d8e"));
        assert!(!is_uuid("0193A5C2-7E1A-7C3D-9B2E-3F4A5B6C7D8E"), "upper case is not how ids are written");
        assert!(!is_uuid("0193a5c27e1a7c3d9b2e3f4a5b6c7d8e") && !is_uuid("0193a5c2-7e1a-7c3d-9b2e-3f4a5b6c7d8e0"));
        assert!(!is_uuid("0193a5c2-7e1a-7c3d-9b2e-3f4a5b6c7d8g") && !is_uuid("0193a5c2_7e1a-7c3d-9b2e-3f4a5b6c7d8e"));
        assert!(is_text("Mug, 12 \u{e9}\u{1f600}") && is_text(""));
        for bad in ["a\u{0}b", "\u{1b}[31m", "line\nbreak", "tab\t", "\u{7f}", "\u{9f}"] {
            assert!(!is_text(bad), "{bad:?}");
        }
        assert_eq!(last_event_id_pattern(), r"^[0-9]{1,15}(\.[0-9]{1,15}){0,63}$");
        // The largest order total fits an i64, so summing it can never overflow.
        assert!((MAX_ITEMS as i64).checked_mul(MAX_QUANTITY).and_then(|u| u.checked_mul(MAX_PRICE_CENTS)).is_some());
    }
}
