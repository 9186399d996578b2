//! The fleet's chaos test (docs/fleet.md): operators ban and unban on every node at
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

mod checks;

use checks::*;

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
