//! The fleet's chaos test (README, "A fleet"): operators ban and unban on every node at
//! once while, at seeded times, the member that leads etcd's Raft group is killed and
//! restarted, a node is cut off from etcd (its link down, or only etcd's answers lost) and
//! healed, and the node that polls APIBAN is SIGKILLed and restarted; APIBAN publishes
//! meanwhile. Afterwards every node's ledger equals etcd's and the others', each address
//! ends as the commands that were accepted imply, bans are dropped and unbans delivered on
//! every node, APIBAN saw no request beyond the budget and no slot recorded in etcd went
//! unsent, and no stretch without a leader outlasted the lease plus two seconds (more when the
//! Raft leader dies during the dead poller's lease: see `max_leaderless`).
//!
//! Each run prints its seed; `APIBAN_CHAOS_SEED=<seed>` replays one, and
//! `APIBAN_CHAOS_SEEDS=<n>` runs n (what `cargo xtask fuzz` does).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{fleet::Fleet, require_root, spawn_in_netns};

/// How long operators keep changing things; every fault is healed before it ends.
const RUN_FOR: Duration = Duration::from_secs(60);
/// The addresses operators ban and unban: few enough that nodes touch the same ones.
const POOL: u8 = 40;
/// The fleet's lease (`LEADER_LEASE_SECS`) plus two seconds: the longest a fleet with
/// quorum may go without a leader, when the leader itself dies or is cut off. etcd looks for
/// expired leases every 500 ms, then a node campaigns and this test samples every 100 ms:
/// CI saw 6.06 s after a plain SIGKILL of the poller (seed 18317654033625739024).
const MAX_LEADERLESS: Duration = Duration::from_secs(7);
/// The lease itself.
const LEASE: Duration = Duration::from_secs(5);
const AGENT_ARGS: [&str; 4] = ["--poll-interval", "1s", "--rate-limit", "5/10s"];
const BUDGET: (usize, Duration) = (5, Duration::from_secs(10));

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("APIBAN_CHAOS_SEED") {
        return vec![seed.parse().expect("APIBAN_CHAOS_SEED is a number")];
    }
    let n: usize = std::env::var("APIBAN_CHAOS_SEEDS")
        .map_or(1, |n| n.parse().expect("APIBAN_CHAOS_SEEDS is a number"));
    (0..n).map(|_| fastrand::u64(..)).collect()
}

#[test]
fn the_fleet_ends_as_operators_left_it_whatever_failed_meanwhile() {
    require_root();
    for seed in seeds() {
        eprintln!("chaos seed {seed} (APIBAN_CHAOS_SEED={seed} replays it)");
        run(seed);
    }
}

/// One command that a node accepted, and when it ran.
struct Accepted {
    addr: String,
    ban: bool,
    start: Instant,
    end: Instant,
}

/// A node as the operators' threads and the monitors see it: its control socket, and
/// whether it runs (taken for writing while it is killed or restarted, so that no command
/// is in flight when it dies: a command whose answer is lost has no known outcome).
#[derive(Clone)]
struct Handle {
    socket: PathBuf,
    up: Arc<RwLock<bool>>,
}

impl Handle {
    /// `apiban ban|unban addr` on this node: Some(accepted) when it ran, None when the node
    /// is down. Anything but acceptance or "not in the ban list" fails the test.
    fn command(&self, verb: &str, addr: &str) -> Option<bool> {
        let up = self.up.read().expect("lock");
        if !*up {
            return None;
        }
        let socket = self.socket.display().to_string();
        let out = tests::agent::apiban(&[verb, addr, "--control-socket", &socket]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return Some(true);
        }
        assert!(
            verb == "unban" && stderr.contains("is not in the ban list"),
            "apiban {verb} {addr} failed: {stderr}"
        );
        Some(false)
    }

    fn leads(&self) -> bool {
        let socket = self.socket.display().to_string();
        let out = tests::agent::apiban(&["status", "--json", "--control-socket", &socket]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|s| s["agent"]["cluster"]["leader"] == true)
    }
}

type Log = Arc<Mutex<Vec<Accepted>>>;

fn record(log: &Log, addr: &str, ban: bool, start: Instant) {
    log.lock().expect("lock").push(Accepted {
        addr: addr.to_owned(),
        ban,
        start,
        end: Instant::now(),
    });
}

/// An operator at node `handle`: bans and unbans pool addresses until `stop`.
fn operator(handle: Handle, seed: u64, log: Log, stop: Arc<AtomicBool>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while !stop.load(Ordering::Relaxed) {
        let addr = format!("45.72.0.{}", rng.u8(1..=POOL));
        let ban = rng.u8(0..10) < 6;
        let start = Instant::now();
        match handle.command(if ban { "ban" } else { "unban" }, &addr) {
            Some(true) => record(&log, &addr, ban, start),
            Some(false) => {}
            None => std::thread::sleep(Duration::from_millis(100)),
        }
        std::thread::sleep(Duration::from_millis(rng.u64(0..150)));
    }
}

/// Samples every node's `status` until `stop`: (when, whether any node led).
fn watch_leaders(handles: Vec<Handle>, stop: Arc<AtomicBool>) -> Vec<(Instant, bool)> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let led = handles.iter().any(Handle::leads);
        samples.push((Instant::now(), led));
        std::thread::sleep(Duration::from_millis(100));
    }
    samples
}

/// etcd's own election after its Raft leader dies, on a loaded two-core machine (the
/// members' election timeout is 1 s, randomised up to twice that, then a vote).
const ETCD_ELECTION: Duration = Duration::from_secs(4);

/// The longest the fleet may go without a leader, given when the polling node and the Raft
/// leader member were killed. Alone, each costs at most the lease plus two seconds. Together,
/// when the member dies while the dead node's lease still runs (or the node dies during
/// etcd's election), more: a new Raft leader gives every lease its whole TTL again, plus an
/// election timeout, as it cannot know how much was left (etcd-io/etcd#9395; its lease
/// checkpoints are off by default and only cover leases over 5 minutes). The orphaned lease
/// then outlives its node twice, and no node can lead until it expires.
fn max_leaderless(poller_kill: Duration, member_kill: Duration) -> Duration {
    let lease = LEASE;
    let compound = member_kill + ETCD_ELECTION > poller_kill && member_kill < poller_kill + lease;
    if compound {
        member_kill.saturating_sub(poller_kill)
            + ETCD_ELECTION
            + MAX_LEADERLESS
            + Duration::from_secs(2)
    } else {
        MAX_LEADERLESS
    }
}

/// The longest stretch the samples show without a leader, after the first leader.
fn longest_leaderless(samples: &[(Instant, bool)]) -> Duration {
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    let mut seen_leader = false;
    for &(at, led) in samples {
        match (led, since) {
            (true, Some(s)) => {
                longest = longest.max(at - s);
                since = None;
            }
            (false, None) if seen_leader => since = Some(at),
            _ => {}
        }
        seen_leader |= led;
    }
    if let (Some(s), Some(&(last, _))) = (since, samples.last()) {
        longest = longest.max(last - s);
    }
    longest
}

/// Reads the fleet's budget in etcd every 200 ms until `stop` (the list keeps each slot
/// for seconds): every request slot the fleet recorded.
fn watch_budget(f: &Fleet, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<BTreeSet<u64>> {
    let endpoints: Vec<String> = f
        .etcd
        .iter()
        .map(|m| format!("http://127.0.0.1:{}", m.client_port))
        .collect();
    let key = format!("{}apiban/requests", f.prefix);
    spawn_in_netns(&f.hub, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let mut slots = BTreeSet::new();
            let mut client = None;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if client.is_none() {
                    let options = etcd_client::ConnectOptions::new()
                        .with_timeout(Duration::from_secs(1))
                        .with_connect_timeout(Duration::from_secs(1));
                    client = etcd_client::Client::connect(&endpoints, Some(options))
                        .await
                        .ok();
                }
                let Some(c) = client.as_mut() else { continue };
                match c.get(key.as_str(), None).await {
                    Ok(answer) => {
                        for kv in answer.kvs() {
                            let sent: Vec<u64> =
                                serde_json::from_slice(kv.value()).expect("the budget is JSON");
                            slots.extend(sent);
                        }
                    }
                    // A member killed under the client: a new one next round.
                    Err(_) => client = None,
                }
            }
            slots
        })
    })
}

/// What each address may end as: the outcome of any accepted command that no other
/// accepted command of the same address started after (commands that overlap in time may
/// take effect in either order). An address nobody banned ends unbanned.
fn allowed_ends(log: &[Accepted]) -> BTreeMap<String, BTreeSet<bool>> {
    let mut by_addr: BTreeMap<&str, Vec<&Accepted>> = BTreeMap::new();
    for a in log {
        by_addr.entry(&a.addr).or_default().push(a);
    }
    by_addr
        .into_iter()
        .map(|(addr, cmds)| {
            let last_start = cmds.iter().map(|c| c.start).max().expect("one at least");
            let ends = cmds
                .iter()
                .filter(|c| c.end >= last_start)
                .map(|c| c.ban)
                .collect();
            (addr.to_owned(), ends)
        })
        .collect()
}

/// A node's manual and APIBAN records: (prefix, source).
fn ledger_of(handle: &Handle) -> BTreeSet<(String, String)> {
    let socket = handle.socket.display().to_string();
    let out = tests::agent::apiban_ok(&["list", "--json", "--control-socket", &socket]);
    let rows: serde_json::Value = serde_json::from_str(&out).expect("list answers JSON");
    rows.as_array()
        .expect("a list")
        .iter()
        .map(|r| {
            (
                r["net"].as_str().unwrap_or_default().to_owned(),
                r["source"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .filter(|(_, source)| source == "manual" || source == "apiban")
        .collect()
}

/// etcd's live manual and APIBAN records (tombstones left out).
fn ledger_in_etcd(f: &Fleet) -> BTreeSet<(String, String)> {
    let prefix = format!("{}ledger/records/", f.prefix);
    f.etcd_client(async move |c| {
        let options = etcd_client::GetOptions::new().with_prefix();
        let answer = c.get(prefix.as_str(), Some(options)).await.expect("read");
        answer
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let (source, net) = key.strip_prefix(&prefix)?.split_once('/')?;
                let value: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
                (value["removed"] != true && (source == "manual" || source == "apiban"))
                    .then(|| (net.to_owned(), source.to_owned()))
            })
            .collect()
    })
}

/// A fault and its healing, at seeded times from the start.
struct Schedule {
    member_kill: Duration,
    member_down_for: Duration,
    cut: Duration,
    cut_for: Duration,
    cut_node: usize,
    answers_only: bool,
    poller_kill: Duration,
    poller_down_for: Duration,
    publish_at: Vec<Duration>,
}

impl Schedule {
    fn new(rng: &mut fastrand::Rng) -> Self {
        let secs = |rng: &mut fastrand::Rng, lo: u64, hi: u64| {
            Duration::from_millis(rng.u64(lo * 1000..hi * 1000))
        };
        let mut publish_at: Vec<Duration> = (0..4).map(|_| secs(rng, 2, 50)).collect();
        publish_at.sort();
        Self {
            member_kill: secs(rng, 5, 25),
            member_down_for: secs(rng, 3, 8),
            cut: secs(rng, 10, 32),
            cut_for: secs(rng, 6, 15),
            cut_node: rng.usize(0..3),
            answers_only: rng.bool(),
            poller_kill: secs(rng, 20, 45),
            poller_down_for: secs(rng, 2, 6),
            publish_at,
        }
    }
}

fn run(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let plan = Schedule::new(&mut rng);
    let mut f = Fleet::new(3);
    f.api.set_rate_limit(Some(BUDGET));
    let stop_budget = Arc::new(AtomicBool::new(false));
    let budget = watch_budget(&f, stop_budget.clone());
    for i in 0..3 {
        f.start(i, &AGENT_ARGS);
    }
    f.wait_leader(Duration::from_secs(20));
    let handles: Vec<Handle> = f
        .nodes
        .iter()
        .map(|n| Handle {
            socket: n.scene.control_socket(),
            up: Arc::new(RwLock::new(true)),
        })
        .collect();
    let log: Log = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let leaders = {
        let (h, s) = (handles.clone(), stop.clone());
        std::thread::spawn(move || watch_leaders(h, s))
    };
    let operators: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let (h, l, s) = (h.clone(), log.clone(), stop.clone());
            let seed = seed.wrapping_add(i as u64 + 1);
            std::thread::spawn(move || operator(h, seed, l, s))
        })
        .collect();

    let start = Instant::now();
    let due = |at: Duration| start.elapsed() >= at;
    let (mut member_down, mut member_back) = (None, false);
    let (mut cut, mut healed) = (false, false);
    let (mut poller, mut poller_back) = (None, false);
    let (mut member_killed_at, mut poller_killed_at) = (None, None);
    let mut published: Vec<String> = Vec::new();
    // When the poller's budget write could reach etcd and its answer be lost or come too
    // late (see `check_budget`): a member's death and etcd's election, the cut, the second
    // before the poller's death.
    let mut unknowable: Vec<(u64, u64)> = Vec::new();
    let (mut cut_window, mut member_window) = (0, 0);
    while start.elapsed() < RUN_FOR {
        if member_down.is_none() && due(plan.member_kill) {
            let m = f.etcd_leader();
            eprintln!("{:?}: the Raft leader, member {m}, killed", start.elapsed());
            member_window = unknowable.len();
            unknowable.push((unix_ms() - 500, u64::MAX));
            f.etcd[m].kill();
            member_killed_at = Some(start.elapsed());
            member_down = Some(m);
        }
        if let (Some(m), false) = (member_down, member_back)
            && due(plan.member_kill + plan.member_down_for)
        {
            f.etcd[m].restart();
            // etcd's own election after the member rejoins.
            unknowable[member_window].1 = unix_ms() + 3_000;
            member_back = true;
        }
        if !cut && due(plan.cut) {
            cut_window = unknowable.len();
            unknowable.push((unix_ms() - 500, u64::MAX));
            cut_off(&f, &handles, &log, plan.cut_node, plan.answers_only);
            eprintln!("{:?}: node {} cut off", start.elapsed(), plan.cut_node);
            cut = true;
        }
        if cut && !healed && due(plan.cut + plan.cut_for) {
            heal(&f, plan.cut_node, plan.answers_only);
            unknowable[cut_window].1 = unix_ms();
            healed = true;
        }
        if poller.is_none() && due(plan.poller_kill) {
            let p = f.leader().expect("a node leads");
            poller_killed_at = Some(start.elapsed());
            eprintln!("{:?}: the poller, node {p}, SIGKILLed", start.elapsed());
            kill_maker_then_unban(&mut f, &handles, &log, p);
            unknowable.push((unix_ms() - 1000, unix_ms()));
            poller = Some(p);
        }
        if let (Some(p), false) = (poller, poller_back)
            && due(plan.poller_kill + plan.poller_down_for)
        {
            f.start(p, &AGENT_ARGS);
            *handles[p].up.write().expect("lock") = true;
            poller_back = true;
        }
        if published.len() < plan.publish_at.len() && due(plan.publish_at[published.len()]) {
            let addr = format!("45.74.0.{}", published.len() + 1);
            f.api.publish(&[&addr]);
            published.push(addr);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for o in operators {
        o.join().expect("an operator thread");
    }
    let leaders = leaders.join().expect("the leader monitor");
    assert!(member_back && healed && poller_back, "every fault healed");

    converge(&f, &handles, &published);
    stop_budget.store(true, Ordering::Relaxed);
    let slots = budget.join().expect("the budget monitor");
    let log = std::mem::take(&mut *log.lock().expect("lock"));
    check_ends(&mut f, &handles, &log, seed);
    check_budget(&f, &slots, &unknowable, seed);
    let longest = longest_leaderless(&leaders);
    let allowed = max_leaderless(
        poller_killed_at.expect("the poller was killed"),
        member_killed_at.expect("a member was killed"),
    );
    assert!(
        longest <= allowed,
        "seed {seed}: the fleet went {longest:?} without a leader (at most {allowed:?})\n{}",
        f.logs()
    );
    eprintln!(
        "seed {seed}: {} commands accepted, longest without a leader {longest:?}, {} APIBAN \
         requests, {} slots",
        log.len(),
        f.api.requests().len(),
        slots.len()
    );
}

/// Cuts node `i` off, with an operator's ban just before and its unban right after: the
/// unban, made while the ban's write may still be in flight, must win. A node that is down
/// (the poller, SIGKILLed moments before) is cut off with nothing in flight.
fn cut_off(f: &Fleet, handles: &[Handle], log: &Log, i: usize, answers_only: bool) {
    let addr = "45.73.0.1";
    let start = Instant::now();
    let Some(banned) = handles[i].command("ban", addr) else {
        heal_or_cut(f, i, answers_only, false);
        return;
    };
    assert!(banned, "the ban before the cut was refused");
    record(log, addr, true, start);
    heal_or_cut(f, i, answers_only, false);
    let start = Instant::now();
    assert_eq!(handles[i].command("unban", addr), Some(true));
    record(log, addr, false, start);
}

fn heal(f: &Fleet, i: usize, answers_only: bool) {
    heal_or_cut(f, i, answers_only, true);
}

fn heal_or_cut(f: &Fleet, i: usize, answers_only: bool, up: bool) {
    if answers_only {
        f.set_answers_to(i, up);
    } else {
        f.nodes[i].set_hub_link(up);
    }
}

/// The poller bans an address and is SIGKILLed at once; another node unbans it once it
/// sees the ban (if the ban reached etcd before the kill): the unban must survive the
/// maker's return, which sends its unconfirmed ban again.
fn kill_maker_then_unban(f: &mut Fleet, handles: &[Handle], log: &Log, maker: usize) {
    let addr = "45.73.0.2";
    let start = Instant::now();
    let mut up = handles[maker].up.write().expect("lock");
    let socket = handles[maker].socket.display().to_string();
    tests::agent::apiban_ok(&["ban", addr, "--control-socket", &socket]);
    record(log, addr, true, start);
    f.nodes[maker].scene.kill9();
    *up = false;
    drop(up);
    let other = &handles[(maker + 1) % 3];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let start = Instant::now();
        if other.command("unban", addr) == Some(true) {
            record(log, addr, false, start);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every node holds nothing pending and the same records as etcd, APIBAN's
/// publications among them.
fn converge(f: &Fleet, handles: &[Handle], published: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let Err(why) = converged(f, handles, published) else {
            return;
        };
        assert!(
            Instant::now() < deadline,
            "the fleet did not converge within 60 s after healing: {why}\n{}",
            f.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn converged(f: &Fleet, handles: &[Handle], published: &[String]) -> Result<(), String> {
    let etcd = ledger_in_etcd(f);
    let missing: Vec<_> = published
        .iter()
        .filter(|a| !etcd.contains(&(format!("{a}/32"), "apiban".to_owned())))
        .collect();
    if !missing.is_empty() {
        return Err(format!("APIBAN's {missing:?} not in etcd"));
    }
    for (node, handle) in f.nodes.iter().zip(handles) {
        let pending = &node.scene.status()["agent"]["cluster"]["pending_changes"];
        if *pending != 0 {
            return Err(format!("{} has {pending} changes pending", node.name));
        }
        let held = ledger_of(handle);
        if held != etcd {
            let differ: Vec<_> = held.symmetric_difference(&etcd).collect();
            return Err(format!("{} differs from etcd in {differ:?}", node.name));
        }
    }
    Ok(())
}

/// Each address ends as an accepted command left it, and every node enforces that: a few
/// banned and unbanned addresses probed with packets on each.
fn check_ends(f: &mut Fleet, handles: &[Handle], log: &[Accepted], seed: u64) {
    let held: BTreeSet<String> = ledger_of(&handles[0])
        .into_iter()
        .filter(|(_, source)| source == "manual")
        .map(|(net, _)| net.trim_end_matches("/32").to_owned())
        .collect();
    let ends = allowed_ends(log);
    for (addr, allowed) in &ends {
        let banned = held.contains(addr);
        assert!(
            allowed.contains(&banned),
            "seed {seed}: {addr} ends {} but the last accepted commands leave it {allowed:?}",
            if banned { "banned" } else { "unbanned" },
        );
    }
    let never: Vec<_> = held.iter().filter(|a| !ends.contains_key(*a)).collect();
    assert!(
        never.is_empty(),
        "seed {seed}: banned by no command: {never:?}"
    );
    let banned: Vec<&String> = held.iter().take(3).collect();
    let unbanned: Vec<&String> = ends.keys().filter(|a| !held.contains(*a)).take(3).collect();
    for node in &mut f.nodes {
        let sources: Vec<_> = banned
            .iter()
            .chain(&unbanned)
            .map(|a| node.scene.source(a.as_str()))
            .collect();
        let arrived = node.scene.probe(&sources, 3);
        let want: Vec<usize> = banned
            .iter()
            .map(|_| 0)
            .chain(unbanned.iter().map(|_| 3))
            .collect();
        assert_eq!(
            arrived, want,
            "seed {seed}: on {}, of {banned:?} (banned) and {unbanned:?} (not)",
            node.name
        );
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// APIBAN saw no more requests than the budget allows in any window, and each slot the
/// fleet recorded in etcd was spent on a request that went out (within the seconds a slow
/// etcd may take between recording it and the request leaving). Except where etcd failed
/// under the poller: a budget write that reached etcd while its answer was lost (the poller
/// cut off or killed, the member it wrote to killed), or that etcd took too long to answer
/// (its election), is counted as spent, since a request the next leader did not count
/// could break APIBAN's limit; those slots are reported, not failed.
fn check_budget(f: &Fleet, slots: &BTreeSet<u64>, unknowable: &[(u64, u64)], seed: u64) {
    let requests: Vec<u64> = f
        .api
        .requests()
        .iter()
        .filter(|r| !r.path.starts_with("/lists/"))
        .map(|r| r.unix_ms)
        .collect();
    let most = f.api.max_in_window(BUDGET.1);
    assert!(
        most <= BUDGET.0,
        "seed {seed}: {most} requests in {:?}\n{}",
        BUDGET.1,
        f.api.log_table()
    );
    let (excused, unsent): (Vec<u64>, Vec<u64>) = slots
        .iter()
        .filter(|&&slot| {
            !requests
                .iter()
                .any(|&sent| sent + 100 >= slot && sent <= slot + 5_000)
        })
        .partition(|&&slot| unknowable.iter().any(|&(a, b)| (a..=b).contains(&slot)));
    if !excused.is_empty() {
        eprintln!("seed {seed}: slots recorded while their outcome was unknown: {excused:?}");
    }
    let unsent: Vec<i64> = unsent
        .iter()
        .map(|&slot| slot as i64 - requests.first().map_or(0, |&r| r as i64))
        .collect();
    assert!(
        unsent.is_empty(),
        "seed {seed}: slots recorded in etcd with no request sent, at (ms from the first \
         request) {unsent:?}\n{}\n{}",
        f.api.log_table(),
        f.logs()
    );
    assert!(!slots.is_empty(), "the monitor saw the fleet's budget");
}
