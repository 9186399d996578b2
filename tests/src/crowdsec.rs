//! A private CrowdSec Local API for a test: Debian's `crowdsec` run as LAPI only (`-no-cs`,
//! no Central API, its database and config in a temporary directory), inside the test's
//! network namespace on 127.0.0.1:8080, with a bouncer key for the agent and a machine for
//! `cscli decisions`. See ../shared/crowdsec.md. Stopped and removed on drop.
//!
//! [`Lapi::start_tls`] serves it over https, as operators with bouncers on other hosts do:
//! its certificate from a CA of the test's, bouncers known by a client certificate whose OU
//! is [`BOUNCER_OU`] (LAPI's `bouncers_allowed_ou`).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Netns, sync_harness::TempDir};

/// The bouncer key the agent is given (`cscli bouncers add -k`).
pub const BOUNCER_KEY: &str = "0123456789abcdef0123456789abcdef";
/// The machine the agent posts its alerts as (`cscli machines add`), also cscli's own.
pub const MACHINE: &str = "apiban-test";
const MACHINE_PASSWORD: &str = "apiban-test-password";
const LISTEN: &str = "127.0.0.1:8080";
/// The OU LAPI takes a bouncer's client certificate from.
pub const BOUNCER_OU: &str = "apiban-bouncers";

pub struct Lapi {
    ns: String,
    dir: TempDir,
    child: Option<Child>,
    tls: bool,
}

/// A certificate and its key, PEM, issued by `ca` (or self-signed for the CA itself).
fn issue(
    ca: Option<&rcgen::Issuer<'_, rcgen::KeyPair>>,
    ou: Option<&str>,
    ip_san: bool,
    client: bool,
) -> (rcgen::CertificateParams, rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().expect("a key");
    let mut params = if ip_san {
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params")
    } else {
        rcgen::CertificateParams::new(Vec::<String>::new()).expect("params")
    };
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "apiban-test");
    if let Some(ou) = ou {
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, ou);
    }
    if client {
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    }
    let cert = match ca {
        Some(ca) => params.signed_by(&key, ca).expect("a certificate"),
        None => {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.self_signed(&key).expect("a CA")
        }
    };
    (params, key, cert.pem())
}

impl Lapi {
    /// Configures a LAPI in `ns` with a bouncer and a machine, and starts it.
    pub fn start(ns: &Netns) -> Self {
        Self::start_with(ns, false)
    }

    /// The same over https: `ca.pem` signed LAPI's certificate and two bouncer
    /// certificates, `bouncer.pem` (OU [`BOUNCER_OU`]) and `stranger.pem` (another OU);
    /// their keys are `bouncer-key.pem` and `stranger-key.pem`. See [`Lapi::file`].
    pub fn start_tls(ns: &Netns) -> Self {
        Self::start_with(ns, true)
    }

    /// A file of this LAPI's (certificates, keys).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path.join(name)
    }

    fn start_with(ns: &Netns, tls: bool) -> Self {
        assert!(
            std::path::Path::new("/usr/bin/crowdsec").exists(),
            "Debian's crowdsec is not installed: `cargo xtask setup` installs it (offline, \
             without its Central API registration)"
        );
        let dir = TempDir::new("apiban-crowdsec-");
        let d = dir.path.display().to_string();
        std::fs::create_dir_all(dir.path.join("data")).expect("LAPI data dir");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path.join(name), text).unwrap_or_else(|e| panic!("{name}: {e}"));
        };
        let tls_config = if tls {
            let (ca_params, ca_key, ca_pem) = issue(None, None, false, false);
            let ca = rcgen::Issuer::new(ca_params, ca_key);
            write("ca.pem", &ca_pem);
            let (_, key, pem) = issue(Some(&ca), None, true, false);
            write("server.pem", &pem);
            write("server-key.pem", &key.serialize_pem());
            for (name, ou) in [("bouncer", BOUNCER_OU), ("stranger", "someone-else")] {
                let (_, key, pem) = issue(Some(&ca), Some(ou), false, true);
                write(&format!("{name}.pem"), &pem);
                write(&format!("{name}-key.pem"), &key.serialize_pem());
            }
            format!(
                "    tls:\n      cert_file: {d}/server.pem\n      key_file: {d}/server-key.pem\n      \
                 ca_cert_path: {d}/ca.pem\n      client_verification: VerifyClientCertIfGiven\n      \
                 bouncers_allowed_ou: [{BOUNCER_OU}]\n      agents_allowed_ou: [apiban-agents]\n"
            )
        } else {
            String::new()
        };
        write(
            "config.yaml",
            &format!(
                "common: {{daemonize: true, log_media: stdout, log_level: info}}\n\
                 config_paths: {{config_dir: {d}/, data_dir: {d}/data/}}\n\
                 db_config: {{type: sqlite, db_path: {d}/data/crowdsec.db, use_wal: true}}\n\
                 api:\n  client: {{credentials_path: {d}/local_api_credentials.yaml}}\n  \
                 server:\n    listen_uri: {LISTEN}\n    profiles_path: {d}/profiles.yaml\n    \
                 console_path: {d}/console.yaml\n    trusted_ips: [127.0.0.1, \"::1\"]\n\
                 {tls_config}prometheus: {{enabled: false}}\n"
            ),
        );
        std::fs::write(
            dir.path.join("profiles.yaml"),
            "name: default_ip_remediation\nfilters:\n - Alert.Remediation == true && \
             Alert.GetScope() == \"Ip\"\ndecisions:\n - type: ban\n   duration: 4h\n\
             on_success: break\n",
        )
        .expect("LAPI profiles");
        std::fs::write(dir.path.join("bouncer.key"), format!("{BOUNCER_KEY}\n"))
            .expect("bouncer key file");
        std::fs::write(
            dir.path.join("machine.password"),
            format!("{MACHINE_PASSWORD}\n"),
        )
        .expect("machine password file");
        let mut lapi = Self {
            ns: ns.name.clone(),
            dir,
            child: None,
            tls,
        };
        // Bouncers and machines are written to the database directly: LAPI need not run.
        lapi.cscli(&["bouncers", "add", "apiban", "-k", BOUNCER_KEY, "-o", "raw"]);
        let credentials = lapi.dir.path.join("local_api_credentials.yaml");
        lapi.cscli(&[
            "machines",
            "add",
            MACHINE,
            "-p",
            MACHINE_PASSWORD,
            "-f",
            &credentials.display().to_string(),
        ]);
        if tls {
            // cscli reaches LAPI at the URL the credentials name.
            let text = std::fs::read_to_string(&credentials).expect("cscli's credentials");
            std::fs::write(&credentials, text.replace("http://", "https://"))
                .expect("cscli's credentials");
        }
        lapi.run();
        lapi
    }

    /// The URL the agent is given.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{LISTEN}")
    }

    /// The agent's flags to read this LAPI as a bouncer: its key, or over https its
    /// client certificate (OU [`BOUNCER_OU`]) and the CA.
    pub fn agent_args(&self) -> Vec<String> {
        let mut args = vec!["--crowdsec".to_owned(), self.url()];
        let path = |name: &str| self.file(name).display().to_string();
        if self.tls {
            for (flag, name) in [
                ("--crowdsec-cert", "bouncer.pem"),
                ("--crowdsec-cert-key", "bouncer-key.pem"),
                ("--crowdsec-ca", "ca.pem"),
            ] {
                args.extend([flag.to_owned(), path(name)]);
            }
        } else {
            args.extend(["--crowdsec-key-file".to_owned(), path("bouncer.key")]);
        }
        args
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path.join("bouncer.key")
    }

    /// The file holding [`MACHINE`]'s password.
    pub fn password_file(&self) -> PathBuf {
        self.dir.path.join("machine.password")
    }

    /// `cscli` against this LAPI; its output. Panics if it fails.
    pub fn cscli(&self, args: &[&str]) -> String {
        let config = self.dir.path.join("config.yaml").display().to_string();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "cscli", "-c", &config, "--error"])
            .args(args)
            // Go's TLS trusts what this file holds: over https, the test's CA.
            .env("SSL_CERT_FILE", self.dir.path.join("ca.pem"))
            .output()
            .expect("run cscli");
        assert!(
            out.status.success(),
            "cscli {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts LAPI (again) and waits until /health answers.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "LAPI is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path.join("lapi.log"))
            .expect("LAPI log");
        let config = self.dir.path.join("config.yaml").display().to_string();
        // `ip netns exec` execs crowdsec: the child is LAPI itself.
        let child = Command::new("ip")
            .args([
                "netns", "exec", &self.ns, "crowdsec", "-c", &config, "-no-cs",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start crowdsec");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.healthy() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "LAPI did not answer within 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `GET /health` answers 200, from inside the namespace; over https, whether
    /// LAPI listens (it opens its socket once it serves).
    fn healthy(&self) -> bool {
        let path = std::path::Path::new("/run/netns").join(&self.ns);
        let tls = self.tls;
        crate::spawn_in_netns_at(path, move || {
            if tls {
                return std::net::TcpStream::connect(LISTEN).is_ok();
            }
            use std::io::{Read as _, Write as _};
            let Ok(mut s) = std::net::TcpStream::connect(LISTEN) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let request = format!("GET /health HTTP/1.0\r\nHost: {LISTEN}\r\n\r\n");
            let mut answer = String::new();
            let exchanged =
                s.write_all(request.as_bytes()).is_ok() && s.read_to_string(&mut answer).is_ok();
            exchanged && (answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"))
        })
        .join()
        .unwrap_or(false)
    }

    /// Stops LAPI (SIGTERM, as systemd would); its database stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill takes a pid and a signal number.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("lapi.log")).unwrap_or_default()
    }
}

impl Drop for Lapi {
    fn drop(&mut self) {
        self.stop();
    }
}
