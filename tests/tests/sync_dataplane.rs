//! The sync engine driving the real XDP maps: a full pull from the local APIBAN server lands
//! in the deny maps, the allowlist in the allow maps, and a restart (with or without its
//! state file) adopts the pinned maps without a gap or a flush.

use std::{net::IpAddr, time::Duration};

use apiban::{
    dataplane::{
        Dataplane,
        loader::{self, LoadOptions},
    },
    engine::{Engine, EngineSettings},
    source::apiban::{ApiKey, ApibanClient, ClientConfig},
    state::StateStore,
    sync::{PollSettings, unix_now},
};
use apiban_common::Verdict;
use ipnet::IpNet;
use tests::{
    BpffsDir,
    fake_apiban::FakeApiban,
    require_root,
    sync_harness::{SyncHarness, TempDir},
};

const KEY: &str = "dataplaneKey";

fn settings() -> EngineSettings {
    EngineSettings {
        allow: vec!["45.9.0.7/32".parse().unwrap()],
        ..Default::default()
    }
}

fn load(dir: &BpffsDir) -> (loader::Enforcement, Dataplane, bool) {
    let loaded = loader::load(&LoadOptions {
        bpffs_dir: dir.path.clone(),
        ..Default::default()
    })
    .expect("load the XDP program");
    let adopted = loaded.adopted();
    let (ebpf, dataplane) = loaded.into_parts();
    (ebpf, dataplane, adopted)
}

fn verdict(dp: &Dataplane, addr: &str) -> Verdict {
    dp.verdict_for(addr.parse::<IpAddr>().unwrap()).unwrap().0
}

#[tokio::test]
async fn full_pull_into_the_maps_and_restart_without_a_flush() {
    require_root();
    let server = FakeApiban::start(KEY);
    let mut published: Vec<String> = (1..=600)
        .map(|i| format!("45.9.{}.{}", i / 250, i % 250 + 1))
        .collect();
    published.push("2a01:4f8:1::1".into());
    published.push("45.8.0.0/24".into());
    published.push("127.0.0.1".into());
    server.publish(&published);
    let bpffs = BpffsDir::new();
    let state = TempDir::new("apiban-dp-state-");

    let (ebpf, dataplane, adopted) = load(&bpffs);
    assert!(!adopted);
    let store = StateStore::open(&state.path).unwrap();
    let (engine, _) = Engine::start(dataplane, Some(store), settings(), unix_now()).unwrap();
    let mut config = ClientConfig::new(&server.base_url(), ApiKey::new(KEY).unwrap());
    config.timeout = Duration::from_secs(2);
    let poll = PollSettings {
        poll_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let h = SyncHarness::start(
        engine,
        Some(ApibanClient::new(config).unwrap()),
        poll,
        vec![],
    );
    h.wait_for("the full pull", Duration::from_secs(10), |o| {
        o.engine.apiban.last_full_pull.is_some()
    })
    .await;
    let owner = h.kill();
    let dp = owner.engine.enforcer();
    assert_eq!(verdict(dp, "45.9.0.2"), Verdict::Dropped);
    assert_eq!(verdict(dp, "45.9.2.101"), Verdict::Dropped);
    assert_eq!(verdict(dp, "2a01:4f8:1::1"), Verdict::Dropped);
    assert_eq!(
        verdict(dp, "45.8.0.77"),
        Verdict::Dropped,
        "CIDR from the feed"
    );
    assert_eq!(
        verdict(dp, "45.9.0.7"),
        Verdict::Passed,
        "allowlisted, so never inserted"
    );
    assert!(dp.is_allowed("45.9.0.7/32".parse().unwrap()).unwrap());
    assert_eq!(
        verdict(dp, "127.0.0.1"),
        Verdict::Passed,
        "special-purpose refused"
    );
    assert_eq!(verdict(dp, "45.10.0.1"), Verdict::Passed);
    let enforced = owner.engine.enforced().clone();
    assert_eq!(enforced.len(), 601, "600 - allowlisted + v6 + CIDR");
    drop(owner);
    drop(ebpf);

    // Restart: the pinned maps are adopted and already equal to the state: no change at all.
    let (ebpf, dataplane, adopted) = load(&bpffs);
    assert!(adopted);
    let store = StateStore::open(&state.path).unwrap();
    let (engine, report) = Engine::start(dataplane, Some(store), settings(), unix_now()).unwrap();
    assert_eq!((report.applied.added, report.applied.removed), (0, 0));
    assert_eq!(report.restored_entries, 601);
    drop(engine);
    drop(ebpf);

    // Restart with the state file lost: the pinned bans stay enforced.
    std::fs::remove_file(state.path.join("state.json")).unwrap();
    let (_ebpf, dataplane, _) = load(&bpffs);
    let store = StateStore::open(&state.path).unwrap();
    let (engine, report) = Engine::start(dataplane, Some(store), settings(), unix_now()).unwrap();
    assert_eq!(report.applied.removed, 0);
    let denied: std::collections::BTreeSet<IpNet> = engine.enforced().clone();
    assert_eq!(denied, enforced);
    assert_eq!(verdict(engine.enforcer(), "45.9.0.2"), Verdict::Dropped);
}
