use super::*;
use apiban_common::detect::{KIND_SAMPLE, METHOD_INVITE};

fn sample(addr: &str, payload: &[u8]) -> Sample {
    Sample {
        kind: KIND_SAMPLE,
        addr: addr.parse().unwrap(),
        method: 0,
        proto: apiban_common::IPPROTO_UDP,
        dst_port: 5060,
        requests: [1, 0, 0, 0],
        seen: 1,
        probes: 1,
        payload: payload.to_vec(),
    }
}

fn register(to_user: &str, agent: &str) -> Vec<u8> {
    format!(
        "REGISTER sip:192.0.2.1 SIP/2.0\r\nTo: <sip:{to_user}@192.0.2.1>\r\nFrom: <sip:{to_user}@192.0.2.1>;tag=1\r\nUser-Agent: {agent}\r\nCall-ID: 1\r\n\r\n"
    )
    .into_bytes()
}

/// `register` answering the server's challenge.
fn register_with_credentials(to_user: &str) -> Vec<u8> {
    format!(
        "REGISTER sip:192.0.2.1 SIP/2.0\r\nTo: <sip:{to_user}@192.0.2.1>\r\nFrom: <sip:{to_user}@192.0.2.1>;tag=1\r\nAuthorization: Digest username=\"{to_user}\", nonce=\"abc\"\r\nUser-Agent: Yealink SIP-T46S\r\nCall-ID: {to_user}\r\n\r\n"
    )
    .into_bytes()
}

/// Feeds `n` copies of `payload` from `addr`; the findings.
fn feed(d: &mut Detector, addr: &str, payload: &[u8], n: u32) -> Vec<Finding> {
    let s = DetectSettings::default();
    (1..=n)
        .filter_map(|i| {
            let mut one = sample(addr, payload);
            one.seen = i;
            d.observe(&s, &one, 10)
        })
        .collect()
}

#[test]
fn a_scanner_user_agent_matches_on_its_third_request_only() {
    let mut d = Detector::default();
    let found = feed(
        &mut d,
        "198.51.100.7",
        &register("100", "Friendly-Scanner 0.3"),
        2,
    );
    assert_eq!(
        found,
        [],
        "one or two requests, forged or not, are not enough"
    );
    let found = feed(
        &mut d,
        "198.51.100.7",
        &register("100", "Friendly-Scanner 0.3"),
        5,
    );
    assert_eq!(
        found.len(),
        5,
        "the third of seven and each after: {found:?}"
    );
    assert_eq!(found[0].rule, SCANNER_USER_AGENT);
    assert_eq!(found[0].line, "User-Agent: Friendly-Scanner 0.3");
    assert!(found[0].counts.contains("3 sampled requests"), "{found:?}");
}

#[test]
fn signatures_match_whole_names_not_substrings() {
    for (agent, known, hit) in [
        ("friendly-scanner", "friendly-scanner", true),
        ("sipvicious 0.3.4", "sipvicious", true),
        ("SIPVicious/0.3.4", "sipvicious", true),
        ("iWar 0.5", "iwar", true),
        // A device whose name merely holds a short word.
        ("Polycom-iWar-7", "iwar", false),
        ("iwarrior phone 2.1", "iwar", false),
        ("MySIPCLIent 1.0", "sipcli", false),
        ("sipclient 4", "sipcli", false),
        ("", "sipcli", false),
    ] {
        assert_eq!(user_agent_matches(agent, known), hit, "{agent} / {known}");
    }
}

#[test]
fn injections_in_user_parts_are_a_signature() {
    let attempt = b"INVITE sip:100'%20or%201=1--@192.0.2.1 SIP/2.0\r\nFrom: <sip:100@192.0.2.1>;tag=1\r\nTo: <sip:100@192.0.2.1>\r\n\r\n";
    let found = feed(&mut Detector::default(), "198.51.100.30", attempt, 3);
    assert_eq!(found.len(), 1, "on the third: {found:?}");
    assert_eq!(found[0].rule, INJECTION);
    assert!(found[0].counts.contains("Request-URI"), "{found:?}");
    let union = b"OPTIONS sip:x@192.0.2.1 SIP/2.0\r\nFrom: \"a\" <sip:1 UNION SELECT password@192.0.2.1>;tag=1\r\n\r\n";
    let found = feed(&mut Detector::default(), "198.51.100.31", union, 3);
    assert_eq!(found.len(), 1, "{found:?}");
    // Display names are quoted; user parts with words that merely contain the marks.
    for clean in [
        &b"INVITE sip:+4930123@192.0.2.1 SIP/2.0\r\nFrom: \"O'Brien, Sales\" <sip:obrien@192.0.2.1>;tag=1\r\nTo: <sip:selector-desk@192.0.2.1>\r\n\r\n"[..],
        b"REGISTER sip:192.0.2.1 SIP/2.0\r\nTo: <sip:reunion.room@192.0.2.1>\r\nFrom: <sip:reunion.room@192.0.2.1>;tag=1\r\n\r\n",
    ] {
        assert_eq!(feed(&mut Detector::default(), "198.51.100.32", clean, 50), []);
    }
}

#[test]
fn a_normal_phone_is_no_finding() {
    let s = DetectSettings::default();
    let mut d = Detector::default();
    for t in 0..100 {
        let got = d.observe(
            &s,
            &sample("198.51.100.8", &register("100", "Yealink SIP-T46S")),
            t * 1000,
        );
        assert_eq!(got, None);
    }
}

#[test]
fn many_target_users_from_one_source_is_enumeration() {
    let s = DetectSettings::default();
    let limit = s.users.unwrap().requests;
    let mut d = Detector::default();
    let mut found = None;
    for user in 0..limit {
        found = d.observe(
            &s,
            &sample("198.51.100.9", &register(&format!("{}", 100 + user), "x")),
            10,
        );
        if user + 1 < limit {
            assert_eq!(found, None, "after {user}");
        }
    }
    assert_eq!(found.expect("a match").rule, EXTENSION_ENUMERATION);
}

#[test]
fn a_nat_office_answering_challenges_is_no_enumeration() {
    // 60 phones behind one address after an outage: each REGISTER is challenged and
    // sent again with credentials, all within seconds; the dataplane samples the first
    // 8 requests, then one in 8.
    let s = DetectSettings::default();
    let mut d = Detector::default();
    let mut n = 0u32;
    for phone in 0..60 {
        let user = format!("{}", 200 + phone);
        for payload in [
            register(&user, "Yealink SIP-T46S"),
            register_with_credentials(&user),
        ] {
            n += 1;
            if n > 8 && !n.is_multiple_of(8) {
                continue;
            }
            let mut one = sample("198.51.100.40", &payload);
            (one.seen, one.probes) = (n, n);
            assert_eq!(d.observe(&s, &one, u64::from(n) * 40), None, "request {n}");
        }
    }
}

#[test]
fn sampled_enumeration_is_scaled_to_the_requests_between_samples() {
    let s = DetectSettings::default();
    let mut d = Detector::default();
    // The dataplane's sampling: the first 8 requests, then one in 8; every request
    // names a new user.
    let mut found = None;
    for n in 1..=200u32 {
        if n > 8 && n % 8 != 0 {
            continue;
        }
        let mut one = sample(
            "198.51.100.14",
            &register(&format!("{}", 1000 + n), "Zoiper"),
        );
        one.probes = n;
        one.seen = n;
        if let Some(f) = d.observe(&s, &one, 10) {
            found = Some((n, f));
            break;
        }
    }
    let (n, f) = found.expect("enumeration found");
    assert_eq!(f.rule, EXTENSION_ENUMERATION);
    assert!(n <= 24, "found only after {n} requests");
}

#[test]
fn a_pbx_re_registering_its_trunks_is_no_enumeration() {
    let s = DetectSettings::default();
    let mut d = Detector::default();
    // Five trunks re-registered every minute, all sampled, for an hour.
    for n in 0..300u32 {
        let mut one = sample(
            "198.51.100.15",
            &register(&format!("trunk{}", n % 5), "Asterisk"),
        );
        one.probes = n + 1;
        one.seen = n + 1;
        assert_eq!(d.observe(&s, &one, u64::from(n / 5) * 60_000), None);
    }
}

#[test]
fn a_pbx_calling_many_numbers_is_no_enumeration() {
    let s = DetectSettings::default();
    let mut d = Detector::default();
    for n in 0..200 {
        let invite = format!(
            "INVITE sip:{n}@192.0.2.1 SIP/2.0\r\nTo: <sip:{n}@192.0.2.1>\r\nFrom: <sip:pbx@192.0.2.9>;tag=1\r\nUser-Agent: Asterisk PBX 20\r\n\r\n"
        );
        assert_eq!(
            d.observe(&s, &sample("198.51.100.13", invite.as_bytes()), 10),
            None
        );
    }
}

#[test]
fn what_cannot_be_read_is_counted_and_never_a_finding() {
    let s = DetectSettings::default();
    let mut d = Detector::default();
    for payload in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"register sip:x SIP/2.0\r\n\r\n",
    ] {
        for _ in 0..100 {
            assert_eq!(d.observe(&s, &sample("198.51.100.10", payload), 5), None);
        }
    }
    assert_eq!(d.unreadable, 300);
    let last = d.last_unreadable.clone().expect("the latest is kept");
    assert_eq!(last.line, "register sip:x SIP/2.0?");
    // A sample cut at the snap length in its request line is the sample's end, not
    // the sender's.
    let mut cut = sample("198.51.100.10", &[b'A'; apiban_common::detect::SNAPLEN]);
    cut.payload[..8].copy_from_slice(b"OPTIONS ");
    assert_eq!(d.observe(&s, &cut, 5), None);
    assert_eq!(d.unreadable, 300);
}

#[test]
fn a_scanner_request_after_an_ordinary_one_in_a_tcp_segment_is_read() {
    let mut segment =
        b"OPTIONS sip:100@192.0.2.1 SIP/2.0\r\nUser-Agent: Yealink\r\nContent-Length: 0\r\n\r\n"
            .to_vec();
    segment.extend(register("100", "friendly-scanner"));
    let found = feed(&mut Detector::default(), "198.51.100.33", &segment, 3);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].rule, SCANNER_USER_AGENT);
}

#[test]
fn a_rate_report_names_the_method_over_its_threshold() {
    let s = DetectSettings::default();
    let mut d = Detector::default();
    let mut report = sample("198.51.100.11", b"");
    report.kind = KIND_RATE;
    report.method = METHOD_INVITE;
    report.requests = [2, 1000, 0, 0];
    let f = d.observe(&s, &report, 0).expect("a match");
    assert_eq!(f.rule, REQUEST_RATE);
    assert_eq!(
        f.counts, "1000 INVITE requests within 10s (limit 1000)",
        "{f:?}"
    );
    // A method whose threshold is off reports nothing.
    let mut off = s.clone();
    off.rate.per_method[usize::from(METHOD_INVITE)] = 0;
    assert_eq!(d.observe(&off, &report, 0), None);
}

#[test]
fn the_window_forgets_old_users() {
    let s = DetectSettings::default();
    let limit = s.users.unwrap().requests;
    let window = s.users.unwrap().window.as_millis() as u64;
    let mut d = Detector::default();
    for user in 0..limit {
        // One user per window: never enumeration.
        let got = d.observe(
            &s,
            &sample("198.51.100.12", &register(&format!("{user}"), "x")),
            u64::from(user) * (window + 1),
        );
        assert_eq!(got, None);
    }
    assert_eq!(d.tracked(), 1);
}

fn response(addr: &str, status: &str, call_id: &str, method: &str, nonce: Option<&str>) -> Sample {
    let challenge = nonce.map_or(String::new(), |n| {
        format!("WWW-Authenticate: Digest realm=\"r\", nonce=\"{n}\"\r\n")
    });
    let mut s = sample(
        addr,
        format!(
            "SIP/2.0 {status}\r\nTo: <sip:201@192.0.2.1>;tag=x\r\nCall-ID: {call_id}\r\nCSeq: 1 {method}\r\n{challenge}\r\n"
        )
        .as_bytes(),
    );
    s.kind = KIND_RESPONSE;
    s
}

fn answer(addr: &str, call_id: &str, nonce: &str) -> Sample {
    sample(
        addr,
        format!(
            "REGISTER sip:192.0.2.1 SIP/2.0\r\nTo: <sip:201@192.0.2.1>\r\nCall-ID: {call_id}\r\nAuthorization: Digest username=\"201\", nonce=\"{nonce}\", response=\"x\"\r\n\r\n"
        )
        .as_bytes(),
    )
}

#[test]
fn a_2xx_to_credentials_for_an_issued_nonce_proves_the_peer() {
    let s = DetectSettings::default();
    let mut d = Detector::default();
    let a = "198.51.100.50";
    d.observe(
        &s,
        &response(a, "401 Unauthorized", "c1", "REGISTER", Some("n1")),
        1,
    );
    d.observe(&s, &answer(a, "c1", "n1"), 2);
    d.observe(&s, &response(a, "200 OK", "c1", "REGISTER", None), 3);
    let proofs = d.take_proofs();
    assert_eq!(proofs.len(), 1, "{proofs:?}");
    assert_eq!(proofs[0].how, "200 to an authenticated REGISTER for 201");
    // Credentials for a nonce this address was never given (a forger guessing, or
    // replaying another address's) prove nothing, however the server answers.
    let b = "198.51.100.51";
    d.observe(
        &s,
        &response(b, "401 Unauthorized", "c2", "REGISTER", Some("n2")),
        1,
    );
    d.observe(&s, &answer(b, "c2", "n1"), 2);
    d.observe(&s, &response(b, "200 OK", "c2", "REGISTER", None), 3);
    // Nor does a 200 to a request without credentials.
    d.observe(&s, &response(b, "200 OK", "c3", "INVITE", None), 4);
    assert_eq!(d.take_proofs(), []);
}

#[test]
fn refused_credentials_for_issued_nonces_are_an_auth_failure() {
    let s = DetectSettings::default();
    let limit = s.auth_failures.unwrap().requests;
    let mut d = Detector::default();
    let a = "198.51.100.52";
    let mut found = Vec::new();
    d.observe(
        &s,
        &response(a, "401 Unauthorized", "c0", "REGISTER", Some("n0")),
        1,
    );
    for i in 1..=limit {
        let call = format!("c{i}");
        d.observe(&s, &answer(a, &call, &format!("n{}", i - 1)), 2);
        let refused = response(
            a,
            "401 Unauthorized",
            &call,
            "REGISTER",
            Some(&format!("n{i}")),
        );
        found.extend(d.observe(&s, &refused, 3));
    }
    assert_eq!(found.len(), 1, "at the limit: {found:?}");
    assert_eq!(found[0].rule, AUTH_FAILURE);
    assert!(!found[0].forgeable, "only the real address saw the nonces");
    assert!(
        found[0].line.contains("401 to credentials for 201"),
        "{found:?}"
    );
    // A phone with a wrong password, retrying twice a minute for an hour: never.
    let s = DetectSettings::default();
    let mut d = Detector::default();
    let b = "198.51.100.53";
    for minute in 0..60u64 {
        for retry in 0..2u64 {
            let at = minute * 60_000 + retry * 30_000;
            let call = format!("p{minute}-{retry}");
            d.observe(
                &s,
                &response(b, "401 Unauthorized", &call, "REGISTER", Some(&call)),
                at,
            );
            d.observe(&s, &answer(b, &call, &call), at + 1);
            let refused = response(b, "403 Forbidden", &call, "REGISTER", None);
            assert_eq!(d.observe(&s, &refused, at + 2), None);
        }
    }
}

#[test]
fn users_that_do_not_exist_are_unknown_users_and_over_udp_forgeable() {
    let s = DetectSettings::default();
    let limit = s.unknown_users.unwrap().requests;
    let walk = |proto: u8| {
        let mut d = Detector::default();
        let a = "198.51.100.54";
        let mut found = Vec::new();
        for n in 0..limit {
            let mut r = sample(
                a,
                format!(
                    "SIP/2.0 404 Not Found\r\nTo: <sip:{}@192.0.2.1>;tag=x\r\nCall-ID: w{n}\r\nCSeq: 1 REGISTER\r\n\r\n",
                    300 + n
                )
                .as_bytes(),
            );
            r.kind = KIND_RESPONSE;
            r.proto = proto;
            found.extend(d.observe(&s, &r, 1));
        }
        found
    };
    let udp = walk(apiban_common::IPPROTO_UDP);
    assert_eq!(udp.len(), 1, "at the limit: {udp:?}");
    assert_eq!(udp[0].rule, UNKNOWN_USERS);
    assert!(udp[0].forgeable, "a forged UDP request gets its 404 too");
    let tcp = walk(apiban_common::IPPROTO_TCP);
    assert!(!tcp[0].forgeable, "a TCP source completed a handshake");
    // Users that exist (challenged, then registered) never count, however many.
    let mut d = Detector::default();
    for n in 0..200 {
        let mut r = sample(
            "198.51.100.55",
            format!(
                "SIP/2.0 401 Unauthorized\r\nTo: <sip:{}@192.0.2.1>;tag=x\r\nCall-ID: o{n}\r\nCSeq: 1 REGISTER\r\nWWW-Authenticate: Digest realm=\"r\", nonce=\"{n}\"\r\n\r\n",
                200 + n
            )
            .as_bytes(),
        );
        r.kind = KIND_RESPONSE;
        assert_eq!(d.observe(&s, &r, 1), None);
    }
}
