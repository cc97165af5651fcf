//! Who may do what over HTTP. Writes need the admin token: `Authorization: Bearer TOKEN` (scripts,
//! `curl`), or the web console's login — a cookie the server hands out for the token, kept in
//! memory only (a restart logs everybody out), valid for [`LIFETIME`]. Reads are open unless
//! `[security] public_reads = false`; then they need the same proof.
//!
//! The cookie is `HttpOnly` (the page's script never holds the token) and `SameSite=Strict` (a
//! page elsewhere cannot make the browser send it); a write proven by the cookie must also carry
//! [`CONSOLE_HEADER`], which a page elsewhere cannot add without the server's consent (CORS),
//! for browsers that ignore `SameSite`.

use crate::lab::{same_secret, Lab};
use axum::http::{header, HeaderMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The console's login cookie.
pub const COOKIE: &str = "diskcast-console";
/// The header the console sends with every request.
pub const CONSOLE_HEADER: &str = "x-diskcast-console";
/// How long a console login lasts.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Open logins kept at most; the oldest goes first.
const MAX_LOGINS: usize = 64;

/// The console's open logins: random secrets and when each was handed out.
#[derive(Debug, Default)]
pub struct Logins {
    open: Mutex<Vec<(String, Instant)>>,
}

#[derive(Debug, thiserror::Error)]
#[error("drawing a login secret from the operating system: {0}")]
pub struct LoginError(getrandom::Error);

impl Logins {
    /// A new login's secret, for the cookie.
    pub fn open(&self) -> Result<String, LoginError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(LoginError)?;
        let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        if let Ok(mut open) = self.open.lock() {
            open.retain(|(_, at)| at.elapsed() < LIFETIME);
            if open.len() >= MAX_LOGINS {
                open.remove(0);
            }
            open.push((secret.clone(), Instant::now()));
        }
        Ok(secret)
    }

    /// Whether `secret` is an open, unexpired login. Compared with every open login in time
    /// that does not depend on where they differ.
    pub fn is_open(&self, secret: &str) -> bool {
        self.open.lock().is_ok_and(|open| {
            open.iter().fold(false, |found, (s, at)| {
                found | (same_secret(s, secret) && at.elapsed() < LIFETIME)
            })
        })
    }

    pub fn close(&self, secret: &str) {
        if let Ok(mut open) = self.open.lock() {
            open.retain(|(s, _)| !same_secret(s, secret));
        }
    }
}

/// The login cookie's value in `headers`, if any.
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
}

/// The `Set-Cookie` value that logs a browser in with `secret`.
pub fn set_cookie(secret: &str) -> String {
    format!(
        "{COOKIE}={secret}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        LIFETIME.as_secs()
    )
}

/// The `Set-Cookie` value that logs a browser out.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    Read,
    Write,
}

/// Whether the request in `headers` proves it may act as the admin; the refusal says why not and
/// what to do.
pub fn check(lab: &Lab, headers: &HeaderMap, token: &str, intent: Intent) -> Result<(), String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if let Some(given) = bearer {
        return if same_secret(given, token) {
            Ok(())
        } else {
            Err("the admin token is wrong (see `bootserver token`)".into())
        };
    }
    if let Some(secret) = cookie(headers) {
        if !lab.logins.is_open(secret) {
            return Err("the console login expired or the server restarted: log in again".into());
        }
        if intent == Intent::Write && !headers.contains_key(CONSOLE_HEADER) {
            return Err(format!(
                "a write proven by the console's login must carry the header {CONSOLE_HEADER}"
            ));
        }
        return Ok(());
    }
    Err(match intent {
        Intent::Write => "writes need the admin token: send `Authorization: Bearer TOKEN` (see `bootserver token`) or log in to the console".into(),
        Intent::Read => "reading needs the admin token on this server ([security] public_reads = false): send `Authorization: Bearer TOKEN` (see `bootserver token`) or log in to the console".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_are_random_checked_whole_and_closed() {
        let logins = Logins::default();
        let a = logins.open().unwrap();
        let b = logins.open().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(logins.is_open(&a) && logins.is_open(&b));
        assert!(!logins.is_open(&a[1..]));
        assert!(!logins.is_open(""));
        logins.close(&a);
        assert!(!logins.is_open(&a) && logins.is_open(&b));
        for _ in 0..MAX_LOGINS {
            logins.open().unwrap();
        }
        assert!(!logins.is_open(&b), "the oldest login makes room");
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "a=1; diskcast-console=abc ; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&headers), Some("abc"));
        headers.insert(header::COOKIE, "diskcast-consoleX=abc".parse().unwrap());
        assert_eq!(cookie(&headers), None);
    }
}
