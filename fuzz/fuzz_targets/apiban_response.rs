//! APIBAN's answers, v1 and v2, array and string forms, any status: whatever the body, the
//! client returns a batch, the end of the list or an error, and a batch holds what the body
//! held.
#![no_main]

use apiban::source::apiban::{Batch, interpret_batch, interpret_check};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    // Statuses a server sends, the odd ones included.
    let status = [200, 200, 200, 400, 403, 404, 429, 500, 502, 301][usize::from(first) % 10];
    if let Ok(Batch::Addresses { addresses, next_id }) = interpret_batch(status, body) {
        assert!(!next_id.is_empty() && next_id != "none");
        assert!(addresses.iter().map(String::len).sum::<usize>() <= body.len());
    }
    let _ = interpret_check(status, body, "203.0.113.7".parse().unwrap());
});
