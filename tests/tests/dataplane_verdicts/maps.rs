//! The map API: inserts, removals, batches, a full map, the legacy layout's upgrade.

use super::*;

#[test]
fn map_api_insert_remove_contains_and_lookup() {
    let mut h = Harness::new();
    let dp = &mut h.loaded.dataplane;
    for n in ["203.0.113.0/24", "2001:db8:1::/48"] {
        let n = net(n);
        assert!(!dp.is_denied(n).expect("contains"));
        dp.deny(n).expect("deny");
        assert!(dp.is_denied(n).expect("contains"));
    }
    // contains is exact: a covered host or a wider prefix is not "present".
    assert!(!dp.is_denied(net("203.0.113.5/32")).expect("contains"));
    assert!(!dp.is_denied(net("203.0.0.0/16")).expect("contains"));
    // Host bits are cleared: 203.0.113.99/24 is the same prefix.
    assert!(dp.is_denied(net("203.0.113.99/24")).expect("contains"));

    assert_eq!(
        dp.verdict_for(ip("203.0.113.5")).expect("verdict"),
        (Verdict::Dropped, Some(net("203.0.113.0/24")))
    );
    assert_eq!(
        dp.verdict_for(ip("2001:db8:1::5")).expect("verdict"),
        (Verdict::Dropped, Some(net("2001:db8:1::/48")))
    );
    dp.deny(net("203.0.113.5/32")).expect("deny host");
    assert_eq!(
        dp.verdict_for(ip("203.0.113.5")).expect("verdict").1,
        Some(net("203.0.113.5/32")),
        "the longest prefix matches"
    );
    dp.allow(net("203.0.113.5/32")).expect("allow");
    assert!(dp.is_allowed(net("203.0.113.5/32")).expect("allowed"));
    assert_eq!(
        dp.verdict_for(ip("203.0.113.5")).expect("verdict").0,
        Verdict::Allowed
    );
    dp.unallow(net("203.0.113.5/32")).expect("unallow");
    assert!(!dp.is_allowed(net("203.0.113.5/32")).expect("allowed"));

    dp.undeny(net("203.0.113.0/24")).expect("undeny");
    dp.undeny(net("203.0.113.0/24"))
        .expect("undeny twice is fine");
    assert!(!dp.is_denied(net("203.0.113.0/24")).expect("contains"));
    assert_eq!(
        dp.verdict_for(ip("203.0.113.6")).expect("verdict"),
        (Verdict::Passed, None)
    );
    assert_eq!(dp.deny_v4().count(), 1);
}

#[test]
fn batched_updates_match_one_by_one() {
    let mut h = Harness::new();
    let nets: Vec<IpNet> = (0..5000u32)
        .map(|i| IpNet::new(IpAddr::V4((0x2d00_0000 + i * 7).into()), 32).expect("net"))
        .chain((0..100u128).map(|i| {
            IpNet::new(
                IpAddr::V6((0x2001_0db8_0000_0000_0000_0000_0000_0000u128 + (i << 64)).into()),
                64,
            )
            .expect("net")
        }))
        .collect();
    let dp = &mut h.loaded.dataplane;
    assert_eq!(
        dp.deny_batch(&nets, false).expect("batch insert"),
        nets.len()
    );
    assert_eq!(dp.deny_v4().count(), 5000);
    assert_eq!(dp.deny_v6().count(), 100);
    for n in nets.iter().step_by(97) {
        assert!(
            dp.is_denied(*n).expect("contains"),
            "{n} present after batch"
        );
    }
    assert_eq!(dp.undeny_batch(&nets[..2500]).expect("batch delete"), 2500);
    assert_eq!(dp.deny_v4().count(), 2500);
    assert!(!dp.is_denied(nets[0]).expect("contains"));
    assert!(dp.is_denied(nets[2500]).expect("contains"));
}

#[test]
fn a_full_map_is_reported_and_keeps_existing_bans() {
    let mut h = Harness::with_capacities(Capacities {
        deny_v4: 4,
        ..Capacities::default()
    });
    let dp = &mut h.loaded.dataplane;
    for i in 1..=4u8 {
        dp.deny(net(&format!("203.0.113.{i}/32"))).expect("fits");
    }
    let err = dp
        .deny(net("203.0.113.5/32"))
        .expect_err("fifth entry does not fit");
    assert!(
        matches!(
            err,
            apiban::dataplane::DataplaneError::MapFull { capacity: 4, .. }
        ),
        "{err}"
    );
    let batch: Vec<IpNet> = (6..=9u8)
        .map(|i| net(&format!("203.0.113.{i}/32")))
        .collect();
    assert!(matches!(
        dp.deny_batch(&batch, false),
        Err(apiban::dataplane::DataplaneError::MapFull { .. })
    ));
    for i in 1..=4u8 {
        assert!(
            dp.is_denied(net(&format!("203.0.113.{i}/32")))
                .expect("contains")
        );
    }
}

/// The kernel reads `count` keys of the map's own key size (and values of its value size)
/// from a batch call's arrays: elements of another size must be refused before it does.
#[test]
fn batch_calls_refuse_elements_of_the_wrong_size() {
    use apiban::dataplane::batch;
    use apiban_common::{DenyEntry, map_names};
    use aya::maps::lpm_trie::Key;
    use std::os::fd::AsFd as _;
    let h = Harness::new();
    let map = aya::maps::MapData::from_pin(h.dir.path.join(map_names::DENY_V4))
        .expect("the pinned IPv4 trie");
    let fd = map.fd().as_fd();
    let refused = |outcome: batch::BatchOutcome, what: &str| {
        assert_eq!(outcome.done, 0, "{what}");
        let err = outcome.error.unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::InvalidInput,
            "{what}: {err}"
        );
        err.to_string()
    };
    let entry = DenyEntry {
        prefix_len: 24,
        ..Default::default()
    };
    let text = refused(batch::update(fd, &[[198u8, 18, 0]], &[entry]), "short keys");
    assert!(text.contains("key of 3 bytes"), "{text}");
    let text = refused(
        batch::update(fd, &[Key::new(24, [198u8, 18, 0, 0])], &[0u8]),
        "short values",
    );
    assert!(text.contains("value of 1 bytes"), "{text}");
    let text = refused(
        batch::update(
            fd,
            &[
                Key::new(24, [198u8, 18, 0, 0]),
                Key::new(24, [198u8, 18, 1, 0]),
            ],
            &[entry],
        ),
        "fewer values than keys",
    );
    assert!(text.contains("2 keys and 1 values"), "{text}");
    refused(batch::delete(fd, &[[0u8; 16]]), "long keys to delete");
    let ok = batch::update(fd, &[Key::new(24, [198u8, 18, 0, 0])], &[entry]);
    assert!(ok.error.is_none() && ok.done == 1, "{ok:?}");
    let ok = batch::delete(fd, &[Key::new(24, [198u8, 18, 0, 0])]);
    assert!(ok.error.is_none() && ok.done == 1, "{ok:?}");
}

/// Versions before the host tables kept hosts in pinned BPF hashes. An upgraded agent moves
/// them, hit counts included, into the tables before its program runs, and drops the pins.
#[test]
fn an_upgrade_moves_the_legacy_host_hashes_into_the_tables() {
    let mut h = Harness::new();
    let v4 = legacy::hash(
        4,
        &[
            ([203, 0, 113, 9].to_vec(), 7),
            ([203, 0, 113, 10].to_vec(), 0),
        ],
    );
    let v6: std::net::Ipv6Addr = "2001:db8:5::9".parse().expect("v6");
    let v6 = legacy::hash(16, &[(v6.octets().to_vec(), 2)]);
    let v4_pin = h
        .dir
        .path
        .join(apiban_common::map_names::LEGACY_DENY_V4_HOSTS);
    let v6_pin = h
        .dir
        .path
        .join(apiban_common::map_names::LEGACY_DENY_V6_HOSTS);
    legacy::pin(&v4, &v4_pin);
    legacy::pin(&v6, &v6_pin);
    h = h.reload();
    assert!(
        !v4_pin.exists() && !v6_pin.exists(),
        "legacy pins are removed"
    );
    let hits: Vec<(IpNet, u64)> = h
        .loaded
        .dataplane
        .deny_hits()
        .expect("hits")
        .into_iter()
        .map(|e| (e.net, e.entry.hits))
        .collect();
    for expected in [
        (net("203.0.113.9/32"), 7),
        (net("203.0.113.10/32"), 0),
        (net("2001:db8:5::9/128"), 2),
    ] {
        assert!(hits.contains(&expected), "{expected:?} in {hits:?}");
    }
    assert!(h.drops("203.0.113.9") && h.drops("203.0.113.10"));
    assert!(h.drops("2001:db8:5::9"));
    assert!(!h.drops("203.0.113.11"));
}

/// Builds a BPF hash laid out like the legacy host hashes, with raw syscalls: aya creates maps
/// only from an object file.
mod legacy {
    use std::{
        ffi::CString,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        path::Path,
    };

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_F_NO_PREALLOC: u32 = 1;

    fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> i64 {
        // SAFETY: `attr` is a zeroed bpf_attr of 128 bytes with the fields this command reads.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) }
    }

    /// A hash of `key_len`-octet addresses to `DenyEntry`, holding `(address, hits)`.
    pub fn hash(key_len: u32, entries: &[(Vec<u8>, u64)]) -> OwnedFd {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(BPF_MAP_TYPE_HASH) | u64::from(key_len) << 32;
        let value_size = size_of::<apiban_common::DenyEntry>() as u64;
        attr[1] = value_size | 1024 << 32;
        attr[2] = u64::from(BPF_F_NO_PREALLOC);
        let fd = bpf(BPF_MAP_CREATE, &mut attr);
        assert!(
            fd >= 0,
            "create a legacy hash: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a descriptor the kernel just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        for (key, hits) in entries {
            let value = apiban_common::DenyEntry {
                hits: *hits,
                last_hit_ns: if *hits > 0 { 1_000 } else { 0 },
                prefix_len: key_len * 8,
                _reserved: 0,
            };
            let mut attr = [0u64; 16];
            attr[0] = fd.as_raw_fd() as u64;
            attr[1] = key.as_ptr() as u64;
            attr[2] = (&raw const value) as u64;
            assert_eq!(
                bpf(BPF_MAP_UPDATE_ELEM, &mut attr),
                0,
                "fill the legacy hash"
            );
        }
        fd
    }

    pub fn pin(fd: &OwnedFd, path: &Path) {
        let path = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        let mut attr = [0u64; 16];
        attr[0] = path.as_ptr() as u64;
        attr[1] = fd.as_raw_fd() as u64;
        assert_eq!(
            bpf(BPF_OBJ_PIN, &mut attr),
            0,
            "pin the legacy hash: {}",
            std::io::Error::last_os_error()
        );
    }
}
