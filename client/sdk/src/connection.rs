//! The client's view of the cluster: several node addresses, in any
//! regions, and failover between them.
//!
//! Calls go to the preferred node; when it does not answer (transport error,
//! `Unavailable`, deadline) the call moves to the next address, and keeps
//! cycling with a short backoff for a bounded time, so an election or a lost
//! region costs a pause, not an error. Answers that are real refusals
//! (`InvalidArgument`, `AlreadyExists`, and a refused token or role:
//! `Unauthenticated`, `PermissionDenied`) are returned at once, since every
//! node would say the same. Only idempotent operations go through
//! [`Cluster::call`].
//!
//! Credentials: with a CA ([`ClusterOptions::ca_pem`]) every channel speaks
//! TLS and checks the node's certificate against it. Clients present no
//! certificate of their own but a bearer token ([`ClusterOptions::token`]),
//! added to every call by the [`Credentials`] interceptor.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cairn_proto::MAX_MESSAGE_BYTES;
use cairn_proto::transport::DialTls;
use cairn_proto::v1::cairn_client::CairnClient;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tracing::debug;
use zeroize::Zeroizing;

use crate::error::{ClientError, Result};

/// Time to keep retrying an operation across nodes before giving up.
pub const FAILOVER_BUDGET: Duration = Duration::from_secs(30);
/// Deadline of one attempt (a pack upload of 16 MiB included).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of opening a long-lived call ([`Cluster::open_call`]): connect,
/// send the opening message, read its answer.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait out "quorum lost" answers before reporting it instead
/// of cycling for the whole budget. A node says "quorum lost" only once it
/// sees a majority of voters unreachable (not during a mere election), so
/// this only covers a node's view lagging a recovery by a probe or two.
pub const QUORUM_GRACE: Duration = Duration::from_secs(2);

/// Metadata key of the bearer token.
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// The gRPC client every call gets: the generated one behind the
/// [`Credentials`] interceptor.
pub type Client = CairnClient<InterceptedService<Channel, Credentials>>;

/// The bearer token added to every call (none on an `--insecure` cluster).
///
/// The secret is kept in a [`Zeroizing`] string, wiped when the last clone
/// is dropped; `Debug` never prints it, and each request's header is marked
/// sensitive so HTTP/2 never puts it in its compression table.
#[derive(Clone, Default)]
pub struct Credentials {
    token: Option<std::sync::Arc<Zeroizing<String>>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.token {
            Some(_) => f.write_str("Credentials(token <redacted>)"),
            None => f.write_str("Credentials(none)"),
        }
    }
}

impl Credentials {
    /// A bearer token; surrounding whitespace (a token file's newline) is
    /// dropped. Refused if empty or not printable ASCII (the error never
    /// quotes the token).
    pub fn token(token: Zeroizing<String>) -> Result<Self> {
        let trimmed = token.trim();
        if trimmed.is_empty() {
            return Err(ClientError::BadToken {
                reason: "it is empty",
            });
        }
        if !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::BadToken {
                reason: "it must be printable ASCII without spaces",
            });
        }
        let token = if trimmed.len() == token.len() {
            token
        } else {
            Zeroizing::new(trimmed.to_string())
        };
        Ok(Self {
            token: Some(std::sync::Arc::new(token)),
        })
    }

    /// Whether a token is presented.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    fn header(&self) -> Option<AsciiMetadataValue> {
        let token = self.token.as_ref()?;
        let text = Zeroizing::new(format!("Bearer {}", token.as_str()));
        // Checked printable ASCII in `Credentials::token`, so this parses.
        let mut value: AsciiMetadataValue = MetadataValue::try_from(text.as_str()).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(value) = self.header() {
            request.metadata_mut().insert(AUTHORIZATION_HEADER, value);
        }
        Ok(request)
    }
}

/// How to reach and authenticate to a cluster, beyond its addresses.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// The cluster CA (PEM) node certificates must chain to; `None` speaks
    /// plaintext, which only an `--insecure` cluster accepts.
    pub ca_pem: Option<Vec<u8>>,
    /// The bearer token presented on every call.
    pub credentials: Credentials,
}

impl ClusterOptions {
    /// Speak TLS, trusting node certificates signed by this CA (PEM).
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Present this bearer token (see [`Credentials::token`]).
    pub fn token(mut self, token: impl Into<String>) -> Result<Self> {
        self.credentials = Credentials::token(Zeroizing::new(token.into()))?;
        Ok(self)
    }
}

/// Said when no node answered a client that speaks plaintext: a TLS node
/// just drops the connection, which says nothing by itself.
const PLAINTEXT_HINT: &str = "; if the cluster runs TLS, give its CA with --ca-file or CAIRN_CA";

/// Said when every node's certificate failed to verify against the CA.
const UNTRUSTED_HINT: &str = "; no node's certificate verifies against the given CA (--ca-file or CAIRN_CA): is it this cluster's CA?";

/// Connections to every configured node.
pub struct Cluster {
    endpoints: Vec<(String, Channel)>,
    /// Channels speak TLS (a CA was given).
    tls: bool,
    credentials: Credentials,
    preferred: AtomicUsize,
    budget: Duration,
    /// How many leading endpoints share spread-out work (the client's own
    /// region after `prefer_region`, else all of them).
    spread_over: usize,
    next_spread: AtomicUsize,
}

impl Cluster {
    /// Prepares plaintext channels to `addrs` (`host:port`), without a
    /// token: for `--insecure` clusters. Nothing connects yet.
    pub fn new(addrs: &[String]) -> Result<Self> {
        Self::with_options(addrs, ClusterOptions::default())
    }

    /// Prepares channels to `addrs` with TLS and a token as `options` say.
    /// Nothing connects yet.
    pub fn with_options(addrs: &[String], options: ClusterOptions) -> Result<Self> {
        if let Some(pem) = &options.ca_pem {
            check_ca_pem(pem)?;
        }
        let tls = options.ca_pem.as_ref().map(DialTls::new);
        let mut endpoints = Vec::new();
        for addr in addrs.iter().map(|a| a.trim()).filter(|a| !a.is_empty()) {
            let channel =
                cairn_proto::transport::lazy_channel(addr, Duration::from_secs(2), tls.as_ref())
                    .map_err(|e| ClientError::BadAddress {
                        addr: addr.to_string(),
                        reason: crate::error::error_chain(&e),
                    })?;
            endpoints.push((addr.to_string(), channel));
        }
        if endpoints.is_empty() {
            return Err(ClientError::NoAddresses);
        }
        let spread_over = endpoints.len();
        Ok(Self {
            endpoints,
            tls: tls.is_some(),
            credentials: options.credentials,
            preferred: AtomicUsize::new(0),
            budget: FAILOVER_BUDGET,
            spread_over,
            next_spread: AtomicUsize::new(0),
        })
    }

    /// Sets how long an operation may keep failing over before it errors.
    pub fn with_failover_budget(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self
    }

    /// Puts the addresses of `region` first, learning regions from the
    /// cluster map; reads then prefer that region's nodes too.
    pub async fn prefer_region(mut self, region: &str) -> Result<Self> {
        let status = self
            .call("cluster status", |mut c| async move {
                c.cluster_status(cairn_proto::v1::ClusterStatusRequest {})
                    .await
            })
            .await?;
        let local: std::collections::HashSet<&str> = status
            .nodes
            .iter()
            .filter(|n| n.region == region)
            .map(|n| n.addr.as_str())
            .collect();
        self.endpoints
            .sort_by_key(|(addr, _)| !local.contains(addr.as_str()));
        self.preferred.store(0, Ordering::Relaxed);
        let near = self
            .endpoints
            .iter()
            .filter(|(addr, _)| local.contains(addr.as_str()))
            .count();
        self.spread_over = if near > 0 { near } else { self.endpoints.len() };
        Ok(self)
    }

    /// The configured addresses.
    pub fn addrs(&self) -> Vec<String> {
        self.endpoints.iter().map(|(a, _)| a.clone()).collect()
    }

    /// Runs `op` against a node, failing over to the others on transport
    /// errors and `Unavailable`, for at most the failover budget.
    pub async fn call<T, F, Fut>(&self, name: &'static str, op: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let start = self.preferred.load(Ordering::Relaxed);
        self.call_from(start, name, &[], ATTEMPT_TIMEOUT, op).await
    }

    /// Opens a long-lived call (a bidirectional stream) with the failover of
    /// [`Cluster::call`], starting `skip` nodes after the preferred one (1
    /// after the call on the preferred node broke). `open` returns once the
    /// call is established (its first answer read): the attempt deadline,
    /// [`OPEN_TIMEOUT`], covers only that, never the call's whole life,
    /// which a unary deadline would cut short.
    pub(crate) async fn open_call<T, F, Fut>(
        &self,
        name: &'static str,
        skip: usize,
        open: F,
    ) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let start = (self.preferred.load(Ordering::Relaxed) + skip) % self.endpoints.len();
        self.call_from(start, name, &[], OPEN_TIMEOUT, |client| {
            let opening = open(client);
            async move { opening.await.map(Response::new) }
        })
        .await
    }

    /// How long an operation may keep failing over before it errors.
    pub(crate) fn failover_budget(&self) -> Duration {
        self.budget
    }

    /// Like [`Cluster::call`], but the codes in `answers` are returned as
    /// answers instead of failed over: a snapshot commit answered `Aborted`
    /// (blobs it references were collected during the backup) would be
    /// refused the same way by every node, so cycling for the budget only
    /// delays the rerun.
    pub async fn call_answering<T, F, Fut>(
        &self,
        name: &'static str,
        answers: &[Code],
        op: F,
    ) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let start = self.preferred.load(Ordering::Relaxed);
        self.call_from(start, name, answers, ATTEMPT_TIMEOUT, op)
            .await
    }

    /// Like [`Cluster::call`], but successive calls start on different
    /// nodes of the preferred group, so bulk reads use several gateways.
    pub async fn call_spread<T, F, Fut>(&self, name: &'static str, op: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let turn = self.next_spread.fetch_add(1, Ordering::Relaxed);
        let start = (self.preferred.load(Ordering::Relaxed) + turn) % self.spread_over.max(1);
        self.call_from(start, name, &[], ATTEMPT_TIMEOUT, op).await
    }

    async fn call_from<T, F, Fut>(
        &self,
        start: usize,
        name: &'static str,
        answers: &[Code],
        attempt_timeout: Duration,
        op: F,
    ) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let started = Instant::now();
        let n = self.endpoints.len();
        let mut tried: Vec<(String, String)> = Vec::new();
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 0usize;
        // In the current round: did every node that answered say "quorum lost"?
        let mut round_quorum_lost: Option<String> = None;
        let mut round_other = false;
        // Attempts of this round refused because the node's certificate did
        // not verify against the CA: when every node says so, the CA is wrong
        // (or these are not the cluster's nodes), and waiting will not help.
        let mut round_untrusted = 0usize;
        // Plaintext answered by a TLS server: HTTP/2 breaks on the handshake.
        let mut round_tls_only = 0usize;
        loop {
            let index = (start + attempt) % n;
            let (addr, channel) = &self.endpoints[index];
            let client = CairnClient::with_interceptor(channel.clone(), self.credentials.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let result = tokio::time::timeout(attempt_timeout, op(client)).await;
            let status = match result {
                Ok(Ok(response)) => {
                    if index != start {
                        self.preferred.store(index, Ordering::Relaxed);
                    }
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded("no answer in time"),
            };
            if answers.contains(&status.code()) || !retryable(&status) {
                return Err(self.refusal(name, addr, status));
            }
            debug!(op = name, addr = %addr, code = ?status.code(), "failing over");
            if status.message().starts_with("quorum lost") {
                round_quorum_lost = Some(status.message().to_string());
            } else if std::error::Error::source(&status).is_none()
                && status.code() != Code::DeadlineExceeded
            {
                // A node answered, and not with "no quorum": keep trying.
                round_other = true;
            }
            let reason = describe(&status);
            if reason.contains("invalid peer certificate") {
                round_untrusted += 1;
            }
            if !self.tls && speaks_tls_only(&status) {
                round_tls_only += 1;
            }
            match tried.iter_mut().find(|(a, _)| a == addr) {
                Some(entry) => entry.1 = reason,
                None => tried.push((addr.clone(), reason)),
            }
            attempt += 1;
            if started.elapsed() >= self.budget {
                if let Some(detail) = round_quorum_lost.take()
                    && !round_other
                {
                    return Err(quorum_lost(&detail));
                }
                let hint = if self.tls || tried.is_empty() {
                    ""
                } else {
                    PLAINTEXT_HINT
                };
                return Err(ClientError::NoNodeReachable { tried, hint });
            }
            if attempt.is_multiple_of(n) {
                if let Some(detail) = round_quorum_lost.take()
                    && !round_other
                    && started.elapsed() >= QUORUM_GRACE
                {
                    return Err(quorum_lost(&detail));
                }
                if round_untrusted == n {
                    return Err(ClientError::NoNodeReachable {
                        tried,
                        hint: UNTRUSTED_HINT,
                    });
                }
                if round_tls_only == n {
                    return Err(ClientError::NoNodeReachable {
                        tried,
                        hint: PLAINTEXT_HINT,
                    });
                }
                round_untrusted = 0;
                round_tls_only = 0;
                round_other = false;
                // A full round failed: wait a little (an election, a restart).
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

impl Cluster {
    /// Whether calls present a token.
    pub fn has_token(&self) -> bool {
        self.credentials.has_token()
    }

    /// A real answer (not "try another node") as the error a user acts on:
    /// a refused token or role gets its own sentence, whatever the node said.
    pub(crate) fn refusal(&self, op: &'static str, addr: &str, status: Status) -> ClientError {
        match status.code() {
            Code::Unauthenticated if !self.has_token() => ClientError::TokenRequired,
            Code::Unauthenticated => ClientError::TokenRefused,
            Code::PermissionDenied => ClientError::PermissionDenied {
                op,
                reason: shorten(status.message(), DESCRIBE_LEN_MAX),
            },
            code => ClientError::Server {
                op,
                addr: addr.to_string(),
                code,
                message: status.message().to_string(),
            },
        }
    }

    /// The caller as the cluster sees it: its token's id, role and tenant,
    /// or `insecure` when the cluster checks no token.
    pub async fn who_am_i(&self) -> Result<cairn_proto::v1::WhoAmIReply> {
        self.call("who am i", |mut c| async move {
            c.who_am_i(cairn_proto::v1::WhoAmIRequest {}).await
        })
        .await
    }

    /// The tenant this client acts for: `explicit` (`--tenant`,
    /// `CAIRN_TENANT`) when given; else, with a token, the token's own
    /// tenant (asked with WhoAmI); else [`crate::repo::DEFAULT_TENANT`].
    pub async fn resolve_tenant(&self, explicit: Option<&str>) -> Result<String> {
        if explicit.is_some_and(|t| !t.is_empty()) || !self.has_token() {
            return Ok(choose_tenant(explicit, None));
        }
        match self.who_am_i().await {
            Ok(me) => Ok(choose_tenant(explicit, Some(&me.tenant))),
            // A node from before tokens checks none: the default tenant.
            Err(ClientError::Server {
                code: Code::Unimplemented,
                ..
            }) => Ok(choose_tenant(explicit, None)),
            Err(e) => Err(e),
        }
    }
}

/// The CA must be one or more PEM certificates: anything else would only
/// fail later as an unreachable cluster.
fn check_ca_pem(pem: &[u8]) -> Result<()> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut count = 0usize;
    for cert in CertificateDer::pem_slice_iter(pem) {
        if cert.is_err() {
            return Err(ClientError::BadCa {
                reason: "a certificate in it is not valid PEM",
            });
        }
        count += 1;
    }
    if count == 0 {
        return Err(ClientError::BadCa {
            reason: "it holds no PEM certificate",
        });
    }
    Ok(())
}

/// Tenant resolution order: the explicit name, then the token's tenant
/// (empty for a cluster-wide token), then the default tenant.
pub fn choose_tenant(explicit: Option<&str>, token_tenant: Option<&str>) -> String {
    [explicit, token_tenant]
        .into_iter()
        .flatten()
        .find(|t| !t.is_empty())
        .unwrap_or(crate::repo::DEFAULT_TENANT)
        .to_string()
}

fn quorum_lost(message: &str) -> ClientError {
    ClientError::QuorumLost {
        detail: message.trim_start_matches("quorum lost: ").to_string(),
    }
}

/// What a plaintext client gets from a node that speaks only TLS.
fn speaks_tls_only(status: &Status) -> bool {
    status.code() == Code::Internal && status.message().starts_with("h2 protocol error")
}

/// The node did not serve this call, another one may.
pub(crate) fn retryable(status: &Status) -> bool {
    if speaks_tls_only(status) {
        return true;
    }
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => true,
        // Transport failures surface as Unknown with a transport source.
        Code::Unknown => {
            std::error::Error::source(status).is_some() || status.message().contains("transport")
        }
        _ => false,
    }
}

/// A failed attempt in a few words: the node's message, and for transport
/// failures their cause (refused connection, a certificate the CA did not
/// sign...), which is what tells a user what to fix.
fn describe(status: &Status) -> String {
    let mut text = status.message().to_string();
    if let Some(source) = std::error::Error::source(status) {
        let cause = crate::error::error_chain(source);
        if cause.contains(&text) {
            text = cause;
        } else if !cause.is_empty() && !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    if text.is_empty() {
        format!("{:?}", status.code())
    } else {
        shorten(&text, DESCRIBE_LEN_MAX)
    }
}

/// Longest node message kept in an error, in bytes.
const DESCRIBE_LEN_MAX: usize = 160;

/// `text` cut to at most `max` bytes on a character boundary (a node's
/// message may hold any UTF-8), with `…` when something was cut.
fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "cairn_tok_0123456789abcdef";

    fn intercepted(credentials: &mut Credentials) -> Request<()> {
        credentials
            .call(Request::new(()))
            .expect("interceptor passes")
    }

    #[test]
    fn the_interceptor_adds_the_bearer_token_to_every_call() {
        let mut credentials =
            Credentials::token(Zeroizing::new(format!("{SECRET}\n"))).expect("a valid token");
        for _ in 0..2 {
            let request = intercepted(&mut credentials);
            let value = request
                .metadata()
                .get(AUTHORIZATION_HEADER)
                .expect("authorization header");
            assert_eq!(
                value.to_str().ok(),
                Some(format!("Bearer {SECRET}").as_str())
            );
            assert!(value.is_sensitive(), "kept out of HPACK tables and Debug");
        }
    }

    #[test]
    fn without_a_token_no_header_is_sent() {
        let request = intercepted(&mut Credentials::default());
        assert!(request.metadata().get(AUTHORIZATION_HEADER).is_none());
    }

    #[test]
    fn the_token_is_never_printed() {
        let credentials = Credentials::token(Zeroizing::new(SECRET.into())).expect("valid");
        let options = ClusterOptions {
            credentials,
            ca_pem: None,
        };
        let text = format!("{options:?}");
        assert!(!text.contains(SECRET), "{text}");
        assert!(text.contains("redacted"), "{text}");
        let request = intercepted(&mut options.credentials.clone());
        assert!(!format!("{request:?}").contains(SECRET));
    }

    #[test]
    fn bad_tokens_are_refused_without_quoting_them() {
        for bad in ["", "  \n", "has space", "tab\there", "ünïcode"] {
            let error = Credentials::token(Zeroizing::new(bad.into())).expect_err(bad);
            let text = error.to_string();
            assert!(text.starts_with("invalid token: "), "{text}");
            if !bad.trim().is_empty() {
                assert!(!text.contains(bad.trim()), "{text}");
            }
        }
    }

    #[test]
    fn tenant_comes_from_the_flag_then_the_token_then_the_default() {
        assert_eq!(choose_tenant(Some("chat"), Some("tok")), "chat");
        assert_eq!(choose_tenant(None, Some("tok")), "tok");
        assert_eq!(choose_tenant(Some(""), Some("tok")), "tok");
        // A cluster-wide token has no tenant.
        assert_eq!(choose_tenant(None, Some("")), "default");
        assert_eq!(choose_tenant(None, None), "default");
    }

    #[tokio::test]
    async fn without_a_token_the_tenant_is_resolved_without_asking() {
        // Nothing listens on port 1: asking would fail.
        let cluster = Cluster::new(&["127.0.0.1:1".into()]).expect("address parses");
        assert_eq!(
            cluster.resolve_tenant(None).await.expect("no call"),
            "default"
        );
        assert_eq!(
            cluster.resolve_tenant(Some("chat")).await.expect("no call"),
            "chat"
        );
    }

    #[tokio::test]
    async fn refused_tokens_and_roles_are_real_answers_with_their_own_sentence() {
        for code in [Code::Unauthenticated, Code::PermissionDenied] {
            assert!(
                !retryable(&Status::new(code, "no")),
                "{code:?} is not failed over"
            );
        }
        let plain = Cluster::new(&["127.0.0.1:1".into()]).expect("parses");
        let with_token = Cluster::with_options(
            &["127.0.0.1:1".into()],
            ClusterOptions::default().token(SECRET).expect("valid"),
        )
        .expect("parses");
        let refused =
            with_token.refusal("list snapshots", "a:1", Status::unauthenticated("revoked"));
        assert!(matches!(refused, ClientError::TokenRefused));
        assert_eq!(
            refused.to_string(),
            "the token was refused: unknown, revoked or expired — give a valid one with --token-file or CAIRN_TOKEN"
        );
        let missing = plain.refusal("list snapshots", "a:1", Status::unauthenticated("no token"));
        assert!(matches!(missing, ClientError::TokenRequired), "{missing}");
        let denied = with_token.refusal("create token", "a:1", Status::permission_denied(""));
        assert_eq!(denied.to_string(), "this token's role may not create token");
        let denied = with_token.refusal(
            "commit snapshot",
            "a:1",
            Status::permission_denied("role restore is read-only"),
        );
        assert_eq!(
            denied.to_string(),
            "this token's role may not commit snapshot (role restore is read-only)"
        );
    }

    #[tokio::test]
    async fn a_ca_that_is_not_pem_is_named_as_such() {
        for bad in [
            &b""[..],
            b"not a certificate",
            b"-----BEGIN CERTIFICATE-----\n!!\n",
        ] {
            let options = ClusterOptions::default().ca_pem(bad.to_vec());
            let error = Cluster::with_options(&["127.0.0.1:7101".into()], options)
                .err()
                .expect("refused");
            assert!(matches!(error, ClientError::BadCa { .. }), "{error}");
        }
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        // 3-byte characters: byte 160 falls inside one.
        let message = "é€".repeat(100);
        let status = Status::unavailable(message.clone());
        let text = describe(&status);
        assert!(text.ends_with('…'));
        assert!(text.len() <= DESCRIBE_LEN_MAX + '…'.len_utf8());
        assert!(message.starts_with(text.trim_end_matches('…')));
        for len in 0..12 {
            let cut = shorten("ü€😀a", len);
            assert!(cut.len() <= len + '…'.len_utf8(), "{cut}");
        }
        assert_eq!(shorten("short", DESCRIBE_LEN_MAX), "short");
    }
}
