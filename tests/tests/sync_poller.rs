//! The sync engine end to end in one process: the APIBAN poller and blocklists feeding the
//! engine, against the local APIBAN-compatible server, with the engine's in-memory enforcer
//! (the real maps are exercised by `sync_dataplane`).

use std::{collections::BTreeSet, time::Duration};

use apiban::{
    engine::{Engine, EngineSettings, MemoryEnforcer},
    human::RateLimit,
    sanitise::Rejection,
    source::{
        apiban::{ApiKey, ApibanClient, ClientConfig},
        blocklist::{ListLocation, ListSpec},
    },
    state::StateStore,
    sync::{OwnerFault, PollSettings},
};
use ipnet::IpNet;
use tests::{
    fake_apiban::{FakeApiban, Fault},
    sync_harness::{SharedMemory, SyncHarness, TempDir},
};

const KEY: &str = "pollerTestKey";

fn client(server: &FakeApiban) -> ApibanClient {
    let mut config = ClientConfig::new(&server.base_url(), ApiKey::new(KEY).unwrap());
    config.timeout = Duration::from_millis(400);
    config.connect_timeout = Duration::from_millis(400);
    config.max_body = 64 * 1024;
    ApibanClient::new(config).unwrap()
}

fn poll(requests: u32, window_ms: u64) -> PollSettings {
    PollSettings {
        poll_interval: Duration::from_millis(200),
        resync_interval: Duration::from_secs(3600),
        rate_limit: RateLimit {
            requests,
            window: Duration::from_millis(window_ms),
        },
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(400),
        key_retry_max: Duration::from_millis(1600),
    }
}

fn engine(dir: &TempDir) -> Engine<SharedMemory> {
    let store = StateStore::open(&dir.path).unwrap();
    Engine::start(
        SharedMemory::default(),
        Some(store),
        EngineSettings::default(),
        apiban::sync::unix_now(),
    )
    .unwrap()
    .0
}

fn nets(items: &[&str]) -> BTreeSet<IpNet> {
    items
        .iter()
        .map(|s| apiban::sanitise::parse_net(s).unwrap())
        .collect()
}

fn addresses(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}.{i}")).collect()
}

type Harness = SyncHarness<SharedMemory>;

async fn wait_synced(h: &Harness, expected: &BTreeSet<IpNet>, timeout: Duration) {
    h.wait_for("the dataplane to hold the published list", timeout, |o| {
        h.denied() == *expected && o.engine.apiban.full_pull.is_none()
    })
    .await;
}

#[tokio::test]
async fn full_pull_over_batches_within_the_budget() {
    let server = FakeApiban::start(KEY);
    let good = addresses("45.1.0", 7);
    server.publish(&good);
    server.publish(&["10.1.2.3", "not-an-ip", "203.0.113.5"]);
    server.set_batch_size(2);
    // The server enforces the same limit: one request too many and it answers 429.
    server.set_rate_limit(Some((3, Duration::from_secs(1))));
    let dir = TempDir::new("apiban-poll-");
    let h = SyncHarness::start(engine(&dir), Some(client(&server)), poll(3, 1000), vec![]);

    let expected: BTreeSet<IpNet> = good
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .unwrap_or_else(|_| format!("{s}/32").parse().unwrap())
        })
        .collect();
    wait_synced(&h, &expected, Duration::from_secs(10)).await;

    let log = server.requests();
    // 5 batches of 2 and the "no new bans" answer.
    assert!(log.len() >= 6, "{} requests", log.len());
    assert!(
        log.iter().all(|r| r.status != 429),
        "budget exceeded: {log:#?}"
    );
    assert!(server.max_in_window(Duration::from_secs(1)) <= 3);
    assert_eq!(log[0].id.as_deref(), Some("100"));
    h.with(|o| {
        let c = &o.engine.counters;
        assert_eq!(c.skipped[&Rejection::SpecialPurpose], 2);
        assert_eq!(c.skipped[&Rejection::Invalid], 1);
        assert!(o.sync.last_success.is_some());
        assert!(o.engine.apiban.next_id.is_some());
    });
    // Saved as it went: the state file holds the full list.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["entries"].as_array().unwrap().len(), 7);
    assert!(!state.to_string().contains(KEY));
}

#[tokio::test]
async fn a_new_address_arrives_within_one_poll_interval() {
    let server = FakeApiban::start(KEY);
    server.publish(&["45.2.0.1"]);
    let dir = TempDir::new("apiban-poll-");
    let h = SyncHarness::start(engine(&dir), Some(client(&server)), poll(10, 1000), vec![]);
    wait_synced(&h, &nets(&["45.2.0.1"]), Duration::from_secs(5)).await;
    server.publish(&["45.2.0.2"]);
    // Poll interval 200 ms; allow a generous margin for a loaded 2-core machine.
    wait_synced(&h, &nets(&["45.2.0.1", "45.2.0.2"]), Duration::from_secs(2)).await;
    let ids: Vec<_> = server
        .requests()
        .iter()
        .filter_map(|r| r.id.clone())
        .collect();
    assert_eq!(
        ids.iter().filter(|i| *i == "100").count(),
        1,
        "incremental polls only: {ids:?}"
    );
}

#[tokio::test]
async fn a_429_storm_waits_full_windows_and_catches_up() {
    let server = FakeApiban::start(KEY);
    server.publish(&addresses("45.3.0", 5));
    server.set_batch_size(2);
    server.fail_next(Fault::RateLimited, 3);
    let window = Duration::from_millis(500);
    let dir = TempDir::new("apiban-poll-");
    let h = SyncHarness::start(engine(&dir), Some(client(&server)), poll(4, 500), vec![]);
    let expected: BTreeSet<IpNet> = addresses("45.3.0", 5)
        .iter()
        .map(|s| format!("{s}/32").parse().unwrap())
        .collect();
    wait_synced(&h, &expected, Duration::from_secs(10)).await;
    let log = server.requests();
    assert!(server.max_in_window(window) <= 4);
    for pair in log.windows(2) {
        if pair[0].status == 429 {
            let gap = pair[1].at.duration_since(pair[0].at);
            assert!(gap >= window, "retried {gap:?} after a 429");
        }
    }
    h.with(|o| assert_eq!(o.sync.requests["rate_limited"], 3));
}

#[tokio::test]
async fn a_rejected_key_keeps_enforcing_and_backs_off_from_the_poll_interval() {
    let server = FakeApiban::start(KEY);
    server.publish(&["45.4.0.1", "45.4.0.2"]);
    let dir = TempDir::new("apiban-poll-");
    let h = SyncHarness::start(engine(&dir), Some(client(&server)), poll(10, 1000), vec![]);
    wait_synced(&h, &nets(&["45.4.0.1", "45.4.0.2"]), Duration::from_secs(5)).await;

    server.set_fault(Some(Fault::Forbidden));
    let before = server.requests().len();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let rejected: Vec<std::time::Instant> =
        server.requests()[before..].iter().map(|r| r.at).collect();
    // Poll interval 200 ms, doubling to 1.6 s, each wait between 80% and 100% of its step:
    // at most 0.2 + 0.4 + 0.8 + 1.6 + 1.6 s fit in 4.5 s after the first 403.
    assert!(
        (4..=7).contains(&rejected.len()),
        "{} requests while the key was rejected",
        rejected.len()
    );
    let gaps: Vec<f64> = rejected
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64())
        .collect();
    for pair in gaps.windows(2).take(3) {
        assert!(
            pair[1] >= pair[0] * 1.4 || pair[1] >= 1.6 * 0.8,
            "the wait does not double up to the cap: {gaps:?}"
        );
    }
    assert!(gaps.iter().all(|g| *g <= 1.7), "over the cap: {gaps:?}");
    assert!(server.max_in_window(Duration::from_secs(1)) <= 10);
    h.with(|o| {
        assert_eq!(
            h.denied().len(),
            2,
            "bans must stay while the key is rejected"
        );
        assert!(o.sync.requests["key_rejected"] >= 1);
        assert!(o.sync.key_rejected_since.is_some());
    });
    server.set_fault(None);
    server.publish(&["45.4.0.3"]);
    wait_synced(
        &h,
        &nets(&["45.4.0.1", "45.4.0.2", "45.4.0.3"]),
        Duration::from_secs(3),
    )
    .await;
    h.with(|o| assert_eq!(o.sync.key_rejected_since, None));
}

#[tokio::test]
async fn an_empty_batch_with_the_same_id_does_not_spend_the_budget() {
    let server = FakeApiban::start(KEY);
    server.publish(&["45.9.0.1"]);
    let dir = TempDir::new("apiban-poll-");
    let h = SyncHarness::start(engine(&dir), Some(client(&server)), poll(20, 1000), vec![]);
    wait_synced(&h, &nets(&["45.9.0.1"]), Duration::from_secs(5)).await;
    server.set_fault(Some(Fault::EmptySameId));
    let before = server.requests().len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let during = server.requests().len() - before;
    // One request per 200 ms poll interval at most; a poller that asks again at once
    // spends its whole budget (20 per second).
    assert!(
        (2..=6).contains(&during),
        "{during} requests in 1 s of empty answers"
    );
    server.set_fault(None);
    server.publish(&["45.9.0.2"]);
    wait_synced(&h, &nets(&["45.9.0.1", "45.9.0.2"]), Duration::from_secs(3)).await;
}

#[tokio::test]
async fn server_errors_hangs_and_bad_bodies_back_off_and_recover() {
    let server = FakeApiban::start(KEY);
    server.publish(&["45.5.0.1"]);
    let dir = TempDir::new("apiban-poll-");
    let h = SyncHarness::start(engine(&dir), Some(client(&server)), poll(20, 1000), vec![]);
    wait_synced(&h, &nets(&["45.5.0.1"]), Duration::from_secs(5)).await;
    for fault in [
        Fault::ServerError,
        Fault::Hang,
        Fault::NonJson,
        Fault::Truncated,
        Fault::WrongShape,
        Fault::Huge,
        Fault::RateLimited400,
    ] {
        server.fail_next(fault, 1);
    }
    server.publish(&["45.5.0.2"]);
    wait_synced(
        &h,
        &nets(&["45.5.0.1", "45.5.0.2"]),
        Duration::from_secs(15),
    )
    .await;
    h.with(|o| {
        for outcome in [
            "server_error",
            "timeout",
            "bad_body",
            "body_too_large",
            "rate_limited",
        ] {
            assert!(
                o.sync.requests.contains_key(outcome),
                "{outcome}: {:?}",
                o.sync.requests
            );
        }
    });
    assert!(server.max_in_window(Duration::from_secs(1)) <= 20);
}

#[tokio::test]
async fn a_killed_full_pull_resumes_where_it_stopped() {
    let server = FakeApiban::start(KEY);
    let all = addresses("45.6.0", 10);
    server.publish(&all);
    server.set_batch_size(2);
    server.set_rate_limit(Some((2, Duration::from_secs(1))));
    let dir = TempDir::new("apiban-poll-");
    let h = SyncHarness::start(engine(&dir), Some(client(&server)), poll(2, 1000), vec![]);
    h.wait_for("two batches applied", Duration::from_secs(10), |_| {
        h.denied().len() >= 4
    })
    .await;
    let owner = h.kill();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let applied = owner.engine.enforcer().deny();
    let saved_id = owner
        .engine
        .apiban_cursor()
        .full_pull
        .clone()
        .expect("the pull was in progress")
        .next_id;
    drop(owner);
    let requests_before = server.requests().len();

    // A new process after a reboot: empty maps, the state file only.
    let restarted = engine(&dir);
    assert!(
        applied.is_subset(&restarted.enforcer().deny()),
        "an applied ban was lost"
    );
    let h = SyncHarness::start(restarted, Some(client(&server)), poll(2, 1000), vec![]);
    let expected: BTreeSet<IpNet> = all
        .iter()
        .map(|s| format!("{s}/32").parse().unwrap())
        .collect();
    wait_synced(&h, &expected, Duration::from_secs(15)).await;
    let log = server.requests();
    assert_eq!(
        log[requests_before].id.as_deref(),
        Some(saved_id.as_str()),
        "resumed from the saved ID"
    );
    // The budget survived the restart too: the server never had to refuse.
    assert!(log.iter().all(|r| r.status != 429), "{log:#?}");
}

#[tokio::test]
async fn reconciliation_removes_what_left_the_list() {
    let server = FakeApiban::start(KEY);
    server.publish(&["45.7.0.1", "45.7.0.2"]);
    let dir = TempDir::new("apiban-poll-");
    let mut settings = poll(20, 1000);
    settings.resync_interval = Duration::from_secs(1);
    let h = SyncHarness::start(engine(&dir), Some(client(&server)), settings, vec![]);
    wait_synced(&h, &nets(&["45.7.0.1", "45.7.0.2"]), Duration::from_secs(5)).await;
    server.unpublish(&["45.7.0.1"]);
    wait_synced(&h, &nets(&["45.7.0.2"]), Duration::from_secs(6)).await;
    h.with(|o| assert!(o.engine.counters.reconciled >= 1));
}

#[tokio::test]
async fn blocklists_from_a_file_and_a_url() {
    let server = FakeApiban::start(KEY);
    server.set_list(
        "voipbl.txt",
        "# VoIPBL\n46.1.0.0/24\n46.2.0.1 ; note\n192.168.0.1\nbogus\n",
    );
    let dir = TempDir::new("apiban-list-");
    let file = dir.path.join("netset.txt");
    std::fs::write(&file, "# FireHOL\n47.1.0.1\n2a01:4f8::/32\n").unwrap();
    let refresh = Duration::from_millis(200);
    let lists = vec![
        ListSpec {
            name: "voipbl".into(),
            location: ListLocation::Url(server.list_url("voipbl.txt")),
            refresh,
        },
        ListSpec {
            name: "netset".into(),
            location: ListLocation::File(file.clone()),
            refresh,
        },
    ];
    let state_dir = TempDir::new("apiban-list-state-");
    let h = SyncHarness::start(engine(&state_dir), None, poll(1, 1000), lists);
    let all = nets(&["46.1.0.0/24", "46.2.0.1", "47.1.0.1", "2a01:4f8::/32"]);
    h.wait_for("both lists applied", Duration::from_secs(5), |_| {
        h.denied() == all
    })
    .await;
    // An entry leaves the file: gone at the next refresh.
    std::fs::write(&file, "47.1.0.1\n").unwrap();
    let fewer = nets(&["46.1.0.0/24", "46.2.0.1", "47.1.0.1"]);
    h.wait_for("the removed entry to go", Duration::from_secs(5), |_| {
        h.denied() == fewer
    })
    .await;
    // The file disappears: its bans stay (until they expire) and the error is reported.
    std::fs::remove_file(&file).unwrap();
    h.wait_for("the failure to be reported", Duration::from_secs(5), |o| {
        o.sync
            .lists
            .get("netset")
            .is_some_and(|s| s.last_error.is_some())
    })
    .await;
    h.with(|o| {
        assert_eq!(h.denied(), fewer);
        let skipped = &o.engine.counters.skipped;
        assert!(skipped[&Rejection::SpecialPurpose] >= 1 && skipped[&Rejection::Invalid] >= 1);
    });
}

/// Enforcers with a bug or a stall in the owner's path.
struct FaultyEnforcer {
    inner: MemoryEnforcer,
    /// Panic on a ban (a bug), or stall for this long (a wedged syscall).
    stall: Option<Duration>,
}

impl apiban::engine::Enforcer for FaultyEnforcer {
    fn denied(&self) -> Result<BTreeSet<IpNet>, apiban::dataplane::DataplaneError> {
        self.inner.denied()
    }
    fn allowed(&self) -> Result<BTreeSet<IpNet>, apiban::dataplane::DataplaneError> {
        self.inner.allowed()
    }
    fn observed(&self) -> Result<BTreeSet<IpNet>, apiban::dataplane::DataplaneError> {
        self.inner.observed()
    }
    fn deny(
        &mut self,
        nets: &[IpNet],
        observed: bool,
    ) -> Result<(), apiban::dataplane::DataplaneError> {
        match self.stall {
            None => panic!("a bug in the owner's path"),
            Some(d) => std::thread::sleep(d),
        }
        self.inner.deny(nets, observed)
    }
    fn mark(
        &mut self,
        nets: &[IpNet],
        observed: bool,
    ) -> Result<(), apiban::dataplane::DataplaneError> {
        self.inner.mark(nets, observed)
    }
    fn undeny(&mut self, nets: &[IpNet]) -> Result<(), apiban::dataplane::DataplaneError> {
        self.inner.undeny(nets)
    }
    fn allow(&mut self, net: IpNet) -> Result<(), apiban::dataplane::DataplaneError> {
        self.inner.allow(net)
    }
    fn unallow(&mut self, net: IpNet) -> Result<(), apiban::dataplane::DataplaneError> {
        self.inner.unallow(net)
    }
}

fn faulty(stall: Option<Duration>) -> apiban::sync::Running<FaultyEnforcer> {
    let engine = Engine::start(
        FaultyEnforcer {
            inner: MemoryEnforcer::default(),
            stall,
        },
        None,
        EngineSettings::default(),
        apiban::sync::unix_now(),
    )
    .unwrap()
    .0;
    apiban::sync::spawn(
        engine,
        None,
        vec![],
        reqwest::Client::new(),
        apiban::sync::OwnerTiming::new(Duration::from_secs(60)),
    )
    .unwrap()
}

fn ban(net: &str) -> apiban::sync::Change {
    apiban::sync::Change::Ban {
        net: net.parse().unwrap(),
        ttl: None,
        comment: None,
        force: false,
    }
}

/// The watchdog ping is made of the owner's health: an owner that panicked must stop it, so
/// that the service manager restarts the agent (the lock it used to take was still there).
#[tokio::test]
async fn a_dead_owner_is_noticed() {
    let mut running = faulty(None);
    assert_eq!(running.owner_health(Duration::from_secs(5)), Ok(()));
    let answer = apiban::sync::send_change(&running.updates, ban("198.18.0.1/32")).await;
    assert!(answer.is_err(), "the owner died answering: {answer:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match running.owner_health(Duration::from_secs(5)) {
            Err(why) => {
                assert_eq!(why, OwnerFault::Stopped, "{why}");
                assert!(why.to_string().contains("panicked"), "{why}");
                break;
            }
            Ok(()) => assert!(
                std::time::Instant::now() < deadline,
                "a dead owner still counts as healthy"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.abort();
}

/// An owner stuck in one change beats no more: the ping stops while it is stuck, and comes
/// back once it gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_owner_is_noticed_and_recovers() {
    let mut running = faulty(Some(Duration::from_millis(2500)));
    let updates = running.updates.clone();
    let change =
        tokio::spawn(
            async move { apiban::sync::send_change(&updates, ban("198.18.0.2/32")).await },
        );
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let why = running
        .owner_health(Duration::from_secs(1))
        .expect_err("stuck for 1.8 s");
    assert!(matches!(why, OwnerFault::Silent(_)), "{why}");
    assert!(why.to_string().contains("no progress"), "{why}");
    assert!(change.await.unwrap().is_ok(), "the change gets through");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(running.owner_health(Duration::from_secs(1)), Ok(()));
    running.abort();
}
