//! The `apiban` command.

use std::{collections::BTreeSet, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use apiban::dataplane::{
    Scope,
    loader::{self, AttachMode, LoadOptions},
};
use apiban_common::Verdict;
use clap::{Parser, Subcommand};

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
    Run(RunArgs),
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
        Command::Run(args) => run(args),
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(async {
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = ticker.tick() => log_stats(&loaded.dataplane),
                _ = shutdown_signal() => break,
            }
        }
        anyhow::Ok(())
    })?;
    // Dropping `loaded` leaves links and maps pinned: the program keeps enforcing.
    tracing::info!(dir = %args.bpffs_dir.display(), "stopping; the XDP program stays attached");
    Ok(())
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
