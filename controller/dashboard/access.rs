//! Who may use the dashboard: operators sign in with a token from
//! `--dashboard-tokens` (a file of `NAME TOKEN` lines) and get a session
//! cookie; scripts may send the token as `Authorization: Bearer`.
//!
//! Reading the fleet is open on loopback and needs a signed-in operator
//! anywhere else; actions always need one, who is then their author.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The session cookie's name.
const COOKIE: &str = "tether_session";
/// How long a sign-in lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest goes first.
const MAX_SESSIONS: usize = 10_000;
/// Shorter tokens are refused: guessing must stay out of reach.
const MIN_TOKEN_LEN: usize = 16;

/// The dashboard's callers and their sessions.
pub struct Access {
    /// Operator name and the SHA-256 of their token.
    tokens: Vec<(String, [u8; 32])>,
    sessions: Mutex<HashMap<String, Session>>,
    /// Off loopback, even reading needs a signed-in operator.
    reads_need_sign_in: bool,
    /// Served over TLS: the cookie is `Secure`.
    secure: bool,
}

struct Session {
    operator: String,
    expires: Instant,
}

impl Access {
    /// `tokens` is the `--dashboard-tokens` file's text and name, if given.
    pub fn new(
        tokens: Option<(&Path, &str)>,
        reads_need_sign_in: bool,
        secure: bool,
    ) -> Result<Access, String> {
        let tokens = match tokens {
            Some((path, text)) => parse_tokens(path, text)?,
            None => Vec::new(),
        };
        Ok(Access {
            tokens,
            sessions: Mutex::new(HashMap::new()),
            reads_need_sign_in,
            secure,
        })
    }

    /// Whether anyone can sign in at all.
    pub fn sign_in_possible(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The operator behind a request: its session cookie or bearer token.
    pub fn operator(&self, headers: &HeaderMap) -> Option<String> {
        if let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            return self.operator_with_token(token.trim());
        }
        let id = session_cookie(headers)?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get(id) {
            Some(session) if session.expires > Instant::now() => Some(session.operator.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    /// Whether this request may read the fleet.
    pub fn may_read(&self, headers: &HeaderMap) -> bool {
        !self.reads_need_sign_in || self.operator(headers).is_some()
    }

    /// Signs in with `token`: the operator's name and the `Set-Cookie`
    /// value of a new session.
    pub fn sign_in(&self, token: &str) -> Option<(String, String)> {
        let operator = self.operator_with_token(token)?;
        let id = hex::encode(rand::random::<[u8; 32]>());
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(
            id.clone(),
            Session {
                operator: operator.clone(),
                expires: now + SESSION_LIFETIME,
            },
        );
        let cookie = format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            SESSION_LIFETIME.as_secs(),
            if self.secure { "; Secure" } else { "" }
        );
        Some((operator, cookie))
    }

    /// Ends the request's session; the `Set-Cookie` value that clears it.
    pub fn sign_out(&self, headers: &HeaderMap) -> String {
        if let Some(id) = session_cookie(headers) {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions.remove(id);
        }
        format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
    }

    fn operator_with_token(&self, token: &str) -> Option<String> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every entry is compared, in constant time, whichever matches.
        let mut found = None;
        for (operator, expected) in &self.tokens {
            if bool::from(expected.ct_eq(&digest)) {
                found = Some(operator.clone());
            }
        }
        found
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then_some(value)
        })
}

/// `NAME TOKEN` per line; blank lines and `#` comments are skipped. Every
/// mistake is reported with its line.
fn parse_tokens(path: &Path, text: &str) -> Result<Vec<(String, [u8; 32])>, String> {
    let mut tokens = Vec::new();
    let mut errors = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("{}:{}", path.display(), index + 1);
        let mut words = line.split_whitespace();
        let (Some(name), Some(token), None) = (words.next(), words.next(), words.next()) else {
            errors.push(format!("{at}: expected `OPERATOR TOKEN`"));
            continue;
        };
        if token.len() < MIN_TOKEN_LEN {
            errors.push(format!(
                "{at}: the token of {name:?} is shorter than {MIN_TOKEN_LEN} characters"
            ));
            continue;
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if tokens.iter().any(|(_, d)| *d == digest) {
            errors.push(format!("{at}: this token is given twice"));
            continue;
        }
        tokens.push((name.to_owned(), digest));
    }
    if tokens.is_empty() && errors.is_empty() {
        errors.push(format!("{}: no operator tokens", path.display()));
    }
    if errors.is_empty() {
        Ok(tokens)
    } else {
        Err(errors.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(text: &str) -> Result<Access, String> {
        Access::new(Some((Path::new("tokens"), text)), true, false)
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let error = access(
            "# operators\nalice 0123456789abcdef\nbob short\ncarol\nalice 0123456789abcdef\n",
        )
        .err()
        .unwrap();
        assert_eq!(
            error,
            "tokens:3: the token of \"bob\" is shorter than 16 characters\n\
             tokens:4: expected `OPERATOR TOKEN`\n\
             tokens:5: this token is given twice"
        );
        assert_eq!(
            access("\n# none\n").err().unwrap(),
            "tokens: no operator tokens"
        );
    }

    #[test]
    fn a_session_names_its_operator_until_it_ends() {
        let access = access("alice 0123456789abcdef\nbob fedcba9876543210\n").unwrap();
        assert!(access.sign_in("0123456789abcdeF").is_none());
        let (operator, cookie) = access.sign_in("fedcba9876543210").unwrap();
        assert_eq!(operator, "bob");
        let id = cookie.split(';').next().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, format!("theme=dark; {id}").parse().unwrap());
        assert_eq!(access.operator(&headers).as_deref(), Some("bob"));
        assert!(access.may_read(&headers));
        access.sign_out(&headers);
        assert_eq!(access.operator(&headers), None);
        assert!(!access.may_read(&headers));

        let mut bearer = HeaderMap::new();
        bearer.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef".parse().unwrap(),
        );
        assert_eq!(access.operator(&bearer).as_deref(), Some("alice"));
    }
}
