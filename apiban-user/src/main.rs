//! The `apiban` command.

use std::{collections::BTreeSet, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use apiban::dataplane::{
    Scope,
    loader::{self, AttachMode, LoadOptions},
};
use apiban::{
    engine::{Engine, EngineSettings},
    human::{HumanDuration, RateLimit},
    source::{
        apiban::{ApiKey, ApiVersion, ApibanClient, ClientConfig, DataSet},
        blocklist::{ListLocation, ListSpec},
    },
    state::StateStore,
    sync::{self, PollSettings},
};
use apiban_common::Verdict;
use clap::{Parser, Subcommand};
use ipnet::IpNet;

#[derive(Parser)]
#[command(
    name = "apiban",
    version,
    about = "Drops known SIP attackers at line rate with XDP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load (or adopt) the XDP program, attach it and keep it enforcing until stopped.
    ///
    /// Example: apiban run --iface eth0 --scope ports --ports 5060,5061
    Run(Box<RunArgs>),
    /// Remove the XDP program from interfaces and delete everything pinned.
    ///
    /// Example: apiban detach            (all interfaces, maps too)
    ///          apiban detach --iface eth1
    Detach {
        /// Only this interface; keeps the maps and the other interfaces.
        #[arg(long)]
        iface: Option<String>,
        #[arg(long, default_value = loader::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Interface to protect; repeat for several.
    #[arg(long = "iface", required = true)]
    ifaces: Vec<String>,
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    xdp_mode: AttachMode,
    /// Where maps and links are pinned, so enforcement survives the agent.
    #[arg(long, default_value = loader::DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// Drop everything from banned sources (all), or only TCP/UDP to --ports (ports).
    #[arg(long, value_enum, default_value_t = ScopeArg::All)]
    scope: ScopeArg,
    /// Destination ports for --scope ports.
    #[arg(long, value_delimiter = ',', default_value = "5060,5061")]
    ports: Vec<u16>,
    /// Log each drop and allowlist match from the XDP program (debugging only).
    #[arg(long)]
    debug_events: bool,
    /// APIBAN API key (get one at https://apiban.org/getkey.html). Prefer APIBAN_KEY or
    /// --api-key-file: flags show up in `ps`.
    #[arg(long, env = "APIBAN_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// File whose first line is the API key (e.g. a systemd credential).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// APIBAN base URL, up to and including /api/ (a mirror, or a local test server).
    #[arg(long, default_value = apiban::source::apiban::DEFAULT_BASE_URL)]
    api_url: String,
    #[arg(long, value_enum, default_value_t = ApiVersion::V2)]
    api_version: ApiVersion,
    /// APIBAN data set.
    #[arg(long = "set", value_enum, default_value_t = DataSet::Sip)]
    data_set: DataSet,
    /// Time between incremental polls.
    #[arg(long, default_value = "60s")]
    poll_interval: HumanDuration,
    /// Time between full pulls that reconcile the list (remove what left it).
    #[arg(long, default_value = "24h")]
    resync_interval: HumanDuration,
    /// At most N requests in any window T (APIBAN allows 11 per 2 minutes).
    #[arg(long, default_value = "11/120s")]
    rate_limit: RateLimit,
    /// How long a feed entry stays banned after it was last seen.
    #[arg(long, default_value = "7d")]
    ttl: HumanDuration,
    /// Never ban this prefix (repeatable); wins over every source.
    #[arg(long = "allow", value_parser = parse_cidr)]
    allow: Vec<IpNet>,
    /// Plain-text blocklist as NAME=PATH or NAME=URL (repeatable), refreshed every
    /// --list-refresh.
    #[arg(long = "list")]
    lists: Vec<String>,
    #[arg(long, default_value = "1h")]
    list_refresh: HumanDuration,
    /// Where the ledger and sync position are saved.
    #[arg(long, default_value = "/var/lib/apiban")]
    state_dir: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ScopeArg {
    All,
    Ports,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Detach { iface, bpffs_dir } => detach(&bpffs_dir, iface.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apiban: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let options = LoadOptions {
        bpffs_dir: args.bpffs_dir.clone(),
        debug_events: args.debug_events,
        ..Default::default()
    };
    let mut loaded = loader::load(&options).context("could not load the XDP program")?;
    let scope = match args.scope {
        ScopeArg::All => Scope::All,
        ScopeArg::Ports => Scope::Ports(args.ports.iter().copied().collect::<BTreeSet<_>>()),
    };
    loaded.dataplane.set_scope(&scope)?;
    for iface in &args.ifaces {
        let mode = loaded
            .attach(iface, args.xdp_mode)
            .with_context(|| format!("could not attach to {iface}"))?;
        tracing::info!(iface, %mode, adopted = loaded.adopted, "XDP program attached");
    }
    let key = api_key(&args)?;
    let lists = args
        .lists
        .iter()
        .map(|l| {
            let (name, location) = l
                .split_once('=')
                .filter(|(n, loc)| !n.is_empty() && !loc.is_empty())
                .with_context(|| format!("--list {l}: write NAME=PATH or NAME=URL"))?;
            Ok(ListSpec {
                name: name.to_owned(),
                location: ListLocation::parse(location),
                refresh: args.list_refresh.0,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (_ebpf, dataplane) = loaded.into_parts();
    let store = StateStore::open(&args.state_dir).context("cannot open the state directory")?;
    let settings = EngineSettings {
        ttl: args.ttl.0,
        allow: args.allow.clone(),
        ..Default::default()
    };
    let (engine, report) = Engine::start(dataplane, Some(store), settings, sync::unix_now())
        .context("cannot restore the ban list")?;
    tracing::info!(
        restored = report.restored_entries,
        added = report.applied.added,
        removed = report.applied.removed,
        "ban list restored from state"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(async {
        let apiban = match key {
            Some(key) => {
                let mut config = ClientConfig::new(&args.api_url, key);
                config.version = args.api_version;
                config.set = args.data_set;
                let client = ApibanClient::new(config).context("cannot build the HTTP client")?;
                let poll = PollSettings {
                    poll_interval: args.poll_interval.0,
                    resync_interval: args.resync_interval.0,
                    rate_limit: args.rate_limit,
                    ..Default::default()
                };
                Some((client, poll))
            }
            None => {
                tracing::warn!(
                    "no APIBAN key (--api-key, APIBAN_KEY or --api-key-file): enforcing saved \
                     bans, lists and manual bans only; get a free key at \
                     https://apiban.org/getkey.html"
                );
                None
            }
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("cannot build the HTTP client")?;
        let running = sync::spawn(engine, apiban, lists, http, Duration::from_secs(60));
        let owner = running.owner.clone();
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = ticker.tick() => log_stats(sync::lock(&owner).engine.enforcer()),
                _ = shutdown_signal() => break,
            }
        }
        running.abort();
        sync::lock(&owner).engine.save(sync::unix_now());
        anyhow::Ok(())
    })?;
    // The maps and links stay pinned: the program keeps enforcing.
    tracing::info!(dir = %args.bpffs_dir.display(), "stopping; the XDP program stays attached");
    Ok(())
}

fn parse_cidr(text: &str) -> Result<IpNet, String> {
    apiban::sanitise::parse_net(text).ok_or_else(|| {
        format!("`{text}` is not an address or CIDR (e.g. 192.0.2.7 or 2001:db8::/32)")
    })
}

/// The key from --api-key or APIBAN_KEY, else from --api-key-file; none is allowed (the
/// agent then enforces what it has), a malformed one is not.
fn api_key(args: &RunArgs) -> anyhow::Result<Option<ApiKey>> {
    if let Some(key) = &args.api_key {
        return ApiKey::new(key)
            .map(Some)
            .context("--api-key / APIBAN_KEY is not a usable key");
    }
    match &args.api_key_file {
        Some(path) => ApiKey::from_file(path)
            .map(Some)
            .context("--api-key-file is not usable"),
        None => Ok(None),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn log_stats(dataplane: &apiban::dataplane::Dataplane) {
    match dataplane.stats() {
        Ok(stats) => tracing::info!(
            dropped = stats.get(Verdict::Dropped).packets,
            allowed = stats.get(Verdict::Allowed).packets,
            passed = stats.get(Verdict::Passed).packets,
            not_ip = stats.get(Verdict::NotIp).packets,
            malformed = stats.get(Verdict::Malformed).packets,
            "dataplane counters"
        ),
        Err(e) => tracing::warn!(error = %e, "could not read dataplane counters"),
    }
}

fn detach(bpffs_dir: &std::path::Path, iface: Option<&str>) -> anyhow::Result<()> {
    let report = loader::detach(bpffs_dir, iface)
        .with_context(|| format!("could not detach using {}", bpffs_dir.display()))?;
    if report.interfaces.is_empty() && !report.maps_removed {
        println!("nothing pinned under {}", bpffs_dir.display());
    }
    for iface in &report.interfaces {
        println!("detached from {iface}");
    }
    if report.maps_removed {
        println!("removed pinned maps under {}", bpffs_dir.display());
    }
    Ok(())
}
