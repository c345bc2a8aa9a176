//! TLS between the sites and the global controller, with mutual
//! authentication: every connection is made with a certificate issued by
//! the network's own certificate authority, and the peer's role comes from
//! its certificate, never from a field of a request.
//!
//! A certificate names its holder in a subject-alternative-name URI:
//! `snaps:site:CPH` for site CPH, `snaps:admin:NAME` for an administrator.
//! The global controller's certificate carries the host names and addresses
//! sites dial.
//!
//! A credential directory holds `ca.pem` (the network's CA certificate),
//! `cert.pem` and `key.pem`; [`issue_network`] and [`issue_site`] write
//! them, so an administrator needs no `openssl` command.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::crypto::ring;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// What went wrong reading, checking or issuing credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credential file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The certificates or keys do not make a working configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// A peer's certificate names no SNAPS role.
    #[error("certificate: {0}")]
    Identity(String),
}

/// Who holds a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A site, by its code.
    Site(String),
    /// An administrator, by name.
    Admin(String),
}

impl Peer {
    /// The URI naming this peer in its certificate.
    fn uri(&self) -> String {
        match self {
            Peer::Site(code) => format!("{SITE_URI}{code}"),
            Peer::Admin(name) => format!("{ADMIN_URI}{name}"),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Site(code) => write!(f, "site {code}"),
            Peer::Admin(name) => write!(f, "administrator {name}"),
        }
    }
}

const SITE_URI: &str = "snaps:site:";
const ADMIN_URI: &str = "snaps:admin:";

/// The three files of a credential directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The network's CA certificate, which the peer's must chain to.
    pub ca: PathBuf,
    /// This holder's certificate.
    pub cert: PathBuf,
    /// This holder's private key.
    pub key: PathBuf,
}

impl Credentials {
    /// `ca.pem`, `cert.pem` and `key.pem` in `dir`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Credentials {
        let dir = dir.as_ref();
        Credentials {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certificates(&self.ca)? {
            roots.add(cert).map_err(|e| TlsError::Pem {
                path: self.ca.clone(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
        Ok(Arc::new(roots))
    }

    fn chain_and_key(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let chain = certificates(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| pem_error(&self.key, e))?;
        Ok((chain, key))
    }

    /// This certificate and key cannot serve (a key of another certificate,
    /// say).
    fn pair_error(&self, e: rustls::Error) -> TlsError {
        TlsError::Config(format!(
            "{} and {}: {e}",
            self.cert.display(),
            self.key.display()
        ))
    }

    /// The server side: demands a client certificate issued by the CA and
    /// not in the revocation list at `revoked` (written by [`revoke`]; a
    /// missing file revokes nothing).
    pub fn server_config(
        &self,
        revoked: Option<&Path>,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(ring::default_provider());
        let mut builder =
            WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone());
        if let Some(path) = revoked.filter(|p| p.exists()) {
            let data = read_file(path)?;
            let crls = CertificateRevocationListDer::pem_slice_iter(&data)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error(path, e))?;
            builder = builder.with_crls(crls).only_check_end_entity_revocation();
        }
        let verifier = builder
            .build()
            .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
        let (chain, key) = self.chain_and_key()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| self.pair_error(e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The client side: trusts only the CA and presents this certificate.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = Arc::new(ring::default_provider());
        let (chain, key) = self.chain_and_key()?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)
            .map_err(|e| self.pair_error(e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A SQL client of a site's endpoint (or of any server with a
    /// certificate from the CA): trusts only the CA, presents nothing
    /// (the login is SCRAM's).
    pub fn sql_client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = Arc::new(ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// A client of a server whose certificate chains to the CA in `ca`
    /// (a PEM file, one or more certificates), presenting none: e.g. the
    /// global controller of its PostgreSQL store.
    pub fn trusting(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        Credentials {
            ca: ca.to_path_buf(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
        }
        .sql_client_config()
    }

    /// A site's SQL endpoint: presents this certificate and asks for none
    /// (SQL clients log in with SCRAM); ALPN `postgresql`, which clients
    /// opening TLS directly (PostgreSQL 17's `sslnegotiation=direct`) send.
    pub fn sql_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(ring::default_provider());
        let (chain, key) = self.chain_and_key()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| self.pair_error(e))?;
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Arc::new(config))
    }

    /// The holder named by this directory's certificate.
    pub fn peer(&self) -> Result<Peer, TlsError> {
        let chain = certificates(&self.cert)?;
        peer_of(&chain[0])
    }
}

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::Io(source) => TlsError::File {
            path: path.to_path_buf(),
            source,
        },
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Pem {
            path: path.to_path_buf(),
            what: "no PEM item of the expected kind".into(),
        },
        other => TlsError::Pem {
            path: path.to_path_buf(),
            what: other.to_string(),
        },
    }
}

/// A file's bytes, or an error naming it.
pub fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::File {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

/// The SNAPS role a (verified) certificate names.
pub fn peer_of(cert: &CertificateDer<'_>) -> Result<Peer, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::Identity(format!("cannot be parsed: {e}")))?;
    let names = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::Identity(format!("bad subject alternative names: {e}")))?;
    let mut found = Vec::new();
    for name in names.iter().flat_map(|n| n.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(code) = uri.strip_prefix(SITE_URI) {
                found.push(Peer::Site(code.to_string()));
            } else if let Some(name) = uri.strip_prefix(ADMIN_URI) {
                found.push(Peer::Admin(name.to_string()));
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(TlsError::Identity(
            "names no SNAPS site or administrator (no snaps:site: or snaps:admin: URI)".into(),
        )),
        _ => Err(TlsError::Identity("names more than one SNAPS role".into())),
    }
}

/// A certificate's serial number, without leading zero bytes (how the
/// revocation list and [`revoked_serials`] compare them).
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::Identity(format!("cannot be parsed: {e}")))?;
    Ok(trimmed(parsed.raw_serial()))
}

fn trimmed(serial: &[u8]) -> Vec<u8> {
    let start = serial.iter().position(|&b| b != 0).unwrap_or(serial.len());
    serial[start..].to_vec()
}

/// The serial numbers the revocation list at `path` names (none if there is
/// no file yet).
pub fn revoked_serials(path: &Path) -> Result<BTreeSet<Vec<u8>>, TlsError> {
    Ok(read_revocations(path)?.0.into_keys().collect())
}

/// The serials a revocation list names, with when each was revoked (Unix
/// seconds), and the list's number (0 without a file).
fn read_revocations(path: &Path) -> Result<(BTreeMap<Vec<u8>, i64>, u64), TlsError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((BTreeMap::new(), 0)),
        Err(source) => {
            return Err(TlsError::File {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut serials = BTreeMap::new();
    let mut number = 0;
    for der in CertificateRevocationListDer::pem_slice_iter(&data) {
        let der = der.map_err(|e| pem_error(path, e))?;
        let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: format!("not a certificate revocation list: {e}"),
        })?;
        for r in crl.iter_revoked_certificates() {
            serials.insert(trimmed(r.raw_serial()), r.revocation_date.timestamp());
        }
        if let Some(n) = crl.crl_number().and_then(|n| u64::try_from(n).ok()) {
            number = number.max(n);
        }
    }
    Ok((serials, number))
}

/// Who a revoked certificate belonged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The holder its certificate named.
    pub peer: Peer,
    /// Its serial number, in hex.
    pub serial: String,
}

/// Revokes the certificates of `holders` (credential directories, or
/// certificate files) with the CA in `dir`: adds them to the revocation
/// list `dir/revoked.pem` (made if missing, re-signed with a higher number
/// otherwise). The global controller refuses them from its next request on.
pub fn revoke(dir: &Path, holders: &[PathBuf]) -> Result<Vec<Revoked>, TlsError> {
    if holders.is_empty() {
        return Err(TlsError::Config(
            "name the certificates to revoke (a credential directory or a cert.pem)".into(),
        ));
    }
    let (_, issuer) = network_issuer(dir)?;
    let path = dir.join(REVOKED_FILE);
    let (mut serials, number) = read_revocations(&path)?;
    let mut out = Vec::new();
    for h in holders {
        let file = if h.is_dir() {
            Credentials::in_dir(h).cert
        } else {
            h.clone()
        };
        let cert = certificates(&file)?.remove(0);
        let peer = peer_of(&cert).map_err(|e| TlsError::Pem {
            path: file.clone(),
            what: e.to_string(),
        })?;
        let serial = serial_of(&cert)?;
        out.push(Revoked {
            peer,
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        });
        serials.entry(serial).or_insert(time_now().unix_timestamp());
    }
    let now = time_now();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: now + rcgen_duration(VALID_DAYS),
        crl_number: rcgen::SerialNumber::from(number + 1),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|(s, &at)| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(s),
                revocation_time: time::OffsetDateTime::from_unix_timestamp(at).unwrap_or(now),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer).map_err(rcgen_error)?;
    write(&path, &crl.pem().map_err(rcgen_error)?, false)?;
    Ok(out)
}

/// The revocation list's file name in the network's credential folder.
pub const REVOKED_FILE: &str = "revoked.pem";

/// How long issued certificates are valid, in days.
const VALID_DAYS: i64 = 825;

fn validity(params: &mut CertificateParams) {
    let now = time_now();
    params.not_before = now - rcgen_duration(1);
    params.not_after = now + rcgen_duration(VALID_DAYS);
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn rcgen_duration(days: i64) -> time::Duration {
    time::Duration::days(days)
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::File {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        use std::io::Write;
        let mut f = options.open(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    fs::rename(&tmp, path).map_err(err)
}

fn rcgen_error(e: rcgen::Error) -> TlsError {
    TlsError::Config(format!("issuing a certificate: {e}"))
}

/// What [`issue_network`] wrote.
#[derive(Debug, Clone)]
pub struct Network {
    /// The CA certificate (give it to every holder).
    pub ca: PathBuf,
    /// The CA's private key (keep it off the network's machines).
    pub ca_key: PathBuf,
    /// The global controller's credential directory.
    pub global: PathBuf,
    /// The administrator's credential directory.
    pub admin: PathBuf,
}

/// Creates the network's CA in `dir` (`ca.pem`, `ca-key.pem`), the global
/// controller's credentials for `hosts` in `dir/global` and an
/// administrator's in `dir/admin`. Refuses to overwrite an existing CA:
/// certificates already issued would stop working.
pub fn issue_network(dir: &Path, network: &str, hosts: &[String]) -> Result<Network, TlsError> {
    let ca_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca-key.pem");
    if ca_path.exists() || ca_key_path.exists() {
        return Err(TlsError::Config(format!(
            "{} already holds a network CA: certificates it issued would stop working if it \
             were replaced (remove the directory to start a new network)",
            dir.display()
        )));
    }
    if hosts.is_empty() {
        return Err(TlsError::Config(
            "the global controller's certificate needs at least one host name or address".into(),
        ));
    }
    check_hosts(hosts)?;
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("SNAPS network CA {network}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params);
    let ca = params.self_signed(&key).map_err(rcgen_error)?;
    write(&ca_key_path, &key.serialize_pem(), true)?;
    write(&ca_path, &ca.pem(), false)?;
    let issuer = Issuer::new(params, key);

    let global = dir.join("global");
    let mut server = CertificateParams::new(hosts.to_vec())
        .map_err(|e| TlsError::Config(format!("host names {hosts:?}: {e}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("SNAPS global controller {network}"),
    );
    server.distinguished_name = dn;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf(&global, &ca_path, server, &issuer)?;

    let admin = dir.join("admin");
    issue_peer(dir, &Peer::Admin("admin".into()), &admin)?;
    Ok(Network {
        ca: ca_path,
        ca_key: ca_key_path,
        global,
        admin,
    })
}

/// Issues site `code`'s credentials into `dir/CODE` with the CA in `dir`.
pub fn issue_site(dir: &Path, code: &str) -> Result<PathBuf, TlsError> {
    check_code(code)?;
    let out = dir.join(code);
    issue_peer(dir, &Peer::Site(code.to_string()), &out)?;
    Ok(out)
}

/// Issues the server certificate of site `code`'s SQL endpoint, for the
/// host names and addresses its clients connect to, into `dir/CODE-sql`
/// with the CA in `dir`. Clients that check it (`sslmode=verify-full`) are
/// given the network's `ca.pem`.
pub fn issue_sql(dir: &Path, code: &str, hosts: &[String]) -> Result<PathBuf, TlsError> {
    check_code(code)?;
    if hosts.is_empty() {
        return Err(TlsError::Config(format!(
            "the SQL endpoint of {code} needs at least one host name or address"
        )));
    }
    check_hosts(hosts)?;
    let (ca_path, issuer) = network_issuer(dir)?;
    let mut params = CertificateParams::new(hosts.to_vec())
        .map_err(|e| TlsError::Config(format!("host names {hosts:?}: {e}")))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("SNAPS SQL endpoint {code}"));
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let out = dir.join(format!("{code}-sql"));
    leaf(&out, &ca_path, params, &issuer)?;
    Ok(out)
}

/// Host names a server certificate is for: IP addresses or DNS names
/// (letters, digits and `-` in dot-separated labels), so a typo is named now
/// rather than found when no client can verify the server.
fn check_hosts(hosts: &[String]) -> Result<(), TlsError> {
    for host in hosts {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        if host.parse::<std::net::IpAddr>().is_err() && !host.split('.').all(label_ok) {
            return Err(TlsError::Config(format!(
                "host {host:?}: not an IP address or a DNS name"
            )));
        }
    }
    Ok(())
}

fn check_code(code: &str) -> Result<(), TlsError> {
    if code.is_empty() || !code.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(TlsError::Config(format!(
            "site code {code:?}: letters, digits and _ only"
        )));
    }
    Ok(())
}

/// The CA in `dir` (`ca.pem`, `ca-key.pem`), ready to sign.
fn network_issuer(dir: &Path) -> Result<(PathBuf, Issuer<'static, KeyPair>), TlsError> {
    let ca_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca-key.pem");
    let read = |p: &Path| {
        fs::read_to_string(p).map_err(|source| TlsError::File {
            path: p.to_path_buf(),
            source,
        })
    };
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?).map_err(|e| TlsError::Pem {
        path: ca_key_path.clone(),
        what: format!("not the CA's private key: {e}"),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_path)?, ca_key).map_err(|e| TlsError::Pem {
        path: ca_path.clone(),
        what: format!("not a CA certificate: {e}"),
    })?;
    Ok((ca_path, issuer))
}

/// Issues `peer`'s client certificate into `out`, signed by the CA in `dir`.
pub fn issue_peer(dir: &Path, peer: &Peer, out: &Path) -> Result<(), TlsError> {
    let (ca_path, issuer) = network_issuer(dir)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, peer.to_string());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        peer.uri()
            .try_into()
            .map_err(|e| TlsError::Config(format!("{peer}: {e}")))?,
    )];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf(out, &ca_path, params, &issuer)
}

fn leaf(
    out: &Path,
    ca: &Path,
    mut params: CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(), TlsError> {
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    validity(&mut params);
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let cert = params.signed_by(&key, issuer).map_err(rcgen_error)?;
    let creds = Credentials::in_dir(out);
    let ca_text = fs::read_to_string(ca).map_err(|source| TlsError::File {
        path: ca.to_path_buf(),
        source,
    })?;
    write(&creds.key, &key.serialize_pem(), true)?;
    write(&creds.cert, &cert.pem(), false)?;
    write(&creds.ca, &ca_text, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_certificates_are_for_ip_addresses_and_dns_names_only() {
        let ok = |h: &str| check_hosts(&[h.to_string()]).is_ok();
        for good in [
            "localhost",
            "radiology-db.cph.example.org",
            "10.0.0.7",
            "::1",
        ] {
            assert!(ok(good), "{good}");
        }
        for bad in [
            "",
            "not a host!",
            "-cph.example.org",
            "cph..example.org",
            "cph_db",
        ] {
            let e = check_hosts(&[bad.to_string()]).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn issued_certificates_name_their_holder() {
        let dir = std::env::temp_dir().join(format!("snaps-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let net = issue_network(&dir, "test", &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let site = issue_site(&dir, "CPH").unwrap();
        assert_eq!(
            Credentials::in_dir(&site).peer().unwrap(),
            Peer::Site("CPH".into())
        );
        assert_eq!(
            Credentials::in_dir(&net.admin).peer().unwrap(),
            Peer::Admin("admin".into())
        );
        assert!(matches!(
            Credentials::in_dir(&net.global).peer(),
            Err(TlsError::Identity(_))
        ));
        Credentials::in_dir(&net.global)
            .server_config(None)
            .unwrap();
        Credentials::in_dir(&site).client_config().unwrap();
        // A second init would orphan every certificate issued.
        assert!(issue_network(&dir, "test", &["localhost".into()]).is_err());
        assert!(issue_site(&dir, "C/PH").is_err());

        // Revocation: by credential directory or certificate file, kept
        // across re-signings, read back by serial; the controller's
        // configuration still builds with the list.
        let list = dir.join(REVOKED_FILE);
        assert!(revoked_serials(&list).unwrap().is_empty());
        let cph = certificates(&Credentials::in_dir(&site).cert)
            .unwrap()
            .remove(0);
        let r = revoke(&dir, std::slice::from_ref(&site)).unwrap();
        assert_eq!(r[0].peer, Peer::Site("CPH".into()));
        let admin_cert = Credentials::in_dir(&net.admin).cert;
        revoke(&dir, std::slice::from_ref(&admin_cert)).unwrap();
        let serials = revoked_serials(&list).unwrap();
        assert_eq!(serials.len(), 2);
        assert!(serials.contains(&serial_of(&cph).unwrap()));
        let (_, number) = read_revocations(&list).unwrap();
        assert_eq!(number, 2, "each signing numbers the list anew");
        Credentials::in_dir(&net.global)
            .server_config(Some(&list))
            .unwrap();
        assert!(revoke(&dir, &[]).is_err());
        let e = revoke(&dir, &[dir.join("nowhere.pem")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nowhere.pem"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
