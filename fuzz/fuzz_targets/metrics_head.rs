//! The request head of a /metrics client, any bytes up to the size bound: the method and
//! path come out of its first line, the query cut off.
#![no_main]

use apiban::metrics::request_target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let head = &data[..data.len().min(8 * 1024)];
    let (method, path) = request_target(head);
    assert!(!method.contains(char::is_whitespace));
    assert!(!path.contains('?') && !path.contains(char::is_whitespace));
});
