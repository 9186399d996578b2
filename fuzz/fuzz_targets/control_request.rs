//! One request line on the control socket, from any local client: it parses into a request
//! or an error, and what it parses into says whether it only reads.
#![no_main]

use apiban::control::{MAX_REQUEST, Request, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_REQUEST as usize)];
    let line = String::from_utf8_lossy(data);
    if let Ok(request) = parse_request(&line) {
        let read_only = matches!(
            request,
            Request::Status
                | Request::Check { .. }
                | Request::List { .. }
                | Request::AllowList
                | Request::Fleet
        );
        assert_eq!(request.is_read_only(), read_only);
        if let Request::Capture(spec) = &request {
            // A capture any client asks for is planned or refused, never a panic.
            let _ = spec.plan();
        }
        let again = serde_json::to_string(&request).expect("a request serialises");
        assert_eq!(parse_request(&again).expect("and parses back"), request);
    }
});
