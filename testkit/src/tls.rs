//! Test certificates, made with `rcgen` in a temp dir: a CA, a server certificate for the names
//! a test connects by, and a client certificate for mutual TLS, each written as PEM for
//! `redis-server --tls-*` and for the relay's `--tls-ca`, `--tls-cert`, `--tls-key`.
//!
//! ```no_run
//! let ca = testkit::tls::TestCa::new("krowoc test CA");
//! let server = ca.issue_server(&["localhost", "127.0.0.1"]);
//! let redis = testkit::RedisServer::start_tls(&ca, &server, false);
//! assert!(redis.tls_url().starts_with("rediss://"));
//! ```

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA whose certificate is `ca.pem` in its own temp dir; it issues server and client
/// certificates into the same dir.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
    name: String,
    issued: std::cell::Cell<u32>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        TestCa::with_dir(
            name,
            tempfile::tempdir().expect("temp dir for certificates"),
        )
    }

    /// Like [`TestCa::new`], its dir under `parent` (the demo keeps its certificates under
    /// `target/demo/`); removed on drop too.
    pub fn new_in(name: &str, parent: &Path) -> std::io::Result<TestCa> {
        let dir = tempfile::Builder::new().prefix("tls-").tempdir_in(parent)?;
        Ok(TestCa::with_dir(name, dir))
    }

    fn with_dir(name: &str, dir: tempfile::TempDir) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).expect("write ca.pem");
        TestCa {
            issuer,
            dir,
            name: name.to_string(),
            issued: std::cell::Cell::new(0),
        }
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate valid for `names` (DNS names, or IP addresses such as `127.0.0.1`).
    pub fn issue_server(&self, names: &[&str]) -> CertFiles {
        self.issue(names, &[ExtendedKeyUsagePurpose::ServerAuth], "server")
    }

    /// A certificate for both ends of a connection between servers: a Redis Cluster's bus
    /// over TLS, where each node shows its certificate as a client to the others.
    pub fn issue_peer(&self, names: &[&str]) -> CertFiles {
        self.issue(
            names,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            "peer",
        )
    }

    /// A client certificate for mutual TLS.
    pub fn issue_client(&self, name: &str) -> CertFiles {
        self.issue(&[name], &[ExtendedKeyUsagePurpose::ClientAuth], "client")
    }

    fn issue(&self, names: &[&str], usage: &[ExtendedKeyUsagePurpose], what: &str) -> CertFiles {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("certificate params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = usage.to_vec();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("{} cannot sign a {what} certificate: {e}", self.name));
        let n = self.issued.get() + 1;
        self.issued.set(n);
        let files = CertFiles {
            cert: self.dir.path().join(format!("{what}-{n}.pem")),
            key: self.dir.path().join(format!("{what}-{n}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}
