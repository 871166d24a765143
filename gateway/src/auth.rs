//! Who may call the REST API (issue 16): API tokens with scopes, the
//! protected default for a gateway without tokens, and the rules that
//! keep a web page in a user's browser out. [`Access::check`] runs first
//! in [`crate::api::Api::handle`], before a request is routed.
//!
//! * **Tokens** come from `--api-token SPEC` (repeatable), `--api-tokens
//!   FILE` (one SPEC a line; blank lines and `#` comments skipped) and
//!   `MIYAMOTO_API_TOKENS` (SPECs separated by white space). A SPEC is
//!   `TOKEN`, `TOKEN:SCOPES` or `TOKEN:enqueue:QUEUES`: SCOPES is a
//!   comma-separated list of `enqueue`, `read` and `admin` (a bare TOKEN
//!   is `admin`); QUEUES limits `enqueue` to queue names, or to prefixes
//!   written `jobs-*`. A token is 16 to 256 printable characters without
//!   `:`, `#` or white space. Sent as `Authorization: Bearer TOKEN`;
//!   compared in constant time (`subtle`), never logged or echoed.
//! * **Scopes.** `enqueue`: `POST /queue[/Q]` and `/queue/Q/batch`.
//!   `read`: task and queue views, listings, `/cluster`. `admin`:
//!   everything, configuration, pause, resume, purge, run and cancel
//!   included. `GET /health` is open to all.
//! * **The protected default.** With no token and without `--no-auth`,
//!   only loopback peers are served; any other gets `403` saying how to
//!   set a token.
//! * **Browsers.** A request whose `Origin` is neither the gateway's own
//!   (the same host and port as its `Host`) nor listed in
//!   `--allowed-origins`, or whose `Sec-Fetch-Site` is `cross-site`, gets
//!   `403`. A `Host` that is neither an address, `localhost`, nor listed
//!   in `--allowed-hosts` (`*.example.com` wildcards; `*` for any) gets
//!   `421`, so a DNS-rebinding page cannot read the API. Requests without
//!   these headers (curl, servers) are not affected, nor is `GET /health`.

use std::net::IpAddr;

use hyper::header::{HeaderMap, HOST, ORIGIN};
use hyper::StatusCode;
use subtle::ConstantTimeEq;

/// What a request needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Need {
    /// Nothing: `GET /health`.
    Open,
    /// The `enqueue` scope on this queue.
    Enqueue(String),
    Read,
    Admin,
}

#[derive(Debug, Clone, PartialEq)]
enum QueueRule {
    Name(String),
    Prefix(String),
}

#[derive(Clone)]
struct Token {
    secret: Vec<u8>,
    enqueue: bool,
    read: bool,
    admin: bool,
    /// For `enqueue`: only these queues (none: every queue).
    queues: Vec<QueueRule>,
}

impl std::fmt::Debug for Token {
    // The secret is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("enqueue", &self.enqueue)
            .field("read", &self.read)
            .field("admin", &self.admin)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

/// Who may call the API; built from the command line.
#[derive(Debug, Clone, Default)]
pub struct Access {
    tokens: Vec<Token>,
    /// Serve every peer without a token (`--no-auth`).
    no_auth: bool,
    allowed_origins: Vec<String>,
    allowed_hosts: Vec<String>,
}

/// A refusal: its status, its reason, and whether to ask for a bearer
/// token (`WWW-Authenticate`).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
    pub challenge: bool,
}

fn refusal(status: StatusCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
        challenge: status == StatusCode::UNAUTHORIZED,
    }
}

/// Parses one token SPEC (see the module).
fn parse_spec(spec: &str) -> Result<Token, String> {
    let mut parts = spec.splitn(3, ':');
    let secret = parts.next().unwrap_or_default();
    let len = secret.chars().count();
    if !(16..=256).contains(&len)
        || secret
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err(
            "an API token must be 16 to 256 printable characters, without ':', '#' or white space"
                .into(),
        );
    }
    let mut t = Token {
        secret: secret.as_bytes().to_vec(),
        enqueue: false,
        read: false,
        admin: false,
        queues: Vec::new(),
    };
    match parts.next() {
        None => t.admin = true,
        Some(scopes) => {
            for s in scopes.split(',') {
                match s.trim() {
                    "enqueue" => t.enqueue = true,
                    "read" => t.read = true,
                    "admin" => t.admin = true,
                    other => {
                        return Err(format!(
                            "unknown API token scope {other:?}: use enqueue, read or admin"
                        ))
                    }
                }
            }
        }
    }
    if let Some(queues) = parts.next() {
        if !t.enqueue {
            return Err("a token's queue list limits its enqueue scope: give it enqueue".into());
        }
        for q in queues.split(',').map(str::trim).filter(|q| !q.is_empty()) {
            let rule = match q.strip_suffix('*') {
                Some(prefix) => QueueRule::Prefix(prefix.to_string()),
                None => QueueRule::Name(q.to_string()),
            };
            t.queues.push(rule);
        }
        if t.queues.is_empty() {
            return Err("a token's queue list is empty".into());
        }
    }
    Ok(t)
}

impl Access {
    /// Access from token SPECs (flags, file lines, the environment
    /// variable), `--no-auth` and the browser lists.
    pub fn new(
        specs: &[String],
        no_auth: bool,
        allowed_origins: Vec<String>,
        allowed_hosts: Vec<String>,
    ) -> Result<Access, String> {
        let mut tokens = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            tokens.push(parse_spec(spec).map_err(|e| format!("API token {}: {e}", i + 1))?);
        }
        if no_auth && !tokens.is_empty() {
            return Err("--no-auth and API tokens exclude each other".into());
        }
        Ok(Access {
            tokens,
            no_auth,
            allowed_origins: allowed_origins
                .into_iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            allowed_hosts: allowed_hosts
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        })
    }

    /// Whether tokens are required.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// What start-up says about access, when it should warn: a gateway
    /// listening beyond loopback without tokens.
    pub fn warning(&self, listen: &std::net::SocketAddr) -> Option<String> {
        if self.has_tokens() || listen.ip().is_loopback() {
            return None;
        }
        Some(if self.no_auth {
            format!("listening on {listen} with --no-auth: anyone who reaches it may enqueue, read and purge")
        } else {
            format!("listening on {listen} without API tokens: only loopback clients are served; set --api-token (or MIYAMOTO_API_TOKENS)")
        })
    }

    /// Whether the request from `peer` with these headers may do what
    /// `need` says.
    pub fn check(&self, peer: IpAddr, headers: &HeaderMap, need: &Need) -> Result<(), Refusal> {
        if *need == Need::Open {
            return Ok(());
        }
        self.check_browser(headers)?;
        if self.tokens.is_empty() {
            if self.no_auth || is_loopback(peer) {
                return Ok(());
            }
            return Err(refusal(
                StatusCode::FORBIDDEN,
                format!("this gateway has no API token, so it serves loopback clients only (you are {peer}); give it one with --api-token or MIYAMOTO_API_TOKENS and send Authorization: Bearer TOKEN, or serve everyone without tokens with --no-auth"),
            ));
        }
        let Some(given) = bearer(headers) else {
            return Err(refusal(
                StatusCode::UNAUTHORIZED,
                "an API token is required: send Authorization: Bearer TOKEN",
            ));
        };
        // Every token is compared, in constant time, whatever matches.
        let mut found: Option<&Token> = None;
        for t in &self.tokens {
            if bool::from(t.secret.ct_eq(given)) {
                found = Some(t);
            }
        }
        let Some(t) = found else {
            return Err(refusal(
                StatusCode::UNAUTHORIZED,
                "this API token is not known",
            ));
        };
        let allowed = t.admin
            || match need {
                Need::Open => true,
                Need::Read => t.read,
                Need::Admin => false,
                Need::Enqueue(queue) => {
                    t.enqueue
                        && (t.queues.is_empty()
                            || t.queues.iter().any(|r| match r {
                                QueueRule::Name(n) => n == queue,
                                QueueRule::Prefix(p) => queue.starts_with(p.as_str()),
                            }))
                }
            };
        if allowed {
            return Ok(());
        }
        let what = match need {
            Need::Enqueue(q) => format!("the enqueue scope on queue {q:?}"),
            Need::Read => "the read scope".into(),
            Need::Admin | Need::Open => "the admin scope".into(),
        };
        Err(refusal(
            StatusCode::FORBIDDEN,
            format!("this API token lacks {what}"),
        ))
    }

    /// The browser rules (see the module).
    fn check_browser(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.trim().to_ascii_lowercase());
        if let Some(host) = &host {
            if !self.host_allowed(host) {
                return Err(refusal(
                    StatusCode::MISDIRECTED_REQUEST,
                    "this gateway does not serve that Host name; list it with --allowed-hosts",
                ));
            }
        }
        if headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("cross-site"))
        {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                "a cross-site request from a web page is refused",
            ));
        }
        if let Some(origin) = headers.get(ORIGIN) {
            let origin = origin.to_str().unwrap_or("").trim().to_ascii_lowercase();
            let own = host.as_deref().is_some_and(|h| {
                origin == format!("http://{h}") || origin == format!("https://{h}")
            });
            if !own && !self.allowed_origins.contains(&origin) {
                return Err(refusal(
                    StatusCode::FORBIDDEN,
                    "a request from another origin is refused; list the origin with --allowed-origins",
                ));
            }
        }
        Ok(())
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        if name == "localhost" || name.parse::<IpAddr>().is_ok() {
            return true;
        }
        self.allowed_hosts.iter().any(|a| {
            a == "*"
                || *a == name
                || a.strip_prefix("*.")
                    .is_some_and(|suffix| name.ends_with(&format!(".{suffix}")))
        })
    }
}

/// The host part of a `Host` header: without its port, and an IPv6
/// address without its brackets.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The token of `Authorization: Bearer TOKEN`.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(hyper::header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at(v.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Token SPECs from a file: one a line, blank lines and `#` comments
/// skipped.
pub fn read_token_file(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const ADMIN: &str = "admin-token-0123456789";
    const READ: &str = "read-token-0123456789";
    const ENQ: &str = "enqueue-token-0123456789";

    fn access() -> Access {
        Access::new(
            &[
                ADMIN.into(),
                format!("{READ}:read"),
                format!("{ENQ}:enqueue:emails,jobs-*"),
            ],
            false,
            vec!["https://dash.example.com".into()],
            vec!["queue.example.com".into(), "*.internal".into()],
        )
        .unwrap()
    }

    fn status(a: &Access, peer: &str, h: &HeaderMap, need: Need) -> u16 {
        match a.check(peer.parse().unwrap(), h, &need) {
            Ok(()) => 200,
            Err(r) => r.status.as_u16(),
        }
    }

    #[test]
    fn scopes_tokens_and_queues() {
        let a = access();
        let bearer = |t: &str| headers(&[("authorization", &format!("Bearer {t}"))]);
        let ext = "10.0.0.9";
        assert_eq!(status(&a, ext, &bearer(ADMIN), Need::Admin), 200);
        assert_eq!(status(&a, ext, &bearer(READ), Need::Read), 200);
        assert_eq!(status(&a, ext, &bearer(READ), Need::Admin), 403);
        assert_eq!(
            status(&a, ext, &bearer(READ), Need::Enqueue("emails".into())),
            403
        );
        assert_eq!(
            status(&a, ext, &bearer(ENQ), Need::Enqueue("emails".into())),
            200
        );
        assert_eq!(
            status(&a, ext, &bearer(ENQ), Need::Enqueue("jobs-7".into())),
            200
        );
        assert_eq!(
            status(&a, ext, &bearer(ENQ), Need::Enqueue("other".into())),
            403
        );
        assert_eq!(status(&a, ext, &bearer(ENQ), Need::Read), 403);
        assert_eq!(status(&a, ext, &headers(&[]), Need::Read), 401);
        assert_eq!(
            status(&a, ext, &bearer("wrong-token-0123456789"), Need::Read),
            401
        );
        assert_eq!(status(&a, ext, &headers(&[]), Need::Open), 200);
        // Loopback gets no pass when tokens are set.
        assert_eq!(status(&a, "127.0.0.1", &headers(&[]), Need::Read), 401);
        let r = a
            .check("10.0.0.9".parse().unwrap(), &headers(&[]), &Need::Read)
            .unwrap_err();
        assert!(r.challenge);
    }

    #[test]
    fn specs_are_checked() {
        for bad in [
            "short",
            "has space in it 1234567",
            "token-0123456789abc:write",
            "token-0123456789abc:read:q",
        ] {
            assert!(
                Access::new(&[bad.into()], false, vec![], vec![]).is_err(),
                "{bad}"
            );
        }
        assert!(Access::new(&[ADMIN.into()], true, vec![], vec![]).is_err());
        let shown = format!("{:?}", access());
        assert!(!shown.contains(ADMIN) && !shown.contains(ENQ), "{shown}");
    }

    #[test]
    fn the_protected_default_serves_loopback_only() {
        let a = Access::new(&[], false, vec![], vec![]).unwrap();
        let none = headers(&[]);
        assert_eq!(status(&a, "127.0.0.1", &none, Need::Admin), 200);
        assert_eq!(status(&a, "::1", &none, Need::Admin), 200);
        assert_eq!(status(&a, "::ffff:127.0.0.1", &none, Need::Admin), 200);
        assert_eq!(status(&a, "192.0.2.7", &none, Need::Read), 403);
        assert_eq!(status(&a, "192.0.2.7", &none, Need::Open), 200);
        let open = Access::new(&[], true, vec![], vec![]).unwrap();
        assert_eq!(status(&open, "192.0.2.7", &none, Need::Admin), 200);
    }

    #[test]
    fn browsers_from_elsewhere_are_refused() {
        let a = Access::new(
            &[],
            false,
            vec!["https://dash.example.com".into()],
            vec!["queue.example.com".into(), "*.internal".into()],
        )
        .unwrap();
        let lo = "127.0.0.1";
        let h = |pairs: &[(&'static str, &str)]| headers(pairs);
        assert_eq!(
            status(&a, lo, &h(&[("host", "127.0.0.1:8088")]), Need::Admin),
            200
        );
        assert_eq!(
            status(&a, lo, &h(&[("host", "localhost:8088")]), Need::Admin),
            200
        );
        assert_eq!(
            status(&a, lo, &h(&[("host", "[::1]:8088")]), Need::Admin),
            200
        );
        assert_eq!(
            status(&a, lo, &h(&[("host", "queue.example.com")]), Need::Admin),
            200
        );
        assert_eq!(
            status(&a, lo, &h(&[("host", "a.b.internal:80")]), Need::Admin),
            200
        );
        assert_eq!(
            status(&a, lo, &h(&[("host", "evil.example:8088")]), Need::Read),
            421
        );
        assert_eq!(
            status(
                &a,
                lo,
                &h(&[
                    ("host", "localhost:8088"),
                    ("origin", "http://localhost:8088")
                ]),
                Need::Admin
            ),
            200
        );
        assert_eq!(
            status(
                &a,
                lo,
                &h(&[
                    ("host", "localhost:8088"),
                    ("origin", "https://dash.example.com")
                ]),
                Need::Admin
            ),
            200
        );
        assert_eq!(
            status(
                &a,
                lo,
                &h(&[
                    ("host", "localhost:8088"),
                    ("origin", "http://evil.example")
                ]),
                Need::Admin
            ),
            403
        );
        assert_eq!(
            status(
                &a,
                lo,
                &h(&[("host", "localhost:8088"), ("origin", "null")]),
                Need::Enqueue("q".into())
            ),
            403
        );
        assert_eq!(
            status(
                &a,
                lo,
                &h(&[("host", "localhost:8088"), ("sec-fetch-site", "cross-site")]),
                Need::Admin
            ),
            403
        );
        assert_eq!(
            status(
                &a,
                lo,
                &h(&[
                    ("host", "localhost:8088"),
                    ("sec-fetch-site", "same-origin")
                ]),
                Need::Admin
            ),
            200
        );
    }
}
