//! Who may talk to the control socket and what they may do, and that no client, however
//! many or however idle, holds up the ledger's owner, enforcement, or a scrape.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::{fs::MetadataExt as _, fs::PermissionsExt as _, net::UnixStream},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tests::{
    agent::{apiban_bin, http_get},
    in_netns, require_root,
    scene::Scene,
    sh, unique_name, wait_until,
};

const N: usize = 20;
const FAST: [&str; 4] = ["--poll-interval", "1s", "--rate-limit", "20/2s"];
/// A user that exists nowhere: the kernel checks credentials, not /etc/passwd.
const UID: &str = "4242";

/// A system group for the test, deleted on drop.
struct Group {
    name: String,
    gid: u32,
}

impl Group {
    fn new() -> Self {
        let name = unique_name("apbro");
        sh("groupadd", &["--system", &name]);
        let line = sh("getent", &["group", &name]);
        let gid = line
            .split(':')
            .nth(2)
            .and_then(|g| g.parse().ok())
            .expect("the new group's GID");
        Self { name, gid }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// `apiban <args>` as uid 4242, with `groups` as its supplementary groups.
fn as_user(groups: Option<u32>, args: &[String]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", UID, "--regid", UID]);
    match groups {
        Some(g) => cmd.arg(format!("--groups={g}")),
        None => cmd.arg("--clear-groups"),
    };
    cmd.arg(apiban_bin()).args(args);
    cmd.output().expect("setpriv")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn the_control_group_may_read_and_only_root_may_change() {
    require_root();
    let group = Group::new();
    let mut s = Scene::new();
    s.api.publish(&["45.80.0.1"]);
    s.start(&[&FAST[..], &["--control-group", &group.name]].concat());
    s.wait_synced(Duration::from_secs(20));
    let sock = s.control_socket();
    let dir = sock.parent().unwrap();
    let (dir_meta, sock_meta) = (
        std::fs::metadata(dir).unwrap(),
        std::fs::metadata(&sock).unwrap(),
    );
    assert_eq!(
        (dir_meta.mode() & 0o777, dir_meta.gid()),
        (0o750, group.gid)
    );
    assert_eq!(
        (sock_meta.mode() & 0o777, sock_meta.gid()),
        (0o660, group.gid)
    );
    let sock_arg = sock.display().to_string();
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|a| (*a).to_owned())
            .chain(["--control-socket".to_owned(), sock_arg.clone()])
            .collect()
    };

    // A member reads.
    for args in [
        vec!["status"],
        vec!["check", "45.80.0.1"],
        vec!["list"],
        vec!["allow", "list"],
    ] {
        let out = as_user(Some(group.gid), &with(&args));
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let out = as_user(Some(group.gid), &with(&["check", "45.80.0.1"]));
    assert!(text(&out).contains("BANNED"), "{}", text(&out));
    // ...and changes nothing.
    for args in [
        vec!["ban", "45.80.9.9"],
        vec!["unban", "45.80.0.1"],
        vec!["allow", "add", "45.80.0.1"],
        vec!["reload"],
    ] {
        let out = as_user(Some(group.gid), &with(&args));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("may only read"),
            "{args:?}: {}",
            text(&out)
        );
    }
    assert_eq!(s.check("45.80.9.9")["verdict"], "not banned");
    assert_eq!(s.check("45.80.0.1")["verdict"], "banned");

    // Anyone else cannot even open the socket, and is told what would let them.
    let out = as_user(None, &with(&["status"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("permission denied on"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("--control-group"), "{}", text(&out));

    // The credentials are checked too, not only the file modes.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_user(None, &with(&["status"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains(&format!(
            "uid {UID} is neither root nor in the agent's --control-group"
        )),
        "{}",
        text(&out)
    );
    // Root may.
    s.agent().cli_ok(&["ban", "45.80.9.9"]);
    assert_eq!(s.check("45.80.9.9")["verdict"], "banned");
}

fn status_request(sock: &std::path::Path) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.write_all(b"{\"op\":\"status\"}\n")?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

#[test]
fn many_clients_and_an_idle_one_do_not_hold_up_the_owner() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.81.0.1"]);
    let banned = s.source("45.81.1.1");
    let later = s.source("45.81.2.1");
    s.start(&FAST);
    s.wait_synced(Duration::from_secs(20));
    let sock = s.control_socket();

    let mut idle = UnixStream::connect(&sock).expect("an idle client");
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let (sock, stop, answered) = (sock.clone(), stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut mine = 0;
                while !stop.load(Ordering::Relaxed) {
                    if status_request(&sock).is_ok_and(|a| a.starts_with("{\"ok\"")) {
                        mine += 1;
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                mine
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // While they hammer it, operator changes and the feed still go through at once.
    let asked = Instant::now();
    s.agent().cli_ok(&["ban", "45.81.1.0/24"]);
    let took = asked.elapsed();
    assert_eq!(s.probe(&[banned], N), vec![0]);
    s.api.publish(&["45.81.2.1"]);
    s.wait_verdict(later, "banned", Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let per_client: Vec<usize> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(
        took < Duration::from_secs(2),
        "a ban took {took:?} under load"
    );
    assert!(
        per_client.iter().all(|n| *n > 0),
        "every client was answered: {per_client:?}"
    );
    assert!(answered.load(Ordering::Relaxed) >= 100);

    // The idle client is told off and let go, within the request timeout.
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    idle.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("no request within 5s"), "{answer}");

    // A request past the bound is refused, not buffered.
    let mut big = UnixStream::connect(&sock).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = big.write_all(&vec![b'a'; 70 * 1024]);
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(answer.contains("request larger than 64 KiB"), "{answer}");
}

#[test]
fn idle_metrics_connections_do_not_stop_scrapes_or_enforcement() {
    require_root();
    let mut s = Scene::new();
    s.api.publish(&["45.82.0.1"]);
    let banned = s.source("45.82.0.1");
    s.start(&[&FAST[..], &["--metrics-addr", "127.0.0.1:9477"]].concat());
    s.wait_synced(Duration::from_secs(20));
    let addr: SocketAddr = "127.0.0.1:9477".parse().unwrap();
    // 1,000 clients that open a connection and send half a request head, slowly.
    let idle: Vec<TcpStream> = in_netns(&s.topo.server, move || {
        (0..1000)
            .filter_map(|_| {
                let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
                let _ = c.write_all(b"GET /metr");
                Some(c)
            })
            .collect()
    });
    assert!(idle.len() >= 990, "only {} connected", idle.len());
    let asked = Instant::now();
    let (code, body) = http_get(Some(&s.topo.server), addr, "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("apiban_packets_total"));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "a scrape took {:?} among idle connections",
        asked.elapsed()
    );
    assert!(s.status()["enforced"]["ipv4"] == 1);
    s.agent().cli_ok(&["ban", "45.82.1.0/24"]);
    assert_eq!(s.probe(&[banned], N), vec![0]);
    wait_until("a second scrape", Duration::from_secs(5), || {
        http_get(Some(&s.topo.server), addr, "/metrics").0 == 200
    });
    drop(idle);
}
