//! A throwaway certificate authority for the TLS tests: a CA and a server certificate
//! for `127.0.0.1` and `localhost`, as PEM files in a temporary directory.

use std::path::PathBuf;

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// The CA (`ca`) and a server certificate (`cert`, `key`) it signed.
pub struct TestCa {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new() -> anyhow::Result<TestCa> {
        let dir = tempfile::tempdir()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "switchboard test CA");
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "switchboard test server");
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let write = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        Ok(TestCa {
            ca: write("ca.pem", ca_cert.pem())?,
            cert: write("server.pem", cert.pem())?,
            key: write("server-key.pem", key.serialize_pem())?,
            _dir: dir,
        })
    }
}
