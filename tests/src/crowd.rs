//! The legitimate crowd a SIP edge serves, as peers for the detection tests: a registrar
//! that challenges every REGISTER (SIPp), phones behind one NAT address answering those
//! challenges (SIPp), their keep-alives (CRLF and STUN), and a SIP client over TLS.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_rustls::rustls::{
    self, ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
    StreamOwned,
    pki_types::{PrivateKeyDer, ServerName},
};

use crate::{Netns, in_netns, spawn_in_netns};

/// A SIPp server scenario: a registrar that answers each REGISTER with a digest challenge
/// and the REGISTER that answers it with 200, as a PBX with digest authentication does.
pub const REGISTRAR: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="registrar with digest authentication">
  <recv request="REGISTER"/>
  <send>
    <![CDATA[

      SIP/2.0 401 Unauthorized
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]reg[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      WWW-Authenticate: Digest realm="office", nonce="[call_number]0a1b2c3d4e5f", algorithm=MD5
      Server: test-registrar
      Content-Length: 0

    ]]>
  </send>
  <recv request="REGISTER"/>
  <send>
    <![CDATA[

      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]reg[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      [last_Contact:];expires=3600
      Server: test-registrar
      Content-Length: 0

    ]]>
  </send>
</scenario>
"#;

/// A SIPp client scenario: a phone (its user from the injection file's first field)
/// registers, is challenged, and registers again with its credentials (the second field:
/// SIPp does not expand a field inside its `[authentication]` keyword, so the file holds
/// the whole keyword).
pub const PHONE: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="a phone registering through a digest challenge">
  <send retrans="500">
    <![CDATA[

      REGISTER sip:[remote_ip] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:[field0]@[remote_ip]>;tag=[call_number]
      To: <sip:[field0]@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 1 REGISTER
      Contact: <sip:[field0]@[local_ip]:[local_port]>
      Max-Forwards: 70
      User-Agent: Yealink SIP-T46S 66.86.0.15
      Expires: 3600
      Content-Length: 0

    ]]>
  </send>
  <recv response="401" auth="true"/>
  <send retrans="500">
    <![CDATA[

      REGISTER sip:[remote_ip] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:[field0]@[remote_ip]>;tag=[call_number]
      To: <sip:[field0]@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 2 REGISTER
      Contact: <sip:[field0]@[local_ip]:[local_port]>
      [field1]
      Max-Forwards: 70
      User-Agent: Yealink SIP-T46S 66.86.0.15
      Expires: 3600
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
</scenario>
"#;

/// The office's users (from 200 up) and their one password, which the registrars know.
pub const FIRST_USER: usize = 200;
pub const PASSWORD: &str = "office-secret";

/// SIPp's injection file for `phones` users, [`FIRST_USER`] upwards, one per call: the user
/// and its credentials.
pub fn phone_users(phones: usize) -> String {
    let mut text = String::from("SEQUENTIAL\n");
    for n in FIRST_USER..FIRST_USER + phones {
        text.push_str(&format!(
            "{n};[authentication username={n} password={PASSWORD}]\n"
        ));
    }
    text
}

/// A STUN binding request (RFC 5389 §6): what phones behind NAT send to keep a binding.
const STUN_BINDING: [u8; 20] = [
    0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 0x61, 0x70, 0x69, 0x62, 0x61, 0x6e, 0x2d, 0x74,
    0x65, 0x73, 0x74, 0x31,
];

/// Phones behind one address sending keep-alives on a thread until stopped: each of
/// `phones` sockets sends, every `every`, an RFC 5626 CRLF keep-alive and then a STUN
/// binding request in turn. `stop` ends it; the thread returns how many it sent.
pub fn keep_alives(
    ns: &Netns,
    src: IpAddr,
    dst: SocketAddr,
    phones: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    spawn_in_netns(ns, move || {
        let sockets: Vec<UdpSocket> = (0..phones)
            .map(|_| UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind a phone's socket"))
            .collect();
        let mut sent = 0;
        let mut round = 0usize;
        while !stop.load(Ordering::Relaxed) {
            for socket in &sockets {
                let payload: &[u8] = if round.is_multiple_of(2) {
                    b"\r\n\r\n"
                } else {
                    &STUN_BINDING
                };
                socket.send_to(payload, dst).expect("send a keep-alive");
                sent += 1;
            }
            round += 1;
            std::thread::sleep(every);
        }
        sent
    })
}

/// A SIP-over-TLS server in `ns` that answers each line a client sends with a line, until
/// the client goes; serves one connection.
pub struct TlsSipServer {
    thread: Option<std::thread::JoinHandle<usize>>,
    /// The certificate clients are to trust.
    pub cert: rustls::pki_types::CertificateDer<'static>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsSipServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let key = rcgen::KeyPair::generate().expect("a key");
        let params = rcgen::CertificateParams::new(vec!["sip.test".to_owned()]).expect("params");
        let cert = params.self_signed(&key).expect("a certificate");
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server TLS config");
        let config = Arc::new(config);
        let listener = in_netns(ns, move || TcpListener::bind(addr).expect("bind TLS"));
        let thread = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().expect("a TLS client");
            let conn = ServerConnection::new(config).expect("a TLS session");
            let mut tls = StreamOwned::new(conn, tcp);
            let mut answered = 0;
            let mut line = String::new();
            loop {
                line.clear();
                let mut reader = BufReader::new(&mut tls);
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return answered,
                    Ok(_) => {}
                }
                if tls.write_all(b"SIP/2.0 200 OK\n").is_err() {
                    return answered;
                }
                answered += 1;
            }
        });
        Self {
            thread: Some(thread),
            cert: cert.der().clone(),
        }
    }

    /// Lines answered, once the client has gone.
    pub fn join(mut self) -> usize {
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

/// A SIP client over TLS in `ns`: connects to `server` (from the route's source address),
/// sends a request line every `every` for `lasting` and reads each answer. Returns the
/// answers it got.
pub fn tls_client(
    ns: &Netns,
    server: SocketAddr,
    cert: rustls::pki_types::CertificateDer<'static>,
    every: Duration,
    lasting: Duration,
) -> std::thread::JoinHandle<usize> {
    let tcp = in_netns(ns, move || {
        TcpStream::connect(server).expect("connect to TLS")
    });
    std::thread::spawn(move || {
        let mut roots = RootCertStore::empty();
        roots.add(cert).expect("trust the test certificate");
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("sip.test").expect("a name");
        let conn = ClientConnection::new(Arc::new(config), name).expect("a TLS session");
        let mut tls = StreamOwned::new(conn, tcp);
        let started = Instant::now();
        let mut answers = 0;
        let mut line = String::new();
        while started.elapsed() < lasting {
            tls.write_all(b"OPTIONS sip:100@sip.test SIP/2.0 (over TLS)\n")
                .expect("send over TLS");
            line.clear();
            BufReader::new(&mut tls)
                .read_line(&mut line)
                .expect("read over TLS");
            if line.starts_with("SIP/2.0 200") {
                answers += 1;
            }
            std::thread::sleep(every);
        }
        tls.conn.send_close_notify();
        let _ = tls.flush();
        answers
    })
}
