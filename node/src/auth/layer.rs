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
        let key = token_key(token);
        match self.meta.token(&key)? {
            Some(record) if record.usable_at(wall_clock_ms()) => Ok(Caller::Token {
                id: record.id,
                role: record.role,
                tenant: record.tenant,
            }),
            _ => Err(AuthError::BadToken {
                id: token_id(token),
            }),
        }
    }

    /// Who is calling (DESIGN, *Trust boundary*).
    pub fn resolve(
        &self,
        headers: &HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, AuthError> {
        if self.insecure {
            return Ok(Caller::Insecure);
        }
        if let Some(token) = Self::bearer(headers) {
            return self.token_caller(token?);
        }
        if let Some(VerifiedPeer(id)) = extensions.get::<VerifiedPeer>() {
            return if self.meta.is_member(*id) {
                Ok(Caller::Node(*id))
            } else {
                Err(AuthError::NotMember(*id))
            };
        }
        Err(AuthError::NoCredential)
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
