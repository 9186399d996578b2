//! A small strict parser for the start of a SIP request (RFC 3261 §7): the request line and
//! the headers detection looks at. Samples are cut at a fixed length and come from anyone,
//! so it reads only complete lines, never panics on any bytes (fuzzed), and says `Malformed`
//! for what no SIP stack would send. [`messages`] splits a TCP segment (or a datagram) into
//! the messages it carries, so that a request after the first is read too.

/// The parts of a request the rules use, borrowed from the sample.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SipRequest<'a> {
    pub method: &'a str,
    pub uri: &'a str,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub call_id: Option<&'a str>,
    /// It carries `Authorization` or `Proxy-Authorization`: an answer to the server's
    /// challenge, which an extension scanner never sends.
    pub credentials: bool,
    /// The nonce those credentials answer.
    pub nonce: Option<&'a str>,
}

/// The parts of a final response the rules use (RFC 3261 §7.2), borrowed from the sample.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SipResponse<'a> {
    pub status: u16,
    /// The method of the request it answers, from CSeq.
    pub method: &'a str,
    pub call_id: Option<&'a str>,
    pub to: Option<&'a str>,
    /// The nonce of a `WWW-Authenticate` or `Proxy-Authenticate` challenge.
    pub nonce: Option<&'a str>,
}

impl<'a> SipResponse<'a> {
    /// A response's status line and the headers above; `Malformed` for anything else.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Malformed> {
        let mut lines = complete_lines(bytes)?;
        let status_line = lines.next().ok_or(Malformed::Truncated)?;
        let status = status_line
            .strip_prefix("SIP/2.0 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse::<u16>().ok())
            .filter(|code| (100..700).contains(code))
            .ok_or(Malformed::RequestLine)?;
        let mut response = SipResponse {
            status,
            ..Default::default()
        };
        for line in lines {
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "call-id" | "i" => response.call_id = response.call_id.or(Some(value)),
                "to" | "t" => response.to = response.to.or(Some(value)),
                "cseq" => {
                    response.method = value.split_whitespace().nth(1).unwrap_or_default();
                }
                "www-authenticate" | "proxy-authenticate" => {
                    response.nonce = response.nonce.or_else(|| digest_param(value, "nonce"));
                }
                _ => {}
            }
        }
        Ok(response)
    }

    /// The user the answered request was aimed at (To's URI).
    pub fn target_user(&self) -> Option<&'a str> {
        self.to.and_then(uri_user)
    }
}

/// A Digest challenge's or answer's parameter (`nonce="abc"`), unquoted.
pub fn digest_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let rest = value.strip_prefix("Digest")?.trim_start();
    rest.split(',').find_map(|part| {
        let (key, v) = part.trim().split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"'))
            .filter(|v| !v.is_empty() && v.len() <= 256)
    })
}

/// Why a sample is not a SIP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("no complete request line")]
    Truncated,
    #[error("the request line is not METHOD URI SIP/2.0")]
    RequestLine,
    #[error("a header line has no name and colon")]
    Header,
    #[error("bytes that are not text")]
    Binary,
}

/// The complete lines of a message, without their line ends: the sample may end in the
/// middle of one, which is left out.
fn complete_lines(bytes: &[u8]) -> Result<impl Iterator<Item = &str>, Malformed> {
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(end) => &bytes[..=end],
        None => return Err(Malformed::Truncated),
    };
    let text = std::str::from_utf8(complete).map_err(|_| Malformed::Binary)?;
    Ok(text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)))
}

/// Longest method token accepted; real ones are at most 9 characters (SUBSCRIBE).
const MAX_METHOD: usize = 16;

impl<'a> SipRequest<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Malformed> {
        let mut lines = complete_lines(bytes)?;
        let request_line = lines.next().ok_or(Malformed::Truncated)?;
        let mut parts = request_line.split(' ');
        let (Some(method), Some(uri), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Malformed::RequestLine);
        };
        let token = |s: &str| {
            !s.is_empty()
                && s.len() <= MAX_METHOD
                && s.bytes().all(|b| b.is_ascii_uppercase() || b == b'-')
        };
        if !token(method) || uri.is_empty() || !uri.contains(':') || version != "SIP/2.0" {
            return Err(Malformed::RequestLine);
        }
        let mut request = SipRequest {
            method,
            uri,
            ..Default::default()
        };
        for line in lines {
            if line.is_empty() {
                break; // the body follows
            }
            if line.starts_with([' ', '\t']) {
                continue; // a folded continuation of the previous header
            }
            let (name, value) = line.split_once(':').ok_or(Malformed::Header)?;
            let name = name.trim_end();
            if name.is_empty()
                || name.contains(' ')
                || line.chars().any(|c| c.is_control() && c != '\t')
            {
                return Err(Malformed::Header);
            }
            let value = value.trim();
            let lower = name.to_ascii_lowercase();
            if lower == "authorization" || lower == "proxy-authorization" {
                request.credentials = true;
                request.nonce = request.nonce.or_else(|| digest_param(value, "nonce"));
                continue;
            }
            let slot = match lower.as_str() {
                "from" | "f" => &mut request.from,
                "to" | "t" => &mut request.to,
                "user-agent" => &mut request.user_agent,
                "call-id" | "i" => &mut request.call_id,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        Ok(request)
    }

    /// The user part of the To header's URI (or of the Request-URI): the extension a
    /// request is aimed at, which `svwar` walks through.
    pub fn target_user(&self) -> Option<&'a str> {
        self.to.and_then(uri_user).or_else(|| uri_user(self.uri))
    }

    /// The user parts of the Request-URI, From and To, each with where it came from.
    pub fn user_parts(&self) -> impl Iterator<Item = (&'static str, &'a str)> {
        [
            ("Request-URI", Some(self.uri)),
            ("From", self.from),
            ("To", self.to),
        ]
        .into_iter()
        .filter_map(|(place, text)| Some((place, raw_user(text?)?)))
    }
}

/// Most messages read from one sample: a 1,024-byte sample holds a few at most.
const MAX_MESSAGES: usize = 8;

/// The messages in `bytes`, in order: each one's start line and headers (its body skipped
/// by its Content-Length), after any CRLF keep-alives before it. The last may be cut where
/// the sample ends. A message whose end cannot be found (no blank line, or no
/// Content-Length where more bytes follow) ends the list: what follows it cannot be placed.
pub fn messages(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while out.len() < MAX_MESSAGES {
        let start = rest
            .iter()
            .position(|b| *b != b'\r' && *b != b'\n')
            .unwrap_or(rest.len());
        rest = &rest[start..];
        if rest.is_empty() {
            break;
        }
        let Some((head_len, blank_len)) = header_end(rest) else {
            out.push(rest);
            break;
        };
        let head = &rest[..head_len];
        out.push(head);
        let after = &rest[head_len + blank_len..];
        if after.is_empty() {
            break;
        }
        match content_length(head) {
            Some(body) if body <= after.len() => rest = &after[body..],
            _ => break,
        }
    }
    out
}

/// Where the header block ends: its length (through its last line's end) and the length of
/// the empty line that follows.
fn header_end(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut line_start = 0;
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'\n' {
            continue;
        }
        let line = &bytes[line_start..i];
        if line.is_empty() || line == b"\r" {
            return Some((line_start, i + 1 - line_start));
        }
        line_start = i + 1;
    }
    None
}

/// The Content-Length (or `l`) header's value.
fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    text.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        let name = name.trim();
        (name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l"))
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// A response's start line (`SIP/2.0 404 Not Found`): a client answering the server's own
/// request, which is no request of the client's.
pub fn is_response(message: &[u8]) -> bool {
    message.starts_with(b"SIP/2.0 ")
}

/// `sip:100@host` (within a header such as `"A" <sip:100@host>;tag=1`) -> `100`.
fn uri_user(text: &str) -> Option<&str> {
    let start = text
        .find("sip:")
        .map(|i| i + 4)
        .or_else(|| text.find("sips:").map(|i| i + 5))?;
    let rest = &text[start..];
    let at = rest.find('@')?;
    let user = &rest[..at];
    (!user.is_empty() && !user.contains(['>', ';', ' '])).then_some(user)
}

/// As [`uri_user`], but taking whatever stands between `sip:` and `@` (short of a `>`),
/// spaces and quotes included: what an injection puts there.
fn raw_user(text: &str) -> Option<&str> {
    let start = text
        .find("sip:")
        .map(|i| i + 4)
        .or_else(|| text.find("sips:").map(|i| i + 5))?;
    let rest = &text[start..];
    let rest = &rest[..rest.find('>').unwrap_or(rest.len())];
    let user = &rest[..rest.rfind('@')?];
    (!user.is_empty()).then_some(user)
}

/// A line for evidence: printable ASCII only, at most `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVWAR: &[u8] = b"REGISTER sip:192.0.2.1 SIP/2.0\r\n\
Via: SIP/2.0/UDP 198.51.100.7:5061;branch=z9hG4bK-1;rport\r\n\
Max-Forwards: 70\r\n\
To: \"100\"<sip:100@192.0.2.1>\r\n\
From: \"100\"<sip:100@192.0.2.1>;tag=6131\r\n\
User-Agent: friendly-scanner\r\n\
Call-ID: 1234567890\r\n\
CSeq: 1 REGISTER\r\n\
Content-Length: 0\r\n\r\n";

    #[test]
    fn a_scanner_request_gives_its_headers() {
        let r = SipRequest::parse(SVWAR).unwrap();
        assert_eq!(r.method, "REGISTER");
        assert_eq!(r.uri, "sip:192.0.2.1");
        assert_eq!(r.user_agent, Some("friendly-scanner"));
        assert_eq!(r.call_id, Some("1234567890"));
        assert_eq!(r.target_user(), Some("100"));
    }

    #[test]
    fn compact_headers_and_a_cut_sample_still_parse() {
        let cut = b"OPTIONS sip:100@192.0.2.1 SIP/2.0\r\nf: <sip:a@b>;tag=1\r\nt: <sip:200@b>\r\ni: x\r\nUser-Ag";
        let r = SipRequest::parse(cut).unwrap();
        assert_eq!(r.target_user(), Some("200"));
        assert_eq!(r.call_id, Some("x"));
        assert_eq!(r.user_agent, None);
    }

    #[test]
    fn what_no_sip_stack_sends_is_malformed() {
        for (bytes, why) in [
            (&b"GET / HTTP/1.1\r\n"[..], Malformed::RequestLine),
            (b"REGISTER sip:x SIP/2.0", Malformed::Truncated),
            (b"register sip:x SIP/2.0\r\n", Malformed::RequestLine),
            (
                b"INVITE sip:x SIP/2.0\r\nno colon here\r\n",
                Malformed::Header,
            ),
            (
                b"INVITE sip:x SIP/2.0\r\n\xff\xfe: x\r\n",
                Malformed::Binary,
            ),
            (b"INVITE  sip:x SIP/2.0\r\n", Malformed::RequestLine),
        ] {
            assert_eq!(SipRequest::parse(bytes), Err(why), "{bytes:?}");
        }
    }

    #[test]
    fn any_bytes_give_an_answer() {
        let mut seed = 0x1234_5678u32;
        for len in 0..600 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    if seed.is_multiple_of(7) {
                        b'\n'
                    } else {
                        (seed >> 8) as u8
                    }
                })
                .collect();
            let _ = SipRequest::parse(&bytes);
        }
    }

    #[test]
    fn every_request_in_a_segment_is_found() {
        let segment = b"\r\n\r\nOPTIONS sip:a@b SIP/2.0\r\nContent-Length: 4\r\n\r\nbodyREGISTER sip:b SIP/2.0\r\nUser-Agent: friendly-scanner\r\nl: 0\r\n\r\nSIP/2.0 200 OK\r\nl: 0\r\n\r\nINVITE sip:c";
        let found = messages(segment);
        assert_eq!(found.len(), 4, "{found:?}");
        assert_eq!(SipRequest::parse(found[0]).unwrap().method, "OPTIONS");
        let second = SipRequest::parse(found[1]).unwrap();
        assert_eq!(second.user_agent, Some("friendly-scanner"));
        assert!(is_response(found[2]));
        assert_eq!(SipRequest::parse(found[3]), Err(Malformed::Truncated));
        // Without a Content-Length, what follows a body cannot be placed.
        let no_length = b"MESSAGE sip:a@b SIP/2.0\r\n\r\nhello REGISTER sip:b SIP/2.0\r\n\r\n";
        assert_eq!(messages(no_length).len(), 1);
        assert!(messages(b"\r\n\r\n").is_empty());
    }

    #[test]
    fn credentials_and_user_parts_are_read() {
        let r = SipRequest::parse(
            b"REGISTER sip:x@h SIP/2.0\r\nFrom: <sip:100@h>;tag=1\r\nTo: <sip:100@h>\r\nAuthorization: Digest username=\"100\"\r\n\r\n",
        )
        .unwrap();
        assert!(r.credentials);
        let parts: Vec<_> = r.user_parts().collect();
        assert_eq!(
            parts,
            [("Request-URI", "x"), ("From", "100"), ("To", "100")]
        );
        assert!(!SipRequest::parse(SVWAR).unwrap().credentials);
    }

    #[test]
    fn responses_give_their_status_method_and_challenge() {
        let challenge = b"SIP/2.0 401 Unauthorized\r\nVia: SIP/2.0/UDP 198.51.100.7\r\nTo: <sip:100@h>;tag=9\r\nCall-ID: abc\r\nCSeq: 1 REGISTER\r\nWWW-Authenticate: Digest realm=\"r\", nonce=\"4f6e63\", algorithm=MD5\r\n\r\n";
        let r = SipResponse::parse(challenge).unwrap();
        assert_eq!(
            (r.status, r.method, r.call_id, r.nonce, r.target_user()),
            (401, "REGISTER", Some("abc"), Some("4f6e63"), Some("100"))
        );
        assert_eq!(
            SipResponse::parse(b"SIP/2.0 2x0 OK\r\n\r\n"),
            Err(Malformed::RequestLine)
        );
        let answer = SipRequest::parse(b"REGISTER sip:h SIP/2.0\r\nAuthorization: Digest username=\"100\", realm=\"r\", nonce=\"4f6e63\", response=\"x\"\r\n\r\n").unwrap();
        assert_eq!(answer.nonce, Some("4f6e63"));
    }

    #[test]
    fn evidence_lines_are_printable_and_short() {
        assert_eq!(printable("User-Agent: x\u{1b}[31m", 16), "User-Agent: x?[3");
    }
}
