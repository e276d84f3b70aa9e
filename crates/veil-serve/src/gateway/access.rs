//! Who may talk to the gateway: clients that present one of its API keys (when it has any),
//! through a `Host` header that names the gateway.
//!
//! The Host check stops DNS rebinding: a web page on another site can make its own name
//! resolve to 127.0.0.1 and have the browser send requests to the gateway, but the browser
//! still sends that site's name as the Host. IP literals and `localhost` are always accepted;
//! other names only when the operator lists them (`--allowed-host`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Result, ServeError};
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, HOST};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::openai::ApiError;

/// Whose request this is: the digest of its API key (`None` on a gateway without keys). Each
/// tenant has its own prefix cache, so no user learns (from `veil.accel`'s cached tokens, or
/// from timing) which prompts another user sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Tenant(pub Option<[u8; 32]>);

/// The gateway's access rules.
#[derive(Debug, Default)]
pub struct Access {
    /// blake3 digests of the API keys; `None` when the gateway takes no keys.
    keys: Option<HashSet<[u8; 32]>>,
    /// Host names (lowercase, without port) accepted besides IP literals and `localhost`.
    hosts: HashSet<String>,
}

impl Access {
    /// Rules from `--api-key-file` (one key per line; blank lines and `#` comments skipped)
    /// and `--allowed-host` names.
    pub fn new(key_file: Option<&Path>, allowed_hosts: &[String]) -> Result<Self> {
        let keys = match key_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(ServeError::io(format!(
                    "cannot read API keys from {}",
                    path.display()
                )))?;
                let keys: HashSet<[u8; 32]> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|k| *blake3::hash(k.as_bytes()).as_bytes())
                    .collect();
                if keys.is_empty() {
                    return Err(ServeError::Invalid(format!(
                        "{} holds no API key: one key per line (blank lines and # comments are skipped)",
                        path.display()
                    )));
                }
                Some(keys)
            }
        };
        Ok(Self {
            keys,
            hosts: allowed_hosts.iter().map(|h| h.to_lowercase()).collect(),
        })
    }

    /// Whether the Host header value `host` names this gateway.
    fn host_allowed(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            // [v6]:port
            Some(rest) => return rest.split(']').next().is_some_and(is_ip),
            None => host.rsplit_once(':').map_or(host, |(name, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    name
                } else {
                    host
                }
            }),
        };
        let name = name.to_lowercase();
        is_ip(&name) || name == "localhost" || self.hosts.contains(&name)
    }

    /// Whose request carries `header` (an `Authorization` value): `None` when the gateway
    /// takes keys and the header holds none of them.
    fn tenant(&self, header: Option<&str>) -> Option<Tenant> {
        let Some(keys) = &self.keys else {
            return Some(Tenant(None));
        };
        let key = header?.strip_prefix("Bearer ")?.trim();
        let digest = *blake3::hash(key.as_bytes()).as_bytes();
        keys.contains(&digest).then_some(Tenant(Some(digest)))
    }
}

fn is_ip(name: &str) -> bool {
    name.parse::<std::net::IpAddr>().is_ok()
}

/// The middleware: a foreign Host is refused (403) before anything else, then a missing or
/// unknown API key (401); `/health` needs no key, so load balancers can probe it.
pub async fn check(
    State(access): State<Arc<Access>>,
    mut request: Request,
    next: Next,
) -> Response {
    match admit(&access, &request) {
        Ok(tenant) => {
            request.extensions_mut().insert(tenant);
            next.run(request).await
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// Whose `request` this is, or why it may not pass.
fn admit(access: &Access, request: &Request) -> Result<Tenant, ApiError> {
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    let host = header(HOST).or_else(|| request.uri().host()).unwrap_or("");
    if !access.host_allowed(host) {
        return Err(ApiError::foreign_host(host));
    }
    match access.tenant(header(AUTHORIZATION)) {
        Some(tenant) => Ok(tenant),
        None if request.uri().path() == "/health" => Ok(Tenant(None)),
        None => Err(ApiError::unauthorized(
            "this gateway needs an API key: send `Authorization: Bearer <key>` with a key from its --api-key-file",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_name_the_gateway() {
        let access = Access::new(None, &["veil.lan".into()]).unwrap();
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "10.0.0.7",
            "veil.lan:8080",
        ] {
            assert!(access.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "",
            "localhost.evil.example",
            "[evil]",
        ] {
            assert!(!access.host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn keys_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# team keys\n\nsk-one\n  sk-two  \n").unwrap();
        let access = Access::new(Some(&file), &[]).unwrap();
        assert!(access.tenant(Some("Bearer sk-one")).is_some());
        assert!(access.tenant(Some("Bearer sk-two")).is_some());
        assert_ne!(
            access.tenant(Some("Bearer sk-one")),
            access.tenant(Some("Bearer sk-two"))
        );
        assert!(access.tenant(Some("Bearer sk-three")).is_none());
        assert!(access.tenant(Some("sk-one")).is_none());
        assert!(access.tenant(None).is_none());
        std::fs::write(&file, "# nothing\n").unwrap();
        assert!(Access::new(Some(&file), &[]).is_err());
        assert_eq!(Access::default().tenant(None), Some(Tenant(None)));
    }
}
