//! The dashboard: one HTML page, a script and a style sheet, embedded in the binary so the
//! daemon serves them with nothing fetched from the internet.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::AdminState;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/icon.svg");

/// Pages may only load what the daemon itself serves.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's own files: they hold no data (the page fetches it from the API with
/// the token), so the guard serves them without one, also with `token_for_reads`, for the
/// page to ask for it.
pub const PATHS: [&str; 4] = ["/", "/app.js", "/app.css", "/icon.svg"];

pub fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX)))
        .route(
            "/app.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route("/app.css", get(|| asset("text/css; charset=utf-8", STYLE)))
        .route("/icon.svg", get(|| asset("image/svg+xml", ICON)))
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
