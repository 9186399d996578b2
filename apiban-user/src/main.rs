//! The `apiban` command: the agent (`run`) and the clients that talk to it.

mod capture_client;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use apiban::{
    config::{self, ConfigError, LogFormat, RunArgs, parse_cidr},
    control::{self, Request},
    dataplane::loader,
    human::HumanDuration,
    source::apiban::CheckOutcome,
    status::{self, CheckReport, ListRow, StatusReport},
    sync::unix_now,
};
use clap::{Parser, Subcommand};
use ipnet::IpNet;

#[derive(Parser)]
#[command(
    name = "apiban",
    version,
    about = "Drops known SIP attackers at line rate with XDP, from the APIBAN feed",
    after_help = "Every `run` flag is also an APIBAN_* variable and a key in the config file \
                  (/etc/apiban/config.toml); flags win over the environment, which wins over \
                  the file."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Client {
    /// The running agent's control socket [default: the config's, else
    /// /run/apiban/control.sock].
    #[arg(long, env = "APIBAN_CONTROL_SOCKET")]
    control_socket: Option<PathBuf>,
    /// Config file to read the control socket path from.
    #[arg(long, env = "APIBAN_CONFIG", hide = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Load (or adopt) the XDP program, attach it, sync the ban list and keep enforcing.
    ///
    /// Example: apiban run --iface eth0 --api-key-file /etc/apiban/key --scope ports
    Run(Box<RunArgs>),
    /// What the running agent enforces, what it dropped, and how syncing goes.
    ///
    /// Example: apiban status          apiban status --json | jq .sync
    Status {
        #[arg(long)]
        json: bool,
        /// Every node of the fleet (from their heartbeats in etcd), not only this one.
        #[arg(long)]
        fleet: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Whether an address is banned, and why (entry, source, seen, expiry, hits).
    ///
    /// Example: apiban check 192.0.2.7          apiban check 192.0.2.7 --remote
    Check {
        addr: IpAddr,
        /// Ask APIBAN's check endpoint instead of the agent (uses the configured key; one
        /// request against its rate limit).
        #[arg(long)]
        remote: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Every banned prefix with its source, first/last seen and expiry.
    ///
    /// Example: apiban list --source manual          apiban list --json
    List {
        /// Only this source: apiban, manual, detect, api, crowdsec or list:NAME.
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Ban a prefix now, in the running agent; persists across restarts.
    ///
    /// Example: apiban ban 203.0.113.0/24 --ttl 30d --comment "REGISTER flood 2026-11-22"
    Ban {
        #[arg(value_parser = parse_cidr)]
        net: IpNet,
        /// How long (at least 1s); without it the ban lasts until `apiban unban`.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<HumanDuration>,
        /// A note for whoever reads `apiban check` (at most 200 characters).
        #[arg(long, value_parser = parse_comment)]
        comment: Option<String>,
        /// Ban it even if it covers loopback, an address of this host, or is allowlisted
        /// (the allowlist still wins in the dataplane).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: Client,
    },
    /// Remove a prefix from every source now. A feed that lists it again bans it again; use
    /// `apiban allow add` to keep it out for good.
    ///
    /// Example: apiban unban 203.0.113.0/24
    Unban {
        #[arg(value_parser = parse_cidr)]
        net: IpNet,
        #[command(flatten)]
        client: Client,
    },
    /// Never ban a prefix, whatever the feeds say (manual bans are carved out too).
    ///
    /// Example: apiban allow add 198.51.100.10      apiban allow list
    Allow {
        #[command(subcommand)]
        action: AllowAction,
    },
    /// Re-read the configuration file in the running agent, as SIGHUP does; also retries
    /// APIBAN at once if it had rejected the key.
    ///
    /// Example: apiban reload
    Reload {
        #[command(flatten)]
        client: Client,
    },
    /// Capture what the XDP program drops (allows, observes) as pcap, or one line a packet.
    ///
    /// XDP drops never reach tcpdump. While a capture runs the program copies matching
    /// packets to the agent, at most --rate a second; with none running it costs nothing.
    ///
    /// Example: apiban capture -w drops.pcap --count 100
    ///          apiban capture --source list:voipbl --verdict observed
    ///          apiban capture -w - | tshark -r - -Y sip
    Capture {
        /// Which verdicts: dropped, allowed (a banned source the allowlist saved), observed
        /// (matched a source in observe mode); repeat or separate with commas.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "dropped")]
        verdict: Vec<apiban::capture::CaptureVerdict>,
        /// Only packets whose entry this source lists: apiban, manual, detect, api, crowdsec
        /// or list:NAME.
        #[arg(long)]
        source: Option<String>,
        /// Stop after this many packets.
        #[arg(long, short = 'c')]
        count: Option<u64>,
        /// Bytes of each frame to keep (0: all the program copies, 1536).
        #[arg(long, short = 's', default_value_t = 0)]
        snaplen: u32,
        /// Packets a second at most, over all CPUs; what is over is counted, not copied.
        #[arg(long, default_value_t = apiban::capture::DEFAULT_PER_SEC)]
        rate: u32,
        /// Write a pcap file (`-` for stdout) instead of one line per packet.
        #[arg(short = 'w', long = "write")]
        write: Option<PathBuf>,
        #[command(flatten)]
        client: Client,
    },
    /// Shell completions for apiban, on stdout.
    ///
    /// Example: apiban completions bash > /etc/bash_completion.d/apiban
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Man pages (apiban.1 and one per command) into a directory; for packaging.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
    /// Remove the XDP program from interfaces and delete everything pinned.
    ///
    /// Example: apiban detach            (all interfaces, maps too)
    ///          apiban detach --iface eth1
    Detach {
        /// Only this interface; keeps the maps and the other interfaces.
        #[arg(long)]
        iface: Option<String>,
        /// Detach even while an agent runs on these maps or interfaces (it goes on writing
        /// maps no interface uses until it is stopped).
        #[arg(long)]
        force: bool,
        #[arg(long, env = "APIBAN_BPFFS_DIR", default_value = loader::DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        /// Accepted so scripts can pass the same flags to every command; detach works on the
        /// pins alone.
        #[arg(long, hide = true)]
        control_socket: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AllowAction {
    /// Example: apiban allow add 198.51.100.0/24
    Add {
        #[arg(value_parser = parse_cidr)]
        net: IpNet,
        #[command(flatten)]
        client: Client,
    },
    /// Example: apiban allow remove 198.51.100.0/24
    Remove {
        #[arg(value_parser = parse_cidr)]
        net: IpNet,
        #[command(flatten)]
        client: Client,
    },
    /// Example: apiban allow list
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: Client,
    },
}

/// Exit code 2: the command line or the configuration is wrong, not the world.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Detach {
            iface,
            bpffs_dir,
            force,
            ..
        } => {
            init_tracing(LogFormat::Text);
            detach(&bpffs_dir, iface.as_deref(), force)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "apiban",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Manpages { dir } => manpages(&dir),
        other => client(other),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apiban: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some()
                || matches!(
                    e.downcast_ref::<control::ControlError>(),
                    Some(control::ControlError::Refused(_))
                )
            {
                ExitCode::from(USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// apiban.1 and apiban-COMMAND.1 for every command, from the same definitions as --help.
fn manpages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let command = <Cli as clap::CommandFactory>::command();
    let mut pages = vec![("apiban".to_owned(), command.clone())];
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("apiban-{}", sub.get_name());
        pages.push((
            name.clone(),
            sub.clone().bin_name(name.clone()).display_name(name),
        ));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page)
            .title(name.to_uppercase())
            .render(&mut out)
            .with_context(|| format!("cannot render {name}.1"))?;
        std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = config::load(&args)?;
    init_tracing(config.process.log_format);
    if let Some(file) = &config.file {
        tracing::info!(file = %file.display(), "configuration read");
    }
    apiban::agent::run(args, config)
}

/// A TTL that has not run out the moment it is given.
fn parse_ttl(text: &str) -> Result<HumanDuration, String> {
    let ttl: HumanDuration = text
        .parse()
        .map_err(|e: apiban::human::ParseError| e.to_string())?;
    if ttl.0.as_secs() == 0 {
        return Err(format!(
            "`{text}` expires at once; give at least 1s, or no --ttl for a ban until unbanned"
        ));
    }
    Ok(ttl)
}

fn parse_comment(text: &str) -> Result<String, String> {
    match apiban::trust::comment_problem(text) {
        Some(problem) => Err(problem),
        None => Ok(text.to_owned()),
    }
}

fn socket(client: &Client) -> anyhow::Result<PathBuf> {
    Ok(config::control_socket(
        client.control_socket.as_deref(),
        client.config.as_deref(),
    )?)
}

fn client(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(async {
        match command {
            Command::Status {
                json,
                fleet: true,
                client,
            } => {
                let v = control::request(&socket(&client)?, &Request::Fleet).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    let fleet: apiban::cluster::heartbeat::FleetReport =
                        serde_json::from_value(v).context("unexpected fleet answer")?;
                    print!(
                        "{}",
                        apiban::status::fleet_text(&fleet, apiban::sync::unix_now())
                    );
                }
            }
            Command::Status { json, client, .. } => {
                let v = control::request(&socket(&client)?, &Request::Status).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    let report: StatusReport =
                        serde_json::from_value(v).context("unexpected status answer")?;
                    print!("{}", report.to_text());
                }
            }
            Command::Check {
                addr,
                remote,
                json,
                client,
            } => {
                if remote {
                    return check_remote(addr, client.config.as_deref(), json).await;
                }
                let v = control::request(&socket(&client)?, &Request::Check { addr }).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    let report: CheckReport =
                        serde_json::from_value(v).context("unexpected check answer")?;
                    print!("{}", report.to_text(unix_now()));
                }
            }
            Command::List {
                source,
                json,
                client,
            } => {
                let v = control::request(&socket(&client)?, &Request::List { source }).await?;
                if json {
                    println!("{}", serde_json::to_string(&v)?);
                } else {
                    let rows: Vec<ListRow> =
                        serde_json::from_value(v).context("unexpected list answer")?;
                    print_list(&rows);
                }
            }
            Command::Ban {
                net,
                ttl,
                comment,
                force,
                client,
            } => {
                let req = Request::Ban {
                    net,
                    ttl_secs: ttl.map(|t| t.0.as_secs()),
                    comment,
                    force,
                };
                print_message(control::request(&socket(&client)?, &req).await?);
            }
            Command::Reload { client } => {
                print_message(control::request(&socket(&client)?, &Request::Reload).await?);
            }
            Command::Unban { net, client } => {
                print_message(control::request(&socket(&client)?, &Request::Unban { net }).await?);
            }
            Command::Allow { action } => match action {
                AllowAction::Add { net, client } => print_message(
                    control::request(&socket(&client)?, &Request::AllowAdd { net }).await?,
                ),
                AllowAction::Remove { net, client } => print_message(
                    control::request(&socket(&client)?, &Request::AllowRemove { net }).await?,
                ),
                AllowAction::List { json, client } => {
                    let v = control::request(&socket(&client)?, &Request::AllowList).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        for row in v.as_array().into_iter().flatten() {
                            println!(
                                "{:<40} {}",
                                row["net"].as_str().unwrap_or("?"),
                                row["origin"].as_str().unwrap_or("?")
                            );
                        }
                    }
                }
            },
            Command::Capture {
                verdict,
                source,
                count,
                snaplen,
                rate,
                write,
                client,
            } => {
                let spec = apiban::capture::CaptureSpec {
                    verdicts: verdict,
                    source,
                    count,
                    snaplen,
                    per_sec: rate,
                };
                capture_client::run(&socket(&client)?, spec, write).await?;
            }
            Command::Run(_)
            | Command::Detach { .. }
            | Command::Completions { .. }
            | Command::Manpages { .. } => unreachable!("handled in main"),
        }
        anyhow::Ok(())
    })
}

fn print_message(v: serde_json::Value) {
    match v.as_str() {
        Some(s) => println!("{s}"),
        None => println!("{v}"),
    }
}

fn print_list(rows: &[ListRow]) {
    let now = unix_now();
    println!(
        "{:<40} {:<14} {:<14} {:<14} {:<12} comment",
        "prefix", "source", "first seen", "last seen", "expires"
    );
    for r in rows {
        println!(
            "{:<40} {:<14} {:<14} {:<14} {:<12} {}{}",
            r.net.to_string(),
            r.source,
            status::relative(r.first_seen, now),
            status::relative(r.last_seen, now),
            r.expires
                .map(|t| status::relative(t, now))
                .unwrap_or_else(|| "never".into()),
            status::shown(r.comment.as_deref().unwrap_or("")),
            if r.enforced { "" } else { " (not enforced)" }
        );
    }
    println!("{} entries", rows.len());
}

/// `check --remote`: one request to APIBAN's check endpoint with the configured key.
async fn check_remote(addr: IpAddr, config_file: Option<&Path>, json: bool) -> anyhow::Result<()> {
    // The same resolution as `apiban run`: APIBAN_* variables, then the config file.
    #[derive(Parser)]
    struct FromEnvironment {
        #[command(flatten)]
        run: RunArgs,
    }
    let mut args = FromEnvironment::try_parse_from(["apiban"])
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("an APIBAN_* variable is not valid")?
        .run;
    if config_file.is_some() {
        args.config = config_file.map(Path::to_path_buf);
    }
    args.dry_run = Some(true);
    let config = config::load(&args)?;
    let Some(client) = apiban::agent::client_from_config(&config.apiban)? else {
        anyhow::bail!(
            "--remote needs an API key: set APIBAN_KEY (or api-key/api-key-file in the config); \
             get one at https://apiban.org/getkey.html"
        );
    };
    let listed = matches!(
        client
            .check(addr)
            .await
            .context("APIBAN check request failed")?,
        CheckOutcome::Banned
    );
    if json {
        println!("{}", serde_json::json!({"addr": addr, "listed": listed}));
    } else if listed {
        println!("{addr} is LISTED by APIBAN");
    } else {
        println!("{addr} is not listed by APIBAN");
    }
    Ok(())
}

fn detach(bpffs_dir: &Path, iface: Option<&str>, force: bool) -> anyhow::Result<()> {
    let report = loader::detach(bpffs_dir, iface, force).map_err(|e| match e {
        loader::LoaderError::DirInUse { .. } | loader::LoaderError::IfaceInUse { .. } => {
            anyhow::anyhow!(
                "{e}; `apiban detach` refuses while an agent runs (`systemctl stop apiban` \
                 first, or --force)"
            )
        }
        other => anyhow::Error::new(other)
            .context(format!("could not detach using {}", bpffs_dir.display())),
    })?;
    if report.interfaces.is_empty() && !report.maps_removed && report.egress.is_empty() {
        println!(
            "nothing of apiban's under {} or on this namespace's interfaces",
            bpffs_dir.display()
        );
    }
    for iface in &report.interfaces {
        let how = if report.found_by_interface.contains(iface) {
            " (found on the interface: its pins had gone)"
        } else {
            ""
        };
        println!("detached from {iface}{how}");
    }
    for iface in &report.egress {
        println!("detached the egress classifier from {iface}");
    }
    for iface in &report.not_here {
        eprintln!(
            "apiban: no interface {iface} in this network namespace: if the agent ran in \
             another one (e.g. `ip netns exec NS apiban run`), its program still runs there; \
             run `apiban detach` in that namespace"
        );
    }
    if report.maps_removed {
        println!("removed pinned maps under {}", bpffs_dir.display());
    }
    Ok(())
}
