//! `apiban run`: wires the dataplane, the engine, the sync tasks, the control socket,
//! /metrics and systemd together, and handles the signals that stop and reload it.
//!
//! Over 600 lines because `serve` starts every task in one function, in the order the
//! agent comes up (state, maps, owner, fleet, detection, sockets, then READY): read top to
//! bottom, it is the startup sequence. What it decides along the way is in `setup`, what it
//! tells the operator in `report`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

mod features;
mod reload;
mod report;
mod setup;

pub use setup::client_from_config;
use setup::{apiban_client, control_access, info};

use report::{
    log_stats, report_dry_run, report_stop, wait_for_interfaces, warn_unconfigured_attachments,
};

pub use self::reload::ReloadError;
use self::reload::reload;
use crate::{
    config::{self, AgentConfig, ApibanSettings, KeySource, RunArgs},
    control::{self, ControlContext},
    dataplane::{Scope, kernel::Feature, loader, netlink},
    engine::{Enforcer, Engine, MemoryEnforcer},
    metrics,
    notify::Notifier,
    source::apiban::{ApiKey, ApibanClient, ClientConfig},
    state::StateStore,
    status::{AgentInfo, InterfaceInfo},
    sync::{self, PollSettings},
};

/// How often expired bans are swept: every minute, or more often with a TTL so short that a
/// minute would keep entries noticeably past it.
fn sweep_every(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

fn scope_text(scope: &Scope) -> String {
    match scope {
        Scope::All => "all traffic".into(),
        Scope::Ports(p) => {
            let ports: Vec<String> = p.iter().map(u16::to_string).collect();
            format!("TCP/UDP to ports {}", ports.join(","))
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT. `args` are kept to re-resolve on SIGHUP.
pub fn run(args: RunArgs, mut config: AgentConfig) -> anyhow::Result<()> {
    unblock_signals();
    crate::conn_slots::raise_open_files_limit();
    control_access(&config)?;
    let started_at = sync::unix_now();
    let apiban = apiban_client(&config.apiban)?;
    if apiban.is_none() {
        tracing::warn!(
            "no APIBAN key (--api-key, APIBAN_KEY, --api-key-file or api-key in the config): \
             enforcing saved bans, lists and manual bans only; get a free key at \
             https://apiban.org/getkey.html"
        );
    }
    if config.process.dry_run {
        tracing::info!("dry run: fetching and reporting only; nothing is loaded or attached");
        let engine = Engine::start(
            MemoryEnforcer::default(),
            None,
            config.engine.clone(),
            started_at,
        )
        .context("cannot start the engine")?
        .0;
        let info = info(&config, Vec::new(), apiban.is_some(), started_at);
        return match serve(args, config, engine, apiban, info, None)? {
            Exit::Stopped { .. } => Ok(()),
            Exit::OwnerDied(why) => anyhow::bail!("{why}"),
        };
    }

    let kernel = features::probe();
    features::announce(kernel);
    features::fit(&mut config.detect, kernel).context("the kernel cannot run what is asked")?;
    wait_for_interfaces(&config.attach.ifaces, config.attach.iface_wait)?;
    let options = loader::LoadOptions {
        bpffs_dir: config.attach.bpffs_dir.clone(),
        debug_events: config.attach.debug_events,
        adopt_from: config.attach.ifaces.clone(),
        ..Default::default()
    };
    let mut loaded = loader::load(&options).context("could not load the XDP program")?;
    if let loader::Adoption::Interface { iface, prog_id } = &loaded.adoption {
        tracing::info!(
            iface,
            prog_id,
            dir = %config.attach.bpffs_dir.display(),
            "nothing was pinned (the last agent's bpffs went with its mount namespace): \
             adopted the maps of the program attached to {iface} and pinned them again"
        );
    }
    loaded
        .dataplane
        .set_scope(&config.scope)
        .context("could not set the port scope")?;
    loaded
        .reserve_counter_slots(&config.attach.ifaces)
        .context("could not give the interfaces their counters")?;
    let adoption = loaded.adoption.clone();
    let detect_tap = crate::dataplane::detect::DetectTap::take(loaded.ebpf_mut())
        .context("could not open the detection maps")?;
    let capture_tap = crate::dataplane::capture::CaptureTap::take(loaded.ebpf_mut())
        .context("could not open the capture maps")?;
    // A capture cut short by a crash left the program's switch on; no capture runs now.
    loaded
        .dataplane
        .set_flag(apiban_common::DataplaneConfig::CAPTURE, false)
        .context("could not switch off a capture left running")?;
    let (mut enforcement, dataplane) = loaded.into_parts();
    let reader = dataplane
        .reader()
        .context("could not open the deny maps for reading")?;
    // The saved ledger goes into the maps before the program goes live: after a reboot the
    // maps are new and empty, and the first packet must already meet every saved ban.
    let store = StateStore::open(&config.process.state_dir).with_context(|| {
        format!(
            "cannot use the state directory {}",
            config.process.state_dir.display()
        )
    })?;
    let (engine, report) = Engine::start(dataplane, Some(store), config.engine.clone(), started_at)
        .context("cannot restore the ban list")?;
    tracing::info!(
        restored = report.restored_entries,
        added = report.applied.added,
        removed = report.applied.removed,
        "ban list restored from state"
    );
    let mut interfaces = Vec::new();
    for iface in &config.attach.ifaces {
        let mode = enforcement
            .attach(iface, config.attach.xdp_mode)
            .with_context(|| format!("could not attach to {iface}"))?;
        let up = loader::ifindex(iface)
            .and_then(|i| netlink::link(i).ok().flatten())
            .map(|l| l.up);
        tracing::info!(
            iface,
            %mode,
            prog_id = enforcement.program_id(),
            adopted = %adoption,
            link = match up {
                Some(true) => "up",
                Some(false) => "down: enforcing from the moment it comes up",
                None => "unknown",
            },
            "XDP program attached (checked with the kernel)"
        );
        // The answers' side of detection: an interface without it still enforces.
        let egress = match kernel.why_off(Feature::DetectionAnswers) {
            // Said at start, with the other features.
            Some(why) => loader::EgressHook::Off(why),
            None => match enforcement.attach_egress(iface) {
                Ok(()) => {
                    tracing::info!(
                        iface,
                        "egress classifier attached (tcx, checked with the kernel): detection sees the server's answers"
                    );
                    loader::EgressHook::Tcx
                }
                Err(e) => {
                    let why = crate::error_chain(&e);
                    tracing::warn!(iface, error = %why, "egress classifier not attached (it needs tcx, Linux 6.6): detection sees requests only");
                    loader::EgressHook::Off(why)
                }
            },
        };
        interfaces.push(InterfaceInfo {
            name: iface.clone(),
            mode: mode.to_string(),
            egress: egress.describe(),
        });
    }
    warn_unconfigured_attachments(&config);
    let info = info(&config, interfaces, apiban.is_some(), started_at);
    match serve(
        args,
        config,
        engine,
        apiban,
        info,
        Some(Taps {
            reader,
            detect: detect_tap,
            capture: capture_tap,
        }),
    )? {
        Exit::Stopped { enforced } => {
            report_stop(&enforcement, Some(enforced));
            Ok(())
        }
        Exit::OwnerDied(why) => {
            report_stop(&enforcement, None);
            anyhow::bail!("{why}; exiting so that the service manager restarts the agent")
        }
    }
}

/// What reads the program besides the ledger's owner: the maps' reader, detection's and
/// the capture's maps. None in a dry run.
struct Taps {
    reader: crate::dataplane::DataplaneReader,
    detect: crate::dataplane::detect::DetectTap,
    capture: crate::dataplane::capture::CaptureTap,
}

/// The ban API's server, if `--ban-api` asks for one: the token read, the address bound.
async fn start_ban_api(
    config: &AgentConfig,
    updates: tokio::sync::mpsc::Sender<sync::Update>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = config.process.ban_api else {
        return Ok(None);
    };
    let token = match &config.process.ban_api_token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("cannot read the ban API token file {}", path.display())
            })?;
            if text.trim().is_empty() {
                anyhow::bail!(
                    "the ban API token file {} is empty; put a token in it",
                    path.display()
                );
            }
            Some(text.trim().to_owned())
        }
        None => {
            tracing::warn!(
                %addr,
                "the ban API takes requests without a token: any local user, or a server-side \
                 request forgery in any local web application, can ban, unban and flush; give \
                 it ban-api-token-file (the package makes /etc/apiban/ban-api-token)"
            );
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot serve the ban API on {addr}; pick another --ban-api or `off`")
    })?;
    let local = listener.local_addr().unwrap_or(addr);
    let settings = crate::ban_api::BanApiSettings {
        token,
        ttl: config.process.ban_api_ttl,
        ttl_max: crate::ban_api::TTL_MAX,
        source: match &config.cluster {
            Some(c) if !config.process.ban_api_share => format!("api:{}", c.node),
            _ => "api".into(),
        },
    };
    tracing::info!(%local, "ban API at http://{local}/ (addip, blockip, removeip, v1/bans)");
    Ok(Some(tokio::spawn(crate::ban_api::serve(
        listener, settings, updates,
    ))))
}

fn serve<E: Enforcer + Send + 'static>(
    args: RunArgs,
    mut config: AgentConfig,
    mut engine: Engine<E>,
    apiban: Option<(ApibanClient, PollSettings)>,
    info: AgentInfo,
    taps: Option<Taps>,
) -> anyhow::Result<Exit> {
    let (dataplane, detect_tap, capture_tap) = match taps {
        Some(t) => (Some(t.reader), Some(t.detect), Some(t.capture)),
        None => (None, None, None),
    };
    let now = sync::unix_now();
    let configured: Vec<&str> = config.lists.iter().map(|l| l.name.as_str()).collect();
    // In a fleet, the leader's configuration says which lists there are.
    let local_lists = config.cluster.is_none();
    for name in engine.list_names() {
        if local_lists && !configured.contains(&name.as_str()) {
            let (records, _) = engine.drop_list(&name, now);
            tracing::info!(list = %name, records, "blocklist no longer configured; its bans are dropped");
        }
    }
    // Timers and sockets are looked at between any two tasks, not every 61: while clients
    // keep a task or two busy building answers, the poller's HTTP exchange, the owner's
    // inbox and the watchdog must still move.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .event_interval(2)
        .build()
        .context("could not start the async runtime")?;
    let mut key_in_use = apiban.as_ref().map(|(client, _)| client.key().clone());
    runtime.block_on(async move {
        let notifier = Notifier::from_env();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("cannot build the HTTP client")?;
        // The owner beats well within the watchdog's timeout, so an idle owner always has.
        let watchdog_timeout = notifier.watchdog_interval().map(|half| half * 2);
        let timing = sync::OwnerTiming {
            heartbeat_every: watchdog_timeout
                .map_or(Duration::from_secs(1), |t| t / 4)
                .clamp(Duration::from_millis(50), Duration::from_secs(1)),
            // Detection's bans may be far shorter than the feeds' (--detect-ttl, and the
            // shorter --detect-forgeable-ttl).
            ..sync::OwnerTiming::new(sweep_every(
                config
                    .engine
                    .ttl
                    .min(config.detect.ttl)
                    .min(config.detect.forgeable_ttl),
            ))
        };
        let own = engine.own_addresses();
        let (link, ends) = match &config.cluster {
            Some(c) => {
                // A re-sighting rewrites a record in etcd only once it moves its expiry by a
                // quarter of the TTL: a ban then lives at least 3/4 of the TTL after it was
                // last seen, and etcd's history stays small.
                engine.join_cluster(&c.prefix, config.engine.ttl.as_secs() / 4);
                if !config.process.ban_api_share {
                    engine.set_api_source(Some(c.node.clone()));
                }
                let etcd = crate::cluster::endpoint_addresses(&c.endpoints);
                tracing::info!(
                    addresses = ?etcd,
                    "the fleet's etcd endpoints: no feed, record in etcd or unforced ban may cover them"
                );
                let dropped = engine.set_fleet_addresses(etcd, crate::sync::unix_now());
                if !dropped.is_empty() {
                    tracing::warn!(
                        ?dropped,
                        "bans that covered the fleet's etcd endpoints were dropped"
                    );
                }
                let (link, ends) = crate::cluster::link();
                (Some(link), Some(ends))
            }
            None => (None, None),
        };
        let proven_view = crate::proven_view::ProvenView::default();
        engine.set_proven_view(proven_view.clone());
        let crowdsec = config
            .crowdsec
            .as_ref()
            .map(crate::config::CrowdsecSettings::spec)
            .transpose()
            .context("cannot use CrowdSec's settings")?;
        let crowdsec_alerts = config
            .crowdsec
            .as_ref()
            .map(crate::config::CrowdsecSettings::alerts)
            .transpose()
            .context("cannot use CrowdSec's machine for alerts")?
            .flatten();
        let mut running =
            sync::spawn_node(engine, apiban, config.lists.clone(), http, timing, link)
                .context("cannot start the ledger's owner thread")?;
        running.set_crowdsec(crowdsec, crowdsec_alerts).await;
        // Detection's proven peers go to the fleet and come from it.
        let (proof_link, proof_ends) = match (&config.cluster, &detect_tap) {
            (Some(_), Some(_)) => {
                let (link, ends) = crate::cluster::proofs::link();
                (Some(link), Some(ends))
            }
            _ => (None, None),
        };
        let cluster = match (&config.cluster, ends) {
            (Some(settings), Some(ends)) => {
                tracing::info!(
                    endpoints = %settings.endpoints.join(","),
                    prefix = %settings.prefix,
                    node = %settings.node,
                    "fleet node: the ledger is shared through etcd"
                );
                Some(crate::cluster::start(
                    settings.clone(),
                    ends,
                    running.cluster_updates(),
                    running.subscribe(),
                    config.attach.ifaces.clone(),
                    proof_ends,
                ))
            }
            _ => None,
        };
        let mut leader = cluster.as_ref().map(|c| c.leader.clone());
        crate::host_addresses::watch(own, running.updates.clone());
        let (detect_settings, detect_view) = match detect_tap {
            Some(tap) => {
                let (tx, rx) = tokio::sync::watch::channel(config.detect.clone());
                let stats = Arc::new(crate::detect::DetectStats::default());
                tokio::spawn(crate::detect::run(
                    tap,
                    rx.clone(),
                    running.updates.clone(),
                    stats.clone(),
                    Some(config.process.state_dir.clone()),
                    proof_link,
                    proven_view,
                ));
                (
                    Some(tx),
                    Some(crate::detect::DetectView {
                        stats,
                        settings: rx,
                    }),
                )
            }
            None => (None, None),
        };
        let readers = crate::status::Readers {
            snapshots: running.subscribe(),
            info: Arc::new(Mutex::new(info)),
            dataplane: dataplane.map(Arc::new),
            cluster: cluster.as_ref().map(|c| c.view.clone()),
            detect: detect_view,
        };
        let info = readers.info.clone();
        let mut servers = Vec::new();
        let access = control_access(&config)?;
        let control_listener = match control::bind(&config.process.control_socket, access).await {
            Ok(l) => Some(l),
            Err(e) if config.process.dry_run => {
                tracing::warn!(error = %crate::error_chain(&e), "dry run without a control socket");
                None
            }
            Err(e) => {
                running.abort();
                return Err(e).context("cannot open the control socket");
            }
        };
        let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<control::ReloadReply>(4);
        if let Some(listener) = control_listener {
            let ctx = ControlContext {
                readers: readers.clone(),
                updates: running.updates.clone(),
                reload: reload_tx,
                capture: match (capture_tap, features::probed().and_then(features::capture_off)) {
                    (_, Some(why)) => Err(why),
                    (Some(tap), None) => Ok(Arc::new(
                        crate::capture::CaptureService::new(tap, &config.attach.ifaces)
                            .context("cannot wait on the capture ring buffer")?,
                    )),
                    (None, None) => Err("this agent runs --dry-run: no XDP program to capture from".into()),
                },
            };
            servers.push(tokio::spawn(control::serve(listener, ctx, access)));
            tracing::info!(path = %config.process.control_socket.display(), "control socket ready");
        }
        if let Some(addr) = config.process.metrics_addr {
            match metrics::bind(addr).await {
                Ok(listener) => {
                    let local = listener.local_addr().unwrap_or(addr);
                    servers.push(tokio::spawn(metrics::serve(listener, readers.clone())));
                    tracing::info!(%local, "metrics at http://{local}/metrics");
                }
                Err(e) if config.process.dry_run => {
                    tracing::warn!(error = %crate::error_chain(&e), %addr, "dry run without metrics");
                }
                Err(e) => {
                    running.abort();
                    return Err(e).with_context(|| {
                        format!(
                            "cannot serve metrics on {addr}; pick another --metrics-addr or `off`"
                        )
                    });
                }
            }
        }
        match start_ban_api(&config, running.updates.clone()).await {
            Ok(Some(server)) => servers.push(server),
            Ok(None) => {}
            Err(e) => {
                running.abort();
                return Err(e);
            }
        }
        notifier.ready(&format!("enforcing {} prefixes", running.snapshot().engine.enforced.len()));

        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watchdog = tokio::time::interval(
            notifier
                .watchdog_interval()
                .unwrap_or(Duration::from_secs(3600)),
        );
        // A key file (a credential, or one the operator edits) is re-read every few seconds,
        // so that a new key takes effect without a reload, a rejected one at once.
        let mut key_check = tokio::time::interval(Duration::from_secs(2));
        key_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut key_unreadable = false;
        let mut watchdog_withheld = false;
        let mut owner_check = tokio::time::interval(Duration::from_secs(1));
        owner_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let enforced = running.snapshot().engine.enforced.len();
                    log_stats(readers.dataplane.as_deref(), enforced);
                    notifier.status(&format!("enforcing {enforced} prefixes"));
                }
                _ = watchdog.tick(), if notifier.watchdog_interval().is_some() => {
                    // The ping says the owner is alive and getting through its work, not
                    // merely that this loop runs: a dead owner must get the agent restarted.
                    let max_silence = watchdog_timeout.unwrap_or(Duration::from_secs(60));
                    match running.owner_health(max_silence) {
                        Ok(()) => {
                            watchdog_withheld = false;
                            notifier.watchdog();
                        }
                        Err(why) if !watchdog_withheld => {
                            watchdog_withheld = true;
                            tracing::error!(%why, "not pinging the watchdog: the service manager will restart the agent");
                        }
                        Err(_) => {}
                    }
                }
                _ = owner_check.tick() => {
                    if running.owner_health(Duration::MAX).is_err() {
                        break;
                    }
                }
                _ = hup.recv() => {
                    notifier.reloading();
                    let _ = reload(&args, &mut config, &mut running, &info, &mut key_in_use, detect_settings.as_ref()).await;
                    notifier.ready(&format!("enforcing {} prefixes", running.snapshot().engine.enforced.len()));
                }
                Some(reply) = reload_rx.recv() => {
                    notifier.reloading();
                    let outcome = reload(&args, &mut config, &mut running, &info, &mut key_in_use, detect_settings.as_ref()).await;
                    notifier.ready(&format!("enforcing {} prefixes", running.snapshot().engine.enforced.len()));
                    let _ = reply.send(outcome);
                }
                _ = key_check.tick(), if matches!(config.apiban.key, Some(KeySource::File(_))) => {
                    let Some(KeySource::File(path)) = &config.apiban.key else { continue };
                    match ApiKey::from_file(path) {
                        Ok(key) if Some(&key) != key_in_use.as_ref() => {
                            key_unreadable = false;
                            tracing::info!(file = %path.display(), "the API key file changed; polling with the new key");
                            match apiban_client(&config.apiban) {
                                Ok(apiban) => {
                                    key_in_use = apiban.as_ref().map(|(c, _)| c.key().clone());
                                    running.restart_poller(apiban);
                                }
                                Err(e) => tracing::error!(error = format!("{e:#}"), "cannot use the new key"),
                            }
                        }
                        Ok(_) => key_unreadable = false,
                        Err(e) => {
                            if !key_unreadable {
                                tracing::warn!(error = %crate::error_chain(&e), "cannot re-read the API key file; polling with the key read before");
                            }
                            key_unreadable = true;
                        }
                    }
                }
                Some(leading) = leadership_change(&mut leader), if leader.is_some() => {
                    running.set_standby(!leading);
                }
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        notifier.stopping();
        for s in &servers {
            s.abort();
        }
        if let Some(cluster) = cluster {
            cluster.stop().await;
        }
        let owner_died = running.owner_health(Duration::MAX).err();
        let _ = std::fs::remove_file(&config.process.control_socket);
        // The owner finishes the change it is making, then comes back for the last save.
        let owner = match (owner_died, running.stop()) {
            (None, Some(owner)) => owner,
            // What the owner was doing when it died may be half done: do not save it. Every
            // change it completed was saved when it was applied.
            (Some(why), _) => return Ok(Exit::OwnerDied(why)),
            (None, None) => return Ok(Exit::OwnerDied(sync::OwnerFault::Stopped)),
        };
        let mut engine = owner.engine;
        // The program outlives the agent: a capture cut short by the stop must not go on.
        if let Err(e) = engine.set_capture(false) {
            tracing::warn!(error = %crate::error_chain(&e), "cannot switch off the capture");
        }
        engine.save(sync::unix_now());
        if config.process.dry_run {
            report_dry_run(engine.enforced());
        }
        anyhow::Ok(Exit::Stopped { enforced: engine.enforced().len() })
    })
}

/// Whether this fleet node leads, once that changes; None without a fleet or once the
/// election has stopped.
async fn leadership_change(
    leader: &mut Option<tokio::sync::watch::Receiver<Option<etcd_client::LeaderKey>>>,
) -> Option<bool> {
    let leader = leader.as_mut()?;
    leader.changed().await.ok()?;
    let leading = leader.borrow().is_some();
    Some(leading)
}

/// How the agent's main loop ended.
enum Exit {
    /// SIGTERM or SIGINT: saved and stopped.
    Stopped { enforced: usize },
    /// The ledger's owner died: the agent exits with an error so that it is restarted.
    OwnerDied(sync::OwnerFault),
}

/// A blocked signal mask is inherited across exec: an agent started by a parent that blocks
/// SIGTERM would never stop cleanly. Take the signals the agent handles back.
fn unblock_signals() {
    // SAFETY: plain libc signal-set calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}
