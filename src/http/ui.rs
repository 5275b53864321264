//! `/ui`: the operators' dashboard, three static files compiled into the binary (no build step,
//! nothing fetched from the internet). The page talks to the service only through the public
//! API, so it needs no handler of its own beyond serving these files.

use std::sync::LazyLock;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// The page.
const INDEX_HTML: &str = include_str!("../../ui/index.html");
/// Its script.
const APP_JS: &str = include_str!("../../ui/app.js");
/// Its styles.
const APP_CSS: &str = include_str!("../../ui/app.css");

/// Scripts and styles from this origin only (no inline code, so injected markup cannot run),
/// requests to this origin only, no framing, no forms posting elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file and its validator.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: HeaderValue,
}

impl Asset {
    fn new(body: &'static str, content_type: &'static str) -> Self {
        let digest = Sha256::digest(body.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\"")).expect("a hex ETag is a valid header value");
        Self { body, content_type, etag }
    }

    /// 200 with the file, or 304 when the client holds this exact version. `no-cache` makes
    /// browsers revalidate every time, so a new binary's dashboard is picked up at once.
    fn serve(&self, headers: &HeaderMap) -> Response {
        let fresh = headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|tag| tag.trim() == self.etag.to_str().unwrap_or_default() || tag.trim() == "*");
        let common = [
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::ETAG, self.etag.clone()),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
        ];
        if fresh {
            return (StatusCode::NOT_MODIFIED, common).into_response();
        }
        (common, [(header::CONTENT_TYPE, self.content_type)], self.body).into_response()
    }
}

static INDEX: LazyLock<Asset> = LazyLock::new(|| Asset::new(INDEX_HTML, "text/html; charset=utf-8"));
static SCRIPT: LazyLock<Asset> = LazyLock::new(|| Asset::new(APP_JS, "text/javascript; charset=utf-8"));
static STYLES: LazyLock<Asset> = LazyLock::new(|| Asset::new(APP_CSS, "text/css; charset=utf-8"));

/// `GET /ui`: the dashboard's page.
pub async fn index(headers: HeaderMap) -> Response {
    INDEX.serve(&headers)
}

/// `GET /ui/app.js`: the dashboard's script.
pub async fn script(headers: HeaderMap) -> Response {
    SCRIPT.serve(&headers)
}

/// `GET /ui/app.css`: the dashboard's styles.
pub async fn styles(headers: HeaderMap) -> Response {
    STYLES.serve(&headers)
}
