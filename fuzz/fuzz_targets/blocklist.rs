//! Plain-text blocklists, as read from a file or URL (any bytes, decoded lossily as the
//! fetcher does), through the sanitiser: every entry it accepts is a prefix it could ban.
#![no_main]

use apiban::sanitise::{AllowList, Sanitiser};
use apiban::source::blocklist::parse_list;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let items = parse_list(&text);
    assert!(items.len() <= text.lines().count());
    let sanitiser = Sanitiser::new(16, 32, ["192.0.2.1".parse().unwrap()]);
    let allow = AllowList::new(["198.51.100.0/24".parse().unwrap()]);
    for item in items {
        assert!(!item.trim().is_empty());
        if let Ok(net) = sanitiser.check(item, &allow) {
            assert!(!allow.covers(&net));
            assert!(!net.contains(&"192.0.2.1".parse::<std::net::IpAddr>().unwrap()));
        }
    }
});
