//! The cluster's certificate authority: `cairn-node ca init` and
//! `cairn-node ca issue`, and the same as library functions so in-process
//! clusters (demo, bench, tests) make their certificates without a shell.
//!
//! A node certificate binds the node id: its DNS names include
//! [`node_server_name`] (`node-<id>.cairn`), which peers dial as the TLS
//! server name and which the server reads back from a client certificate
//! (`tls::peer_node_id`). Both EKUs (server and client auth) are set, since
//! a node is a server to its peers and a client of them.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_proto::transport::node_server_name;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::model::NodeId;

/// File names inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
/// How long a CA is valid when not told: ten years.
pub const CA_DAYS_DEFAULT: u32 = 3650;
/// How long a node certificate is valid when not told: about two years.
pub const NODE_DAYS_DEFAULT: u32 = 825;

/// A node certificate file name: `node-<id>.pem`.
pub fn node_cert_file(id: NodeId) -> String {
    format!("node-{id}.pem")
}

/// A node key file name: `node-<id>.key`.
pub fn node_key_file(id: NodeId) -> String {
    format!("node-{id}.key")
}

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{name} already exists in the output directory; refusing to overwrite it")]
    Exists { name: String },
    #[error("cannot write {name}: {source}")]
    Write {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot read {name} from the CA directory: {source}")]
    Read {
        name: String,
        source: std::io::Error,
    },
    #[error("the CA directory does not hold a usable CA ({what})")]
    BadCa { what: &'static str },
    #[error("--host: give at least one host name or IP address")]
    NoHost,
    #[error("host {host:?} is not a valid DNS name or IP address")]
    BadHost { host: String },
    #[error("host {host:?} is another node's name; a node certificate names one node")]
    OtherNodeName { host: String },
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Pems {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Pems {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pems").finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, not_before: time::OffsetDateTime, days: u32) {
    params.not_before = not_before;
    params.not_after = not_before + Duration::from_secs(u64::from(days) * 86_400);
}

fn now() -> time::OffsetDateTime {
    // An hour of slack for clocks slightly behind the issuer's.
    time::OffsetDateTime::now_utc() - Duration::from_secs(3600)
}

/// A new self-signed cluster CA valid for `days`.
pub fn init(days: u32) -> Result<Pems, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "Cairn cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, now(), days);
    let key = KeyPair::generate()?;
    let ca = CertifiedIssuer::self_signed(params, key)?;
    Ok(Pems {
        cert_pem: ca.pem(),
        key_pem: ca.key().serialize_pem(),
    })
}

/// What a node certificate says.
#[derive(Debug, Clone)]
pub struct NodeCertSpec {
    pub node_id: NodeId,
    pub region: String,
    /// Host names and IP addresses the node is reached at (IPs become IP SANs).
    pub hosts: Vec<String>,
    pub days: u32,
    /// Start of validity; `None` is now. Tests back-date it to make an
    /// expired certificate.
    pub not_before: Option<std::time::SystemTime>,
}

impl NodeCertSpec {
    pub fn new(node_id: NodeId, region: &str, hosts: &[&str]) -> Self {
        Self {
            node_id,
            region: region.to_string(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            days: NODE_DAYS_DEFAULT,
            not_before: None,
        }
    }
}

/// A node certificate signed by the CA (`ca` as [`init`] made it).
pub fn issue(ca: &Pems, spec: &NodeCertSpec) -> Result<Pems, CaError> {
    let hosts: Vec<String> = spec
        .hosts
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        return Err(CaError::NoHost);
    }
    // A certificate naming two nodes would prove neither.
    if let Some(host) = hosts
        .iter()
        .find(|h| crate::tls::parse_node_name(h).is_some_and(|other| other != spec.node_id))
    {
        return Err(CaError::OtherNodeName { host: host.clone() });
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|_| CaError::BadCa {
        what: "ca.key is not a PEM private key",
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(|_| CaError::BadCa {
        what: "ca.pem is not a PEM certificate",
    })?;
    let mut names = hosts.clone();
    let own = node_server_name(spec.node_id);
    if !names.contains(&own) {
        names.push(own.clone());
    }
    let mut params = CertificateParams::new(names).map_err(|_| CaError::BadHost {
        host: hosts.join(","),
    })?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, own);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, spec.region.clone());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let not_before = spec
        .not_before
        .map(time::OffsetDateTime::from)
        .unwrap_or_else(now);
    validity(&mut params, not_before, spec.days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pems {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes a new file readable by its owner only; never replaces one.
fn write_new(dir: &Path, name: &str, text: &str, private: bool) -> Result<(), CaError> {
    let path = dir.join(name);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CaError::Exists {
                name: name.to_string(),
            }
        } else {
            CaError::Write {
                name: name.to_string(),
                source,
            }
        }
    })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| CaError::Write {
            name: name.to_string(),
            source,
        })
}

fn refuse_existing(dir: &Path, names: &[&str]) -> Result<(), CaError> {
    for name in names {
        if dir.join(name).exists() {
            return Err(CaError::Exists {
                name: name.to_string(),
            });
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
        name: "the output directory".into(),
        source,
    })
}

/// `cairn-node ca init --out DIR`: writes `ca.pem` and `ca.key` (0600).
pub fn init_dir(out: &Path, days: u32) -> Result<Pems, CaError> {
    create_dir(out)?;
    refuse_existing(out, &[CA_CERT_FILE, CA_KEY_FILE])?;
    let ca = init(days)?;
    write_new(out, CA_KEY_FILE, &ca.key_pem, true)?;
    write_new(out, CA_CERT_FILE, &ca.cert_pem, false)?;
    Ok(ca)
}

/// Reads the CA that [`init_dir`] wrote.
pub fn load_dir(ca_dir: &Path) -> Result<Pems, CaError> {
    let read = |name: &str| {
        std::fs::read_to_string(ca_dir.join(name)).map_err(|source| CaError::Read {
            name: name.to_string(),
            source,
        })
    };
    Ok(Pems {
        cert_pem: read(CA_CERT_FILE)?,
        key_pem: read(CA_KEY_FILE)?,
    })
}

/// `cairn-node ca issue`: writes `node-<id>.pem` and `node-<id>.key` (0600)
/// into `out`; returns their paths.
pub fn issue_dir(
    ca_dir: &Path,
    spec: &NodeCertSpec,
    out: &Path,
) -> Result<(PathBuf, PathBuf), CaError> {
    let ca = load_dir(ca_dir)?;
    let cert_name = node_cert_file(spec.node_id);
    let key_name = node_key_file(spec.node_id);
    create_dir(out)?;
    refuse_existing(out, &[&cert_name, &key_name])?;
    let pems = issue(&ca, spec)?;
    write_new(out, &key_name, &pems.key_pem, true)?;
    write_new(out, &cert_name, &pems.cert_pem, false)?;
    Ok((out.join(cert_name), out.join(key_name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_node_and_hosts() {
        let ca = init(30).expect("ca");
        let node = issue(
            &ca,
            &NodeCertSpec::new(7, "r2", &["10.0.0.7", "n7.example"]),
        )
        .expect("node cert");
        let id = crate::tls::cert_node_id_pem(&node.cert_pem).expect("one node name");
        assert_eq!(id, 7);
        crate::tls::check_chain_pem(&ca.cert_pem, &node.cert_pem).expect("signed by the CA");
        let other = init(30).expect("other ca");
        assert!(crate::tls::check_chain_pem(&other.cert_pem, &node.cert_pem).is_err());
    }

    #[test]
    fn files_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        init_dir(dir.path(), 10).expect("init");
        let err = init_dir(dir.path(), 10).expect_err("second init");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        let (cert, key) = issue_dir(
            dir.path(),
            &NodeCertSpec::new(3, "r1", &["127.0.0.1"]),
            &dir.path().join("n3"),
        )
        .expect("issue");
        assert!(cert.ends_with("node-3.pem"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for path in [key, dir.path().join(CA_KEY_FILE)] {
                let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", path.display());
            }
        }
        assert!(
            issue_dir(
                dir.path(),
                &NodeCertSpec::new(3, "r1", &["127.0.0.1"]),
                &dir.path().join("n3"),
            )
            .is_err()
        );
        let err = issue(
            &load_dir(dir.path()).expect("load"),
            &NodeCertSpec::new(4, "r1", &[]),
        )
        .expect_err("no host");
        assert!(matches!(err, CaError::NoHost));
        let err = issue(
            &load_dir(dir.path()).expect("load"),
            &NodeCertSpec::new(4, "r1", &["node-5.cairn"]),
        )
        .expect_err("another node's name");
        assert!(matches!(err, CaError::OtherNodeName { .. }), "{err}");
    }
}
