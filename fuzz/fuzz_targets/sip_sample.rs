//! What the dataplane samples from anyone's SIP traffic: the parser answers for any bytes,
//! what it returns is taken from the bytes, and the rules take any sample without panicking.
#![no_main]

use apiban::detect::{
    DetectSettings,
    rules::Detector,
    sample::Sample,
    sip::{SipRequest, SipResponse, messages, printable},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(r) = SipRequest::parse(data) {
        for part in [Some(r.method), Some(r.uri), r.from, r.to, r.user_agent, r.call_id]
            .into_iter()
            .flatten()
        {
            assert!(text.contains(part), "{part:?} is not from the input");
        }
        if let Some(user) = r.target_user() {
            assert!(text.contains(user));
        }
    }
    let mut covered = 0;
    for message in messages(data) {
        // Each message is a piece of the input, in order.
        let at = message.as_ptr() as usize - data.as_ptr() as usize;
        assert!(at >= covered && at + message.len() <= data.len());
        covered = at + message.len();
        if let Ok(r) = SipRequest::parse(message) {
            for (_, user) in r.user_parts() {
                assert!(text.contains(user) || !user.is_ascii());
            }
        }
        if let Ok(r) = SipResponse::parse(message) {
            assert!((100..700).contains(&r.status));
            for part in [r.call_id, r.to, r.nonce].into_iter().flatten() {
                assert!(text.contains(part), "{part:?} is not from the input");
            }
        }
    }
    assert!(printable(&text, 80).chars().all(|c| c == ' ' || c.is_ascii_graphic()));
    let sample = Sample::decode(data).unwrap_or(Sample {
        kind: apiban_common_kind(data),
        addr: "198.51.100.7".parse().unwrap(),
        method: 0,
        proto: 17,
        dst_port: 5060,
        requests: [u32::MAX, 0, 7, 1],
        seen: 1,
        probes: data.len() as u32,
        payload: data.to_vec(),
    });
    let mut detector = Detector::default();
    let settings = DetectSettings::default();
    for t in 0..3 {
        let _ = detector.observe(&settings, &sample, t * 30_000);
    }
});

/// A sample, a rate report or a response, by the first byte.
fn apiban_common_kind(data: &[u8]) -> u8 {
    data.first().map_or(1, |b| b % 3 + 1)
}
