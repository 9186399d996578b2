//! Developer commands: `cargo xtask setup|build|run|test|bench`.
//!
//! xtask depends on nothing that needs the eBPF toolchain, so it compiles on a fresh machine
//! and can install that toolchain before anything else is built.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "apiban developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install whatever is missing to build apiban (idempotent).
    Setup,
    /// Build the release binary target/release/apiban (eBPF object embedded).
    Build,
    /// Build and run the agent in the foreground (root).
    ///
    /// Example: cargo xtask run --iface eth0 -- --scope ports --ports 5060
    Run {
        /// Interface to protect; repeat for several.
        #[arg(long = "iface", required = true)]
        ifaces: Vec<String>,
        /// More flags for `apiban run`.
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
    /// Lints, unit tests, and the kernel-touching tests (root; one at a time).
    Test,
    /// Benchmarks. `dataplane`: ns per packet and map load times. `sync`: ingesting 100k
    /// addresses end to end, and the engine's memory.
    Bench {
        #[arg(value_enum, default_value_t = BenchKind::Dataplane)]
        kind: BenchKind,
        /// Fewer repeats and smaller sizes: a quick look, not figures to quote (dataplane;
        /// sync takes about a second either way).
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchKind {
    Dataplane,
    Sync,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build => {
            setup::run()?;
            build_release(&root)
        }
        Cmd::Run { ifaces, agent_args } => {
            setup::run()?;
            require_root("cargo xtask run attaches an XDP program")?;
            build_release(&root)?;
            let mut cmd = Command::new(root.join("target/release/apiban"));
            cmd.arg("run");
            for iface in &ifaces {
                cmd.args(["--iface", iface]);
            }
            cmd.args(&agent_args);
            exec(cmd)
        }
        Cmd::Test => {
            setup::run()?;
            test(&root)
        }
        Cmd::Bench { kind, quick } => {
            setup::run()?;
            require_root("benchmarks load XDP programs")?;
            let mut cmd = cargo(&root);
            let name = match kind {
                BenchKind::Dataplane => "dataplane",
                BenchKind::Sync => "sync",
            };
            cmd.args(["bench", "-p", "tests", "--bench", name, "--"]);
            if quick {
                cmd.arg("--quick");
            }
            status(cmd)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn build_release(root: &Path) -> anyhow::Result<()> {
    let mut cmd = cargo(root);
    cmd.args(["build", "--release", "-p", "apiban-user"]);
    status(cmd)
}

fn test(root: &Path) -> anyhow::Result<()> {
    step(
        root,
        &["fmt", "--all", "--", "--check"],
        "formatting (run `cargo fmt --all`)",
    )?;
    step(
        root,
        // No --workspace: the default members are the host crates, not the eBPF one.
        &["clippy", "--all-targets", "--", "-D", "warnings"],
        "clippy",
    )?;
    step(
        root,
        &[
            "test",
            "-p",
            "apiban-common",
            "-p",
            "apiban-user",
            "-p",
            "xtask",
        ],
        "unit tests",
    )?;
    if !is_root() {
        eprintln!(
            "[test] the kernel-touching tests need root (CAP_BPF + CAP_NET_ADMIN); \
             they will fail saying so"
        );
    }
    // Tests that touch kernel state (namespaces, XDP attachments, pins) run one at a time.
    step(
        root,
        &["test", "-p", "tests", "--", "--test-threads=1"],
        "kernel tests",
    )
}

fn step(root: &Path, args: &[&str], what: &str) -> anyhow::Result<()> {
    eprintln!("[test] {what}: cargo {}", args.join(" "));
    let mut cmd = cargo(root);
    cmd.args(args);
    status(cmd).with_context(|| format!("{what} failed"))
}

fn status(mut cmd: Command) -> anyhow::Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("could not run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} exited with {st}");
    }
    Ok(())
}

/// Replaces xtask with the agent, so signals (Ctrl-C, SIGTERM) reach it directly.
fn exec(mut cmd: Command) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not start {cmd:?}"))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(why: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{why} and needs root (or CAP_BPF + CAP_NET_ADMIN); this machine has no sudo: \
             run it from a root shell"
        );
    }
    Ok(())
}
