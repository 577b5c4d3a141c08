//! Node identity on the wire: the node's TLS configuration (loaded and
//! checked at start), the peer-certificate reading that turns a client
//! certificate into a [`VerifiedPeer`], and the tower layer that guards the
//! node-to-node services before any of them decodes a request.
//!
//! One port serves clients and nodes. The server asks for a client
//! certificate but does not require one: clients come with a bearer token
//! and no certificate, nodes with a certificate of the cluster CA. rustls
//! checks any certificate presented (chain to the CA, validity dates) in the
//! handshake, so a certificate from another CA or an expired one never gets
//! a request through, and plaintext never completes a handshake. What is left
//! to this module is the node id: a node certificate carries exactly one DNS
//! name `node-<id>.cairn` ([`node_server_name`]).
//!
//! [`PeerAuthLayer`] then enforces, for `/cairn.v1.Raft/*` and
//! `/cairn.v1.Shards/*`: a node certificate is required, and its node must be
//! a member of the current membership, except for the admission calls
//! (`ClusterInfo`, `ChangeMembership`) a starting node makes before it is a
//! member; `meta::service` checks that what a payload claims about its sender
//! matches the certificate. The `Cairn` service passes through untouched
//! (tokens are checked there). In `--insecure` mode the layer is not mounted.

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use cairn_proto::transport::{DialTls, node_server_name};
use futures::future::{Either, Ready, ready};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::auth::VerifiedPeer;
use crate::config::TlsSection;
use crate::model::NodeId;

/// Why a node's TLS material was refused at start.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("the TLS {what} is not a PEM {expected}")]
    Pem {
        what: &'static str,
        expected: &'static str,
    },
    #[error("the node certificate is not signed by the cluster CA given with --tls-ca")]
    NotSignedByCa,
    #[error("the node certificate is outside its validity period (expired or not yet valid)")]
    Expired,
    #[error("the TLS key does not belong to the node certificate")]
    KeyMismatch,
    #[error(
        "the node certificate is for {found}, but this node is node {node_id}: issue one with `cairn-node ca issue --node-id {node_id}`"
    )]
    WrongNode { node_id: NodeId, found: String },
}

/// What a peer certificate says about its node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerCertError {
    #[error("not an X.509 certificate")]
    Unparsable,
    #[error("no node name (node-<id>.cairn) in the certificate")]
    NoNodeName,
    #[error("several node names in the certificate")]
    SeveralNodeNames,
}

/// The node id of a certificate (DER): its one DNS name `node-<id>.cairn`.
/// The chain and the dates are rustls' job, not this function's.
pub fn cert_node_id(der: &[u8]) -> Result<NodeId, PeerCertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| PeerCertError::Unparsable)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PeerCertError::Unparsable)?
        .ok_or(PeerCertError::NoNodeName)?;
    let mut ids = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => parse_node_name(dns),
            _ => None,
        });
    let id = ids.next().ok_or(PeerCertError::NoNodeName)?;
    if ids.next().is_some() {
        return Err(PeerCertError::SeveralNodeNames);
    }
    Ok(id)
}

/// `node-<id>.cairn` → id (the exact spelling [`node_server_name`] makes).
pub(crate) fn parse_node_name(dns: &str) -> Option<NodeId> {
    let id: NodeId = dns
        .strip_prefix("node-")?
        .strip_suffix(".cairn")?
        .parse()
        .ok()?;
    (node_server_name(id) == dns).then_some(id)
}

fn pem_der(pem_text: &[u8], what: &'static str) -> Result<Vec<u8>, TlsError> {
    let parsed = x509_parser::pem::parse_x509_pem(pem_text).map_err(|_| TlsError::Pem {
        what,
        expected: "certificate",
    })?;
    Ok(parsed.1.contents)
}

/// [`cert_node_id`] of a PEM certificate.
pub fn cert_node_id_pem(cert_pem: &str) -> Result<NodeId, PeerCertError> {
    let der = pem_der(cert_pem.as_bytes(), "certificate").map_err(|_| PeerCertError::Unparsable)?;
    cert_node_id(&der)
}

/// Checks that `cert_pem` is signed by `ca_pem` and is within its dates:
/// the node refuses to start with a certificate its peers would refuse.
pub fn check_chain_pem(ca_pem: &str, cert_pem: &str) -> Result<(), TlsError> {
    let ca_der = pem_der(ca_pem.as_bytes(), "CA")?;
    let cert_der = pem_der(cert_pem.as_bytes(), "certificate")?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|_| TlsError::Pem {
        what: "CA",
        expected: "certificate",
    })?;
    let (_, cert) = X509Certificate::from_der(&cert_der).map_err(|_| TlsError::Pem {
        what: "certificate",
        expected: "certificate",
    })?;
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| TlsError::NotSignedByCa)?;
    if !cert.validity().is_valid() {
        return Err(TlsError::Expired);
    }
    Ok(())
}

/// This node's TLS material, checked: the cluster CA, its certificate (for
/// its own node id, signed by that CA, in its dates) and the matching key.
#[derive(Clone)]
pub struct NodeTls {
    node_id: NodeId,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for NodeTls {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl NodeTls {
    /// Reads and checks the `[tls]` files (config validation made sure all
    /// three are given).
    pub fn load(node_id: NodeId, section: &TlsSection) -> Result<Self, TlsError> {
        let path = |p: &Option<std::path::PathBuf>| p.clone().unwrap_or_default();
        Self::from_pems(
            node_id,
            read("CA", &path(&section.ca))?,
            read("certificate", &path(&section.cert))?,
            read("key", &path(&section.key))?,
        )
    }

    /// Checks PEM texts: the key parses and matches the certificate, the
    /// certificate chains to the CA, is in its dates and names this node.
    pub fn from_pems(
        node_id: NodeId,
        ca_pem: String,
        cert_pem: String,
        key_pem: String,
    ) -> Result<Self, TlsError> {
        check_chain_pem(&ca_pem, &cert_pem)?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|_| TlsError::Pem {
            what: "key",
            expected: "private key (PKCS#8)",
        })?;
        let cert_der = pem_der(cert_pem.as_bytes(), "certificate")?;
        let (_, cert) = X509Certificate::from_der(&cert_der).map_err(|_| TlsError::Pem {
            what: "certificate",
            expected: "certificate",
        })?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(TlsError::KeyMismatch);
        }
        match cert_node_id(&cert_der) {
            Ok(id) if id == node_id => {}
            Ok(id) => {
                return Err(TlsError::WrongNode {
                    node_id,
                    found: format!("node {id}"),
                });
            }
            Err(e) => {
                return Err(TlsError::WrongNode {
                    node_id,
                    found: format!("no single node ({e})"),
                });
            }
        }
        Ok(Self {
            node_id,
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// The server side: this node's identity, and client certificates of the
    /// cluster CA asked for but optional (clients use tokens).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true)
    }

    /// The dialing side: trust the cluster CA and present this node's
    /// certificate; callers add [`DialTls::for_node`] per peer.
    pub fn dial(&self) -> DialTls {
        DialTls::new(&self.ca_pem).with_identity(&self.cert_pem, &self.key_pem)
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// When the node certificate and the CA stop being valid, in Unix
    /// seconds, for the expiry alert (both were parsed at [`NodeTls::load`],
    /// so `None` only if a file changed its nature since).
    pub fn expiry(&self) -> Option<CertExpiry> {
        Some(CertExpiry {
            node_not_after_unix: not_after_unix(&self.cert_pem)?,
            ca_not_after_unix: not_after_unix(&self.ca_pem)?,
        })
    }
}

/// End of validity of this node's TLS material (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertExpiry {
    pub node_not_after_unix: i64,
    pub ca_not_after_unix: i64,
}

fn not_after_unix(pem: &str) -> Option<i64> {
    let der = pem_der(pem.as_bytes(), "certificate").ok()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Who may use the node-to-node services; the metadata group answers.
pub trait MemberCheck: Send + Sync + 'static {
    /// Whether node `id` may call Raft and Shards RPCs beyond admission.
    fn admits(&self, id: NodeId) -> bool;
}

impl MemberCheck for crate::meta::Meta {
    /// A member of the current membership (voter or learner). A node that
    /// holds no membership yet (a starting or joining node with an empty
    /// store) has nothing to protect and learns the membership from whichever
    /// cluster node reaches it first, so it admits any node certificate.
    fn admits(&self, id: NodeId) -> bool {
        let metrics = self.raft().metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let mut nodes = membership.nodes().peekable();
        nodes.peek().is_none() || membership.get_node(&id).is_some()
    }
}

/// Which guard a request path gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// Client-facing (`Cairn`) or unknown paths: passed on (tonic answers
    /// `Unimplemented` for unknown ones).
    Open,
    /// Node-to-node, members only.
    Members,
    /// Node-to-node calls a node makes before it is a member: any node
    /// certificate of the cluster CA (the payload is then checked against it).
    Admission,
}

fn guard(path: &str) -> Guard {
    const ADMISSION: [&str; 2] = [
        "/cairn.v1.Raft/ClusterInfo",
        "/cairn.v1.Raft/ChangeMembership",
    ];
    if ADMISSION.contains(&path) {
        Guard::Admission
    } else if path.starts_with("/cairn.v1.Raft/") || path.starts_with("/cairn.v1.Shards/") {
        Guard::Members
    } else {
        Guard::Open
    }
}

/// The node id proven by the request's TLS client certificate, if any.
fn verified_peer<B>(request: &http::Request<B>) -> Option<NodeId> {
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let leaf = certs.first()?;
    match cert_node_id(leaf) {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::debug!(reason = %e, "a client certificate of the cluster CA names no node");
            None
        }
    }
}

/// The tower layer mounted on the node's server. Disabled (a pass-through)
/// in `--insecure` mode, where nobody is authenticated.
#[derive(Clone)]
pub struct PeerAuthLayer {
    members: Option<Arc<dyn MemberCheck>>,
}

impl PeerAuthLayer {
    pub fn new(members: Arc<dyn MemberCheck>) -> Self {
        Self {
            members: Some(members),
        }
    }

    /// Checks nothing: `--insecure`.
    pub fn disabled() -> Self {
        Self { members: None }
    }
}

impl<S> tower_layer::Layer<S> for PeerAuthLayer {
    type Service = PeerAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerAuth {
            inner,
            members: self.members.clone(),
        }
    }
}

/// See [`PeerAuthLayer`].
#[derive(Clone)]
pub struct PeerAuth<S> {
    inner: S,
    members: Option<Arc<dyn MemberCheck>>,
}

/// What the layer decided for one request.
fn decide(
    path: &str,
    peer: Option<NodeId>,
    members: &dyn MemberCheck,
) -> Result<(), tonic::Status> {
    match (guard(path), peer) {
        (Guard::Open, _) => Ok(()),
        (_, None) => Err(tonic::Status::unauthenticated(
            "node services need a node certificate of this cluster",
        )),
        (Guard::Admission, Some(_)) => Ok(()),
        (Guard::Members, Some(id)) if members.admits(id) => Ok(()),
        (Guard::Members, Some(id)) => Err(tonic::Status::permission_denied(format!(
            "node {id} is not a member of this cluster"
        ))),
    }
}

impl<S, B, ResBody> tower_service::Service<http::Request<B>> for PeerAuth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let Some(members) = &self.members else {
            return Either::Right(self.inner.call(request));
        };
        let peer = verified_peer(&request);
        if let Some(id) = peer {
            request.extensions_mut().insert(VerifiedPeer(id));
        }
        match decide(request.uri().path(), peer, members.as_ref()) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(status) => {
                tracing::warn!(
                    path = request.uri().path(),
                    peer = ?peer,
                    code = ?status.code(),
                    "refused a node-service call"
                );
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{NodeCertSpec, init, issue};

    struct Only(Vec<NodeId>);
    impl MemberCheck for Only {
        fn admits(&self, id: NodeId) -> bool {
            self.0.contains(&id)
        }
    }

    #[test]
    fn node_names_parse_exactly() {
        assert_eq!(parse_node_name("node-3.cairn"), Some(3));
        assert_eq!(parse_node_name("node-03.cairn"), None);
        assert_eq!(parse_node_name("node-3.cairn.evil"), None);
        assert_eq!(parse_node_name("xnode-3.cairn"), None);
        assert_eq!(parse_node_name("node-.cairn"), None);
        assert_eq!(parse_node_name("node-+3.cairn"), None);
    }

    #[test]
    fn the_layer_guards_node_services_only() {
        let members = Only(vec![1, 2]);
        assert!(decide("/cairn.v1.Cairn/PutPack", None, &members).is_ok());
        let refused = decide("/cairn.v1.Shards/DeleteShard", None, &members).expect_err("no cert");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let refused = decide("/cairn.v1.Raft/Forward", Some(9), &members).expect_err("stranger");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(decide("/cairn.v1.Raft/AppendEntries", Some(2), &members).is_ok());
        assert!(decide("/cairn.v1.Raft/ClusterInfo", Some(9), &members).is_ok());
        assert_eq!(
            decide("/cairn.v1.Raft/ClusterInfo", None, &members)
                .expect_err("admission needs a cert")
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn start_refuses_a_certificate_for_another_node_or_ca() {
        let ca = init(10).expect("ca");
        let seven = issue(&ca, &NodeCertSpec::new(7, "r1", &["127.0.0.1"])).expect("cert");
        NodeTls::from_pems(
            7,
            ca.cert_pem.clone(),
            seven.cert_pem.clone(),
            seven.key_pem.clone(),
        )
        .expect("own cert");
        let err = NodeTls::from_pems(
            3,
            ca.cert_pem.clone(),
            seven.cert_pem.clone(),
            seven.key_pem.clone(),
        )
        .expect_err("another node's cert");
        assert!(err.to_string().contains("is for node 7"), "{err}");
        let other = init(10).expect("other ca");
        let err = NodeTls::from_pems(7, other.cert_pem, seven.cert_pem.clone(), seven.key_pem)
            .expect_err("foreign CA");
        assert!(matches!(err, TlsError::NotSignedByCa), "{err}");
        let three = issue(&ca, &NodeCertSpec::new(7, "r1", &["127.0.0.1"])).expect("cert");
        let err = NodeTls::from_pems(7, ca.cert_pem.clone(), seven.cert_pem, three.key_pem)
            .expect_err("key of another cert");
        assert!(matches!(err, TlsError::KeyMismatch), "{err}");
        let mut old = NodeCertSpec::new(7, "r1", &["127.0.0.1"]);
        old.not_before =
            Some(std::time::SystemTime::now() - std::time::Duration::from_secs(10 * 86_400));
        old.days = 2;
        let expired = issue(&ca, &old).expect("expired cert");
        let err = NodeTls::from_pems(7, ca.cert_pem, expired.cert_pem, expired.key_pem)
            .expect_err("expired");
        assert!(matches!(err, TlsError::Expired), "{err}");
    }

    #[test]
    fn expiry_reads_both_certificates_end_dates() {
        let ca = init(10).expect("ca");
        let mut spec = NodeCertSpec::new(7, "r1", &["127.0.0.1"]);
        spec.days = 3;
        let seven = issue(&ca, &spec).expect("cert");
        let tls = NodeTls::from_pems(7, ca.cert_pem, seven.cert_pem, seven.key_pem).expect("tls");
        let expiry = tls.expiry().expect("expiry");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let day = 86_400;
        assert!(
            (expiry.node_not_after_unix - (now + 3 * day)).abs() < day,
            "{expiry:?}"
        );
        assert!(
            (expiry.ca_not_after_unix - (now + 10 * day)).abs() < day,
            "{expiry:?}"
        );
    }
}
