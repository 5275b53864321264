//! The dashboard's files as served at `/ui`: content types, caching, the security policy, and a
//! page that loads nothing from elsewhere and runs no inline code. Its behaviour in a browser is
//! tests/browser/ (`.ci/run` runs it).
mod common;

use common::*;
use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_with_its_headers() {
    let app = spawn_app().await;
    for (path, media) in [("/ui", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")] {
        let response = app.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        assert!(header(CONTENT_TYPE).starts_with(media), "GET {path}: content type {}", header(CONTENT_TYPE));
        assert_eq!(header(CACHE_CONTROL), "no-cache", "GET {path}");
        let csp = header(CONTENT_SECURITY_POLICY);
        for directive in ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"] {
            assert!(csp.contains(directive), "GET {path}: {directive} missing from {csp}");
        }
        assert!(!csp.contains("unsafe"), "GET {path}: {csp}");
        assert_eq!(header(reqwest::header::X_CONTENT_TYPE_OPTIONS), "nosniff", "GET {path}");
        // The page's address (and anything in it) is not sent to other sites.
        assert_eq!(header(reqwest::header::REFERRER_POLICY), "no-referrer", "GET {path}");

        // A client holding this version revalidates to a 304 without a body.
        let etag = header(ETAG);
        assert!(etag.starts_with('"') && etag.ends_with('"'), "GET {path}: ETag {etag:?}");
        let revalidated = app.client.get(app.url(path)).header(IF_NONE_MATCH, &etag).send().await.unwrap();
        assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED, "GET {path} with If-None-Match");
        assert!(revalidated.bytes().await.unwrap().is_empty());
        let stale = app.client.get(app.url(path)).header(IF_NONE_MATCH, "\"old\"").send().await.unwrap();
        assert_eq!(stale.status(), StatusCode::OK, "GET {path} with a stale If-None-Match");
    }

    let page = app.get("/ui").await.text().await.unwrap();
    assert!(page.contains(r#"<script src="/ui/app.js" defer></script>"#), "the page loads its script");
    assert!(page.contains(r#"<link rel="stylesheet" href="/ui/app.css">"#), "the page loads its styles");
    // Every script is a file of this origin, and nothing is fetched from another host.
    assert_eq!(page.matches("<script").count(), page.matches("<script src=\"/ui/").count(), "no inline script");
    assert!(!page.contains("http://") && !page.contains("https://"), "no external resource");
    assert!(!page.contains(" style="), "no inline styles");
    assert!(!has_inline_handler(&page), "no inline event handlers");
    let script = app.get("/ui/app.js").await.text().await.unwrap();
    assert!(!script.contains("innerHTML") && !script.contains("insertAdjacentHTML"), "data is never parsed as markup");

    // `/ui` is the one address: `/ui/` is not a route.
    assert_eq!(app.get("/ui/").await.status(), StatusCode::NOT_FOUND);
    app.stop().await;
}

/// True if `html` has an attribute such as ` onclick=`.
fn has_inline_handler(html: &str) -> bool {
    html.match_indices(" on").any(|(at, _)| {
        let rest = &html[at + 3..];
        let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
        name_len > 0 && rest[name_len..].starts_with('=')
    })
}
