//! Kamailio from Debian as the registrar in front of the detection tests' attackers and
//! customers: digest authentication (`pv_www_authenticate`) against the office's password
//! (`crowd::PASSWORD`) for the users 200-299 (`crowd::phone_users`), others answered 404, bindings in memory (no database), on UDP and TCP on
//! one port and TLS on another. A SIP client over TLS that talks to it (SIPp here is built
//! without TLS) is here too.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_rustls::rustls::{
    self, ClientConfig, ClientConnection, RootCertStore, StreamOwned, pki_types::ServerName,
};

use crate::{Netns, attackers::Tool, crowd::PASSWORD, in_netns};

/// The name in the TLS certificate.
const TLS_NAME: &str = "sip.test";

fn binary() -> PathBuf {
    let bin = PathBuf::from("/usr/sbin/kamailio");
    assert!(
        bin.exists()
            && Path::new("/usr/lib/x86_64-linux-gnu/kamailio/modules/tls.so").exists()
            && Path::new("/usr/lib/x86_64-linux-gnu/kamailio/modules/registrar.so").exists(),
        "Kamailio is missing: `cargo xtask test` installs it (Debian: apt-get install kamailio \
         kamailio-tls-modules)"
    );
    bin
}

fn config(ip: IpAddr, port: u16, tls_port: u16, dir: &Path) -> String {
    let dir = dir.display();
    format!(
        r#"#!KAMAILIO
debug=2
log_stderror=yes
children=2
tcp_children=2
enable_tls=yes
listen=udp:{ip}:{port}
listen=tcp:{ip}:{port}
listen=tls:{ip}:{tls_port}
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "kex.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "xlog.so"
loadmodule "textops.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
loadmodule "tls.so"
modparam("tls", "config", "{dir}/kamailio-tls.cfg")

request_route {{
    if (is_method("OPTIONS")) {{
        sl_send_reply("200", "OK");
        exit;
    }}
    if (!is_method("REGISTER")) {{
        sl_send_reply("405", "Method Not Allowed");
        exit;
    }}
    if (!($tU =~ "^2[0-9][0-9]$")) {{
        sl_send_reply("404", "Not Found");
        exit;
    }}
    if (!pv_www_authenticate("$td", "{PASSWORD}", "0")) {{
        www_challenge("$td", "0");
        exit;
    }}
    save("location");
    exit;
}}
"#
    )
}

/// A running Kamailio; killed when dropped.
pub struct Registrar {
    pub tool: Tool,
    /// UDP and TCP.
    pub addr: SocketAddr,
    pub tls: SocketAddr,
    /// What TLS clients are to trust.
    pub cert: rustls::pki_types::CertificateDer<'static>,
}

impl Registrar {
    /// Starts Kamailio in `ns` on `ip`, its files in `dir`, and waits until it answers over
    /// UDP (from `probe`, an address in `probe_ns`).
    pub fn start(
        ns: &Netns,
        dir: &Path,
        ip: IpAddr,
        port: u16,
        tls_port: u16,
        probe_ns: &Netns,
        probe: IpAddr,
    ) -> Self {
        let bin = binary();
        let key = rcgen::KeyPair::generate().expect("a key");
        let params = rcgen::CertificateParams::new(vec![TLS_NAME.to_owned()]).expect("params");
        let cert = params.self_signed(&key).expect("a certificate");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("write {name}: {e}"));
        };
        write("kamailio-cert.pem", &cert.pem());
        write("kamailio-key.pem", &key.serialize_pem());
        write(
            "kamailio-tls.cfg",
            &format!(
                "[server:default]\nmethod = TLSv1.2+\nverify_certificate = no\n\
                 require_certificate = no\nprivate_key = {d}/kamailio-key.pem\n\
                 certificate = {d}/kamailio-cert.pem\n\n[client:default]\n\
                 verify_certificate = no\nrequire_certificate = no\n",
                d = dir.display()
            ),
        );
        write("kamailio.cfg", &config(ip, port, tls_port, dir));
        let cfg = dir.join("kamailio.cfg").display().to_string();
        let mut check = Tool::start(
            ns,
            &bin,
            &["-c", "-f", &cfg],
            dir.join("kamailio-check.log"),
        );
        assert_eq!(
            check.wait(Duration::from_secs(10)),
            Some(0),
            "kamailio -c rejects the config:\n{}",
            check.output()
        );
        let mut tool = Tool::start(
            ns,
            &bin,
            &["-DD", "-E", "-f", &cfg],
            dir.join("kamailio.log"),
        );
        let addr = SocketAddr::new(ip, port);
        let started = Instant::now();
        while !answers_options(probe_ns, probe, addr) {
            assert!(
                tool.running() && started.elapsed() < Duration::from_secs(20),
                "Kamailio does not answer:\n{}",
                tool.output()
            );
        }
        Self {
            tool,
            addr,
            tls: SocketAddr::new(ip, tls_port),
            cert: cert.der().clone(),
        }
    }
}

/// Whether Kamailio answers an OPTIONS from `src` (in `ns`) within 300 ms.
fn answers_options(ns: &Netns, src: IpAddr, registrar: SocketAddr) -> bool {
    in_netns(ns, move || {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
        let request = options(src, port, registrar, "UDP", 1);
        let _ = socket.send_to(request.as_bytes(), registrar);
        let mut buf = [0u8; 2048];
        matches!(socket.recv_from(&mut buf), Ok((n, _)) if buf[..n].starts_with(b"SIP/2.0 200"))
    })
}

fn options(src: IpAddr, port: u16, to: SocketAddr, transport: &str, n: u32) -> String {
    format!(
        "OPTIONS sip:{ip} SIP/2.0\r\nVia: SIP/2.0/{transport} {src}:{port};branch=z9hG4bK-tls-{n}\r\n\
         From: <sip:keepalive@{src}>;tag=tls{n}\r\nTo: <sip:{ip}>\r\nCall-ID: tls-client-{n}@{src}\r\n\
         CSeq: {n} OPTIONS\r\nMax-Forwards: 70\r\nUser-Agent: Yealink SIP-T46S 66.86.0.15\r\n\
         Content-Length: 0\r\n\r\n",
        ip = to.ip()
    )
}

/// A phone over TLS in `ns`: connects to `registrar.tls` (from the route's source address),
/// sends an OPTIONS every `every` for `lasting` on one connection and reads each answer.
/// Returns (sent, answered 200).
pub fn tls_phone(
    ns: &Netns,
    registrar: &Registrar,
    every: Duration,
    lasting: Duration,
) -> std::thread::JoinHandle<(u32, u32)> {
    let server = registrar.tls;
    let tcp = in_netns(ns, move || {
        TcpStream::connect(server).expect("connect to Kamailio over TLS")
    });
    let cert = registrar.cert.clone();
    std::thread::spawn(move || {
        let local = tcp.local_addr().expect("the client's address");
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut roots = RootCertStore::empty();
        roots.add(cert).expect("trust the test certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(TLS_NAME).expect("a name");
        let conn = ClientConnection::new(Arc::new(config), name).expect("a TLS session");
        let mut tls = StreamOwned::new(conn, tcp);
        let started = Instant::now();
        let (mut sent, mut answered) = (0, 0);
        let mut buf = Vec::new();
        while started.elapsed() < lasting {
            sent += 1;
            let request = options(local.ip(), local.port(), server, "TLS", sent);
            tls.write_all(request.as_bytes()).expect("send over TLS");
            // One answer, whole: headers up to the blank line (Content-Length: 0).
            buf.clear();
            let mut byte = [0u8; 1];
            while !buf.ends_with(b"\r\n\r\n") {
                match tls.read(&mut byte) {
                    Ok(1) => buf.push(byte[0]),
                    _ => break,
                }
            }
            if buf.starts_with(b"SIP/2.0 200") {
                answered += 1;
            }
            std::thread::sleep(every);
        }
        tls.conn.send_close_notify();
        let _ = tls.flush();
        (sent, answered)
    })
}
