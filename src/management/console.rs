//! The web console: a browser view of the broker for operators who have neither
//! rabbitmqadmin nor RabbitMQ's management UI at hand. RabbitMQ serves its UI
//! from the API's own listener, so this one sits there too, at `/`.
//!
//! The files are compiled into the binary so that the broker stays one file to
//! deploy and the console always matches the API it was built against. They are
//! served without authentication because they hold no data: every figure is
//! fetched from `/api/` with the credentials the user types in, and the API
//! applies its usual access rules to them.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderName;
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// Headers for every console file. `no-cache` because the files change with
/// the binary: after an upgrade a browser must not mix an old script with a new
/// API. The policy allows only this origin (the console builds its pages from
/// API data, so a script from anywhere else would be an injection), and no other
/// site may frame the console, whose buttons delete queues.
fn headers(content_type: &'static str) -> [(HeaderName, &'static str); 5] {
    [
        (CONTENT_TYPE, content_type),
        (CACHE_CONTROL, "no-cache"),
        (
            HeaderName::from_static("content-security-policy"),
            "default-src 'self'; frame-ancestors 'none'; form-action 'none'",
        ),
        (HeaderName::from_static("x-content-type-options"), "nosniff"),
        (HeaderName::from_static("referrer-policy"), "no-referrer"),
    ]
}

/// The console's routes, for the API's router to merge (generic over the
/// state so that they fit whichever router takes them; they use none).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { (headers("text/html; charset=utf-8"), INDEX_HTML) }),
        )
        .route(
            "/console.js",
            get(|| async { (headers("text/javascript; charset=utf-8"), CONSOLE_JS) }),
        )
        .route(
            "/console.css",
            get(|| async { (headers("text/css; charset=utf-8"), CONSOLE_CSS) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page loads exactly the two files the router serves, by relative path
    /// so that the console also works behind a reverse proxy's path prefix.
    #[test]
    fn the_page_loads_the_served_script_and_style_sheet() {
        assert!(INDEX_HTML.contains(r#"<script src="console.js" defer></script>"#));
        assert!(INDEX_HTML.contains(r#"<link rel="stylesheet" href="console.css">"#));
        assert_eq!(
            INDEX_HTML.matches("<script").count(),
            1,
            "inline scripts break the CSP"
        );
        assert!(
            !INDEX_HTML.contains("style="),
            "inline styles break the CSP"
        );
    }

    /// Nothing is fetched from elsewhere: the console must work offline, and the
    /// content security policy would block it anyway.
    #[test]
    fn nothing_is_loaded_from_another_site() {
        for (file, text) in [
            ("index.html", INDEX_HTML),
            ("console.js", CONSOLE_JS),
            ("console.css", CONSOLE_CSS),
        ] {
            for pattern in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(pattern), "{file} contains {pattern}");
            }
        }
    }

    /// API data (queue names, payloads) reaches the page only as text: none of
    /// the DOM's ways of parsing a string as markup appear in the script.
    #[test]
    fn the_script_never_parses_strings_as_markup() {
        for api in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "createContextualFragment",
            "DOMParser",
            "eval(",
            "new Function",
        ] {
            assert!(!CONSOLE_JS.contains(api), "console.js uses {api}");
        }
    }
}
