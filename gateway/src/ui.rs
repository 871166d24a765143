//! `GET /ui`: the dashboard, three files built into the binary (no CDN, no
//! build step: plain HTML, CSS and JavaScript that call the gateway's own
//! API; README, "Dashboard").

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;

/// One of the dashboard's files.
pub struct Asset {
    body: &'static str,
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_str!("ui/index.html"),
    content_type: "text/html; charset=utf-8",
};
const APP: Asset = Asset {
    body: include_str!("ui/app.js"),
    content_type: "text/javascript; charset=utf-8",
};
const STYLE: Asset = Asset {
    body: include_str!("ui/style.css"),
    content_type: "text/css; charset=utf-8",
};

/// The file a path names, if it is one of the dashboard's.
pub fn asset(path: &str) -> Option<&'static Asset> {
    match path {
        // The router hands the path without its trailing `/`.
        "/ui" | "/ui/index.html" => Some(&INDEX),
        "/ui/app.js" => Some(&APP),
        "/ui/style.css" => Some(&STYLE),
        _ => None,
    }
}

/// The file, with headers that keep the page to itself: scripts, styles
/// and calls only from this gateway, never in a frame.
pub fn serve(asset: &Asset) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(asset.body.as_bytes())));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}
