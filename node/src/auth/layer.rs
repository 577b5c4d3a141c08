//! Caller resolution in front of the Cairn service, before any request body
//! is decoded: a bearer token, else a member node's certificate (the
//! [`VerifiedPeer`] the TLS layer put in the extensions), else nothing. The
//! resolved [`Caller`] goes into the request's extensions for the handlers;
//! a call without valid credentials is refused here, and audited.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::http::{self, HeaderMap};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use super::audit::{Auditor, anonymous};
use super::permission::Op;
use super::token::{token_id, token_key, well_formed};
use super::{Caller, VerifiedPeer};
use crate::meta::types::TokenRecord;
use crate::meta::{Meta, MetaError, wall_clock_ms};

/// Why a caller could not be authenticated. Messages name no secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this call needs a token (--token-file or CAIRN_TOKEN)")]
    NoCredential,
    #[error("malformed authorization header: expected \"Bearer <token>\"")]
    Malformed,
    #[error("token unknown, revoked or expired")]
    BadToken { id: String },
    #[error("node {0} is not a member of this cluster")]
    NotMember(u64),
    #[error("cannot check credentials now: {0}")]
    Meta(#[from] MetaError),
}

impl AuthError {
    pub fn into_status(self) -> Status {
        match self {
            AuthError::Meta(_) => Status::unavailable(self.to_string()),
            _ => Status::unauthenticated(self.to_string()),
        }
    }

    /// The public id of the token presented, if one was.
    fn token_id(&self) -> Option<String> {
        match self {
            AuthError::BadToken { id } => Some(id.clone()),
            _ => None,
        }
    }
}

/// Resolves callers against the local metadata state.
pub struct Authenticator {
    meta: Meta,
    insecure: bool,
    auditor: Arc<Auditor>,
}

impl Authenticator {
    pub fn new(meta: Meta, insecure: bool, auditor: Arc<Auditor>) -> Self {
        Self {
            meta,
            insecure,
            auditor,
        }
    }

    /// Whether this node runs `--insecure` (everyone is trusted).
    pub fn insecure(&self) -> bool {
        self.insecure
    }

    /// The bearer token in `headers`: `None` without an authorization header.
    pub fn bearer(headers: &HeaderMap) -> Option<Result<&str, AuthError>> {
        let value = headers.get(http::header::AUTHORIZATION)?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                // The scheme is case-insensitive (RFC 6750 via RFC 9110).
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            })
            .map(str::trim)
            .filter(|t| well_formed(t));
        Some(token.ok_or(AuthError::Malformed))
    }

    /// The caller holding `token`, if it is known, unrevoked and unexpired.
    /// The look-up is by the token's key, so no secret is ever compared.
    pub fn token_caller(&self, token: &str) -> Result<Caller, AuthError> {
        token_caller_in(token, wall_clock_ms(), |key| Ok(self.meta.token(key)?))
    }

    /// Who is calling (DESIGN, *Trust boundary*).
    pub fn resolve(
        &self,
        headers: &HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, AuthError> {
        resolve_caller(
            self.insecure,
            headers,
            extensions,
            |token| self.token_caller(token),
            |id| self.meta.is_member(id),
        )
    }

    /// Records a refused authentication (rate-limited).
    fn refused(&self, path: &str, error: &AuthError) {
        if matches!(error, AuthError::Meta(_)) {
            return;
        }
        let action = Op::from_path(path).map_or("unknown RPC", Op::name);
        self.auditor
            .refused(anonymous(error.token_id()), action, "", &error.to_string());
    }
}

/// [`Authenticator::token_caller`] over any token look-up.
fn token_caller_in(
    token: &str,
    now_unix_ms: i64,
    lookup: impl FnOnce(&crate::model::Id32) -> Result<Option<TokenRecord>, AuthError>,
) -> Result<Caller, AuthError> {
    match lookup(&token_key(token))? {
        Some(record) if record.usable_at(now_unix_ms) => Ok(Caller::Token {
            id: record.id,
            role: record.role,
            tenant: record.tenant,
        }),
        _ => Err(AuthError::BadToken {
            id: token_id(token),
        }),
    }
}

/// The resolution order: `--insecure` trusts everyone; a bearer token is
/// checked when present (a bad one is refused even from a node); else a
/// node certificate, of a member only; else nothing is refused.
fn resolve_caller(
    insecure: bool,
    headers: &HeaderMap,
    extensions: &http::Extensions,
    token_caller: impl FnOnce(&str) -> Result<Caller, AuthError>,
    is_member: impl FnOnce(crate::model::NodeId) -> bool,
) -> Result<Caller, AuthError> {
    if insecure {
        return Ok(Caller::Insecure);
    }
    if let Some(token) = Authenticator::bearer(headers) {
        return token_caller(token?);
    }
    if let Some(VerifiedPeer(id)) = extensions.get::<VerifiedPeer>() {
        return if is_member(*id) {
            Ok(Caller::Node(*id))
        } else {
            Err(AuthError::NotMember(*id))
        };
    }
    Err(AuthError::NoCredential)
}

/// The Cairn service behind caller resolution.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S> AuthService<S> {
    pub fn new(inner: S, auth: Arc<Authenticator>) -> Self {
        Self { inner, auth }
    }
}

impl<S: NamedService> NamedService for AuthService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.auth.resolve(request.headers(), request.extensions()) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                // The clone is ready-checked by the next poll_ready; the
                // one polled ready serves this request (the tower idiom).
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(ready.call(request))
            }
            Err(error) => {
                self.auth.refused(request.uri().path(), &error);
                let response = error.into_status().into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    const TOKEN: &str = "cairn_0123456789abcdef0123456789abcdef";

    fn record(revoked: bool, expires_unix_ms: i64) -> TokenRecord {
        TokenRecord {
            id: token_id(TOKEN),
            role: Role::Restore,
            tenant: Some("t".into()),
            created_unix_ms: 1,
            expires_unix_ms,
            revoked,
            label: String::new(),
            created_by: String::new(),
        }
    }

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = value {
            headers.insert(
                http::header::AUTHORIZATION,
                value.parse().expect("header value"),
            );
        }
        headers
    }

    fn resolve(
        insecure: bool,
        auth: Option<&str>,
        peer: Option<u64>,
        stored: Option<TokenRecord>,
    ) -> Result<Caller, AuthError> {
        let mut extensions = http::Extensions::new();
        if let Some(id) = peer {
            extensions.insert(VerifiedPeer(id));
        }
        resolve_caller(
            insecure,
            &headers(auth),
            &extensions,
            |token| {
                token_caller_in(token, 1_000, |key| {
                    assert_eq!(
                        *key,
                        token_key(token),
                        "looked up by the key, never the secret"
                    );
                    Ok(stored.clone())
                })
            },
            |id| id == 2,
        )
    }

    #[test]
    fn tokens_then_member_certificates_then_nothing() {
        let bearer = format!("Bearer {TOKEN}");
        assert_eq!(
            resolve(true, None, None, None).expect("insecure"),
            Caller::Insecure
        );
        assert_eq!(
            resolve(false, Some(&bearer), Some(2), Some(record(false, 0))).expect("token"),
            Caller::Token {
                id: token_id(TOKEN),
                role: Role::Restore,
                tenant: Some("t".into())
            }
        );
        assert!(
            resolve(
                false,
                Some(&format!("bearer {TOKEN}")),
                None,
                Some(record(false, 0))
            )
            .is_ok()
        );
        for stored in [None, Some(record(true, 0)), Some(record(false, 1_000))] {
            let refused = resolve(false, Some(&bearer), Some(2), stored).expect_err("bad token");
            assert!(matches!(refused, AuthError::BadToken { .. }));
            assert_eq!(refused.to_string(), "token unknown, revoked or expired");
            assert!(!refused.to_string().contains(TOKEN));
        }
        assert!(matches!(
            resolve(false, Some("Basic dXNlcjpwYXNz"), None, None),
            Err(AuthError::Malformed)
        ));
        assert_eq!(
            resolve(false, None, Some(2), None).expect("member"),
            Caller::Node(2)
        );
        assert!(matches!(
            resolve(false, None, Some(9), None),
            Err(AuthError::NotMember(9))
        ));
        let none = resolve(false, None, None, None).expect_err("nothing");
        assert_eq!(
            none.to_string(),
            "this call needs a token (--token-file or CAIRN_TOKEN)"
        );
        assert_eq!(none.into_status().code(), tonic::Code::Unauthenticated);
    }
}
