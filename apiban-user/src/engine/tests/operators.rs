//! What operators and SIP proxies change: manual bans and their refusals, the allowlist,
//! comments, the ban API's batches.

use super::*;

#[test]
fn manual_bans_allows_and_the_allowlist() {
    let mut s = settings(100);
    s.allow = vec![net("5.5.0.0/16")];
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, s, 0).unwrap();
    assert!(e.enforcer().allow.contains(&net("5.5.0.0/16")));
    let r = e.apiban_batch(&strings(&["5.5.5.5", "6.6.6.6"]), "1".into(), 0);
    assert_eq!(r.skipped[&Rejection::Allowlisted], 1);
    // Manual bans take any prefix and survive the sweep without a TTL.
    e.ban(net("7.0.0.0/8"), None, Some("lab".into()), false, 0)
        .unwrap();
    assert!(e.ban(net("0.0.0.0/0"), None, None, true, 0).is_err());
    e.ban(
        net("8.8.8.8"),
        Some(Duration::from_secs(10)),
        None,
        false,
        0,
    )
    .unwrap();
    e.sweep(1000);
    assert_eq!(e.enforcer().deny, BTreeSet::from([net("7.0.0.0/8")]));
    // A manual allow pulls an already banned feed entry out of the maps.
    e.apiban_batch(&strings(&["6.6.6.6"]), "2".into(), 1000);
    e.allow_add(net("6.6.6.0/24"), 1000);
    assert!(!e.enforcer().deny.contains(&net("6.6.6.6")));
    assert!(e.enforcer().allow.contains(&net("6.6.6.0/24")));
    e.allow_remove(net("6.6.6.0/24"), 1001).unwrap();
    assert!(e.enforcer().deny.contains(&net("6.6.6.6")));
    assert!(
        e.allow_remove(net("5.5.0.0/16"), 1001).is_err(),
        "configured allows stay"
    );
    let (sources, applied) = e.unban(net("6.6.6.6"), 1002);
    assert_eq!((sources, applied.removed), (vec![SourceId::Apiban], 1));
}

#[test]
fn manual_bans_that_cut_the_host_off_or_do_nothing_are_refused() {
    let mut s = settings(100);
    s.allow = vec![net("192.0.2.0/24")];
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, s, 0).unwrap();
    e.set_own_addresses(vec!["203.0.113.5".parse().unwrap()], 0);
    let refused = |e: &mut Engine<MemoryEnforcer>, n: &str, force: bool| {
        e.ban(net(n), None, None, force, 0).unwrap_err().to_string()
    };
    assert!(refused(&mut e, "127.0.0.1", false).contains("loopback"));
    assert!(refused(&mut e, "::1", false).contains("loopback"));
    assert!(refused(&mut e, "127.0.0.0/4", false).contains("loopback"));
    let own = refused(&mut e, "203.0.113.0/24", false);
    assert!(
        own.contains("203.0.113.5, an address of this host"),
        "{own}"
    );
    assert!(own.contains("--force"), "{own}");
    let allowed = refused(&mut e, "192.0.2.7", false);
    assert!(
        allowed.contains("allowlist covers it (192.0.2.0/24)"),
        "{allowed}"
    );
    // Partly allowlisted is a real ban: the allowlist carves out its part.
    e.ban(net("192.0.0.0/16"), None, None, false, 0).unwrap();
    assert!(
        e.ban(
            net("1.2.3.4"),
            Some(Duration::from_millis(500)),
            None,
            false,
            0
        )
        .unwrap_err()
        .to_string()
        .contains("expires at once")
    );
    let long = "x".repeat(MAX_COMMENT_CHARS + 1);
    assert!(
        e.ban(net("1.2.3.4"), None, Some(long), false, 0)
            .unwrap_err()
            .to_string()
            .contains("at most 200")
    );
    e.ban(
        net("1.2.3.4"),
        None,
        Some("x".repeat(MAX_COMMENT_CHARS)),
        false,
        0,
    )
    .unwrap();
    // The operator insists.
    e.ban(net("203.0.113.0/24"), None, None, true, 0).unwrap();
    assert!(e.enforcer().deny.contains(&net("203.0.113.0/24")));
    assert!(refused(&mut e, "0.0.0.0/0", true).contains("whole address family"));
}

/// A comment reaches an operator's terminal in `list` and `check`: control characters
/// (escape sequences, BEL) are refused from every source that makes one.
#[test]
fn a_comment_with_control_characters_is_refused() {
    let (mut e, _) = Engine::start(MemoryEnforcer::default(), None, settings(100), 10).unwrap();
    let esc = Some("\u{1b}]0;pwned\u{7}".to_owned());
    let manual = e.ban(net("45.3.3.3/32"), None, esc.clone(), false, 11);
    assert!(
        manual
            .unwrap_err()
            .to_string()
            .contains("control character"),
        "the CLI's ban"
    );
    let api = e.api_ban(net("45.3.3.4/32"), Duration::from_secs(60), esc, 11);
    assert!(api.unwrap_err().to_string().contains("control character"));
    e.ban(
        net("45.3.3.5/32"),
        None,
        Some("ordinary: ÄÖ ✓".into()),
        false,
        11,
    )
    .unwrap();
}

/// A batch of ban API calls is applied to the dataplane and saved once, at its end: a
/// flood of calls costs one diff and one save per batch, not per call.
#[test]
fn a_batch_of_api_bans_is_applied_and_saved_once() {
    let (dir, store) = temp_store("api-batch");
    let (mut e, _) =
        Engine::start(MemoryEnforcer::default(), Some(store), settings(100), 10).unwrap();
    let saves = e.shared().counters.saves;
    e.begin_batch();
    for k in 1..=3 {
        let applied = e
            .api_ban(
                net(&format!("45.4.4.{k}/32")),
                Duration::from_secs(60),
                None,
                11,
            )
            .unwrap();
        assert!(applied.batched);
    }
    assert!(
        e.enforcer().deny.is_empty(),
        "nothing applied before the batch ends"
    );
    let applied = e.end_batch(11);
    assert_eq!(applied.added, 3);
    assert_eq!(e.enforcer().deny.len(), 3);
    assert_eq!(
        e.shared().counters.saves,
        saves + 1,
        "one save for the batch"
    );
    // Outside a batch, each change applies and saves at once again.
    e.api_ban(net("45.4.4.9/32"), Duration::from_secs(60), None, 12)
        .unwrap();
    assert_eq!(e.enforcer().deny.len(), 4);
    assert_eq!(e.shared().counters.saves, saves + 2);
    let _ = std::fs::remove_dir_all(dir);
}
