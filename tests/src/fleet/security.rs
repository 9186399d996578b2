//! TLS material and a password for a fleet whose etcd wants both (`Fleet::secured`).

use std::{net::Ipv4Addr, path::PathBuf};

use crate::unique_name;

/// Files for a fleet whose etcd wants TLS, a client certificate and a user with a password.
pub struct Security {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub password_file: PathBuf,
    pub password: String,
}

impl Security {
    pub(super) fn new(dir: &std::path::Path, nodes: usize) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "apiban fleet test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().expect("server key");
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        server
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("literal")));
        for i in 0..nodes {
            server
                .subject_alt_names
                .push(SanType::IpAddress(Ipv4Addr::new(10, 88, i as u8, 1).into()));
        }
        let server_cert = server.signed_by(&server_key, &issuer).expect("server cert");
        let client_key = KeyPair::generate().expect("client key");
        let mut client = CertificateParams::new(Vec::<String>::new()).expect("params");
        client
            .distinguished_name
            .push(rcgen::DnType::CommonName, "apiban");
        let client_cert = client.signed_by(&client_key, &issuer).expect("client cert");
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write a TLS file");
            path
        };
        let password = unique_name("pw");
        Self {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server-key.pem", server_key.serialize_pem()),
            client_cert: write("client.pem", client_cert.pem()),
            client_key: write("client-key.pem", client_key.serialize_pem()),
            password_file: write("etcd-password", format!("{password}\n")),
            password,
        }
    }

    /// `apiban run` flags for TLS and the password.
    pub(super) fn args(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.display().to_string();
        vec![
            "--cluster-ca".into(),
            path(&self.ca),
            "--cluster-cert".into(),
            path(&self.client_cert),
            "--cluster-key".into(),
            path(&self.client_key),
            "--cluster-user".into(),
            "root".into(),
            "--cluster-password-file".into(),
            path(&self.password_file),
        ]
    }
}
