//! The web console at `/`: one hand-written page (HTML, CSS and JavaScript embedded in the binary,
//! no build tool chain) that is a client of the JSON API plus the event stream
//! ([`events`]). It shows machines, tasks with one live progress bar per machine, the image store
//! and the task history; its actions (create a task, cancel one, wake machines, verify an image)
//! are API writes behind the admin token, proven by a login ([`login`]).

pub mod events;
pub mod login;

use crate::api::ApiState;
use crate::http::ClientAddr;
use crate::lab::same_secret;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use login::Intent;
use serde::Deserialize;
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_CSS: &str = include_str!("assets/console.css");
const CONSOLE_JS: &str = include_str!("assets/console.js");

/// Everything the page loads comes from this server; nothing may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

pub fn router(state: ApiState) -> Router {
    let lab = Arc::clone(&state.lab);
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/console.css",
            get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
        .route(
            "/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route("/api/v1/login", post(log_in))
        .route("/api/v1/logout", post(log_out))
        .route("/api/v1/me", get(me))
        .with_state(state)
        .route("/api/v1/events", get(events::events).with_state(lab))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-cache"),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    (headers, body).into_response()
}

fn refusal(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// What needs the admin's proof to be read when `[security] public_reads = false`: the API (except
/// [`me`], which says whether one is logged in) and `/status`. The page itself, boot files and
/// the agents' endpoints stay open.
fn is_guarded_read(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && ((path.starts_with("/api/") && path != "/api/v1/me")
            || path == "/status"
            || path.starts_with("/images/"))
}

/// Middleware: refuses reads without the admin's proof when the config closes them.
pub async fn read_access(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if !state.lab.config.security.public_reads
        && is_guarded_read(request.method(), request.uri().path())
    {
        let checked = login::check(
            &state.lab,
            request.headers(),
            &state.admin_token,
            Intent::Read,
        );
        if let Err(why) = checked {
            return refusal(StatusCode::UNAUTHORIZED, why);
        }
    }
    next.run(request).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    token: String,
}

/// `POST /api/v1/login` `{"token": "..."}`: the admin token for a login cookie.
async fn log_in(
    State(state): State<ApiState>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    body: Result<Json<Credentials>, JsonRejection>,
) -> Response {
    let credentials = match body {
        Ok(Json(credentials)) => credentials,
        Err(rejection) => return refusal(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    if !same_secret(credentials.token.trim(), &state.admin_token) {
        log::warn!("console: {} gave a wrong admin token", client.ip());
        return refusal(
            StatusCode::UNAUTHORIZED,
            "the admin token is wrong (`bootserver token` prints it)",
        );
    }
    let secret = match state.lab.logins.open() {
        Ok(secret) => secret,
        Err(e) => {
            log::error!("console: {e}");
            return refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
    };
    log::info!("console: {} logged in", client.ip());
    with_cookie(StatusCode::NO_CONTENT, &login::set_cookie(&secret))
}

/// `POST /api/v1/logout`: ends the browser's login.
async fn log_out(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(secret) = login::cookie(&headers) {
        state.lab.logins.close(secret);
    }
    with_cookie(StatusCode::NO_CONTENT, &login::clear_cookie())
}

fn with_cookie(status: StatusCode, cookie: &str) -> Response {
    let mut response = status.into_response();
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `GET /api/v1/me`: whether this browser may act, and whether it may look without logging in.
async fn me(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let admin = login::check(&state.lab, &headers, &state.admin_token, Intent::Read).is_ok();
    Json(serde_json::json!({
        "admin": admin,
        "public_reads": state.lab.config.security.public_reads,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use crate::http::tests::exchange_from;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::{Duration, Instant};

    /// One request with extra header lines; the status, the head and the body.
    fn call(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &str,
        body: &str,
    ) -> (u16, String, String) {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let answer = exchange_from([127, 0, 0, 1], addr, request.as_bytes());
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        (status, head.to_string(), body.to_string())
    }

    fn bearer(token: &str) -> String {
        format!("Authorization: Bearer {token}\r\n")
    }

    /// Logs in with `token`; the `Cookie:` header line the browser would send after.
    fn log_in(addr: SocketAddr, token: &str) -> String {
        let (status, head, body) = call(
            addr,
            "POST",
            "/api/v1/login",
            "",
            &format!(r#"{{"token":"{token}"}}"#),
        );
        assert_eq!(status, 204, "{head}{body}");
        let set = head
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .unwrap_or_else(|| panic!("no cookie: {head}"));
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        let pair = set.split(';').next().unwrap();
        format!("Cookie: {pair}\r\n")
    }

    const PC: &str = "52:54:00:00:00:31";

    fn stored(lab: &crate::lab::Lab, name: &str) {
        let mut raw = vec![0u8; 3 << 20];
        raw[..1 << 20].fill(9);
        lab.store.import(name, &mut &raw[..], "test", 3).unwrap();
    }

    #[test]
    fn the_page_and_its_assets_are_served_embedded_under_a_strict_policy() {
        let (addr, _, _) = crate::testing::web_server("console-assets", "");
        for (path, kind, needle) in [
            ("/", "text/html", "<script src=\"/console.js\">"),
            (
                "/console.js",
                "text/javascript",
                "EventSource('/api/v1/events')",
            ),
            ("/console.css", "text/css", "@media (max-width: 700px)"),
        ] {
            let (status, head, body) = call(addr, "GET", path, "", "");
            assert_eq!(status, 200, "{path}: {head}");
            assert!(head.contains(&format!("content-type: {kind}")), "{head}");
            assert!(
                head.contains("content-security-policy: default-src 'none'"),
                "{head}"
            );
            assert!(body.contains(needle), "{path} lacks {needle:?}");
        }
        let weight = super::INDEX_HTML.len() + super::CONSOLE_CSS.len() + super::CONSOLE_JS.len();
        eprintln!("console page weight: {weight} bytes (HTML + CSS + JS, uncompressed)");
    }

    #[test]
    fn a_console_login_proves_writes_only_with_its_header_and_ends_at_logout() {
        let (addr, lab, token) = crate::testing::web_server("console-login", "");
        stored(&lab, "golden");
        let (status, _, body) = call(addr, "POST", "/api/v1/login", "", r#"{"token":"nope"}"#);
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("wrong"), "{body}");
        let (_, _, me) = call(addr, "GET", "/api/v1/me", "", "");
        assert!(me.contains(r#""admin":false"#), "{me}");
        let cookie = log_in(addr, &token);
        let (_, _, me) = call(addr, "GET", "/api/v1/me", &cookie, "");
        assert!(me.contains(r#""admin":true"#), "{me}");
        let deploy = format!(r#"{{"kind":"deploy","image":"golden","to":"{PC}"}}"#);
        // The cookie alone, as a page elsewhere could make the browser send it: refused.
        let (status, _, body) = call(addr, "POST", "/api/v1/tasks", &cookie, &deploy);
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("x-diskcast-console"), "{body}");
        assert!(lab.registry.tasks(Default::default()).unwrap().is_empty());
        let console = format!("{cookie}X-Diskcast-Console: 1\r\n");
        let (status, _, body) = call(addr, "POST", "/api/v1/tasks", &console, &deploy);
        assert_eq!(status, 201, "{body}");
        let (status, head, _) = call(addr, "POST", "/api/v1/logout", &console, "");
        assert_eq!(status, 204);
        assert!(head.contains("Max-Age=0"), "{head}");
        let (status, _, body) = call(addr, "POST", "/api/v1/tasks/1/cancel", &console, "");
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("log in again"), "{body}");
        // Wake-on-LAN is a write too; unknown machines are refused before anything is sent.
        let wake = r#"{"to":"nobody"}"#;
        assert_eq!(call(addr, "POST", "/api/v1/wake", "", wake).0, 401);
        assert_eq!(
            call(addr, "POST", "/api/v1/wake", &bearer(&token), wake).0,
            404
        );
        assert_eq!(
            call(addr, "POST", "/api/v1/images/golden/verify", "", "").0,
            401
        );
    }

    #[test]
    fn closed_reads_need_the_token_or_a_login_and_machines_still_boot() {
        let (addr, lab, token) =
            crate::testing::web_server("console-closed", "\n[security]\npublic_reads = false\n");
        for path in [
            "/api/v1/machines",
            "/api/v1/tasks",
            "/api/v1/events",
            "/status",
        ] {
            let (status, _, body) = call(addr, "GET", path, "", "");
            assert_eq!(status, 401, "{path}: {body}");
            assert!(body.contains("public_reads = false"), "{body}");
            assert_eq!(
                call(addr, "GET", path, "Authorization: Bearer x\r\n", "").0,
                401
            );
            if path != "/api/v1/events" {
                assert_eq!(
                    call(addr, "GET", path, &bearer(&token), "").0,
                    200,
                    "{path}"
                );
            }
        }
        let cookie = log_in(addr, &token);
        assert_eq!(call(addr, "GET", "/api/v1/machines", &cookie, "").0, 200);
        let (status, _, me) = call(addr, "GET", "/api/v1/me", "", "");
        assert_eq!(status, 200);
        assert!(me.contains(r#""public_reads":false"#), "{me}");
        // The page (to log in), boot scripts and agents' reports stay open.
        assert_eq!(call(addr, "GET", "/", "", "").0, 200);
        let (status, _, script) = call(addr, "GET", &format!("/boot/{PC}.ipxe"), "", "");
        assert_eq!(status, 200, "{script}");
        assert!(lab.registry.machine(PC.parse().unwrap()).unwrap().is_some());
    }

    /// Reads an event stream until `needle` shows up in what came after `from`; all of it.
    fn read_until(stream: &mut TcpStream, seen: &mut String, from: usize, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        while !seen[from..].contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the stream:\n{}",
                &seen[from..]
            );
            match stream.read(&mut buf) {
                Ok(0) => panic!("the stream ended:\n{seen}"),
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn the_event_stream_tells_of_tasks_reports_and_the_store_as_they_change() {
        let (addr, lab, token) = crate::testing::web_server("console-events", "");
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        stream
            .write_all(
                b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n",
            )
            .unwrap();
        let mut seen = String::new();
        // On connect: everything once, so a page reads all of it.
        read_until(&mut stream, &mut seen, 0, "event: store");
        assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
        assert!(seen.contains("content-type: text/event-stream"), "{seen}");
        assert!(seen.contains("event: sessions\ndata: []"), "{seen}");
        assert!(seen.contains("event: registry"), "{seen}");
        // A task created by another process (the admin's command) is a registry change.
        let mark = seen.len();
        let registry = diskcast_registry::Registry::open_in(&lab.config.state_dir).unwrap();
        registry
            .register(PC.parse().unwrap(), Some("pc-31"), None, 5)
            .unwrap();
        read_until(&mut stream, &mut seen, mark, "event: registry");
        // An image stored, then verified on request: store changes.
        let mark = seen.len();
        stored(&lab, "golden");
        read_until(&mut stream, &mut seen, mark, "event: store");
        let mark = seen.len();
        let (status, _, body) = call(
            addr,
            "POST",
            "/api/v1/images/golden/verify",
            &bearer(&token),
            "",
        );
        assert_eq!(status, 202, "{body}");
        read_until(&mut stream, &mut seen, mark, "event: store");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, _, images) = call(addr, "GET", "/api/v1/images", "", "");
            let images: serde_json::Value = serde_json::from_str(&images).unwrap();
            if images[0]["check"]["state"] == "verified" {
                assert!(images[0]["check"]["at"].is_u64(), "{images}");
                break;
            }
            assert!(Instant::now() < deadline, "never verified: {images}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
