//! A small strict parser for the start of a SIP request (RFC 3261 §7): the request line and
//! the headers detection looks at. Samples are cut at a fixed length and come from anyone,
//! so it reads only complete lines, never panics on any bytes (fuzzed), and says `Malformed`
//! for what no SIP stack would send.

/// The parts of a request the rules use, borrowed from the sample.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SipRequest<'a> {
    pub method: &'a str,
    pub uri: &'a str,
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub call_id: Option<&'a str>,
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

/// Longest method token accepted; real ones are at most 9 characters (SUBSCRIBE).
const MAX_METHOD: usize = 16;

impl<'a> SipRequest<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Malformed> {
        // Only complete lines: the sample may end in the middle of one.
        let complete = match bytes.iter().rposition(|b| *b == b'\n') {
            Some(end) => &bytes[..=end],
            None => return Err(Malformed::Truncated),
        };
        let text = std::str::from_utf8(complete).map_err(|_| Malformed::Binary)?;
        let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
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
            let slot = match name.to_ascii_lowercase().as_str() {
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
    fn evidence_lines_are_printable_and_short() {
        assert_eq!(printable("User-Agent: x\u{1b}[31m", 16), "User-Agent: x?[3");
    }
}
