//! Developer commands: `cargo xtask setup|build|run|test|demo|fuzz|install|bench`.
//!
//! xtask depends on nothing that needs the eBPF toolchain, so it compiles on a fresh machine
//! and can install that toolchain before anything else is built.

mod bench;
mod compat;
mod package;
mod setup;
#[cfg(test)]
mod structure;

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
    /// apiban end to end in about a minute, with no key and no internet (root): two network
    /// namespaces, a local APIBAN-compatible server, the real agent, SIP OPTIONS from listed
    /// and clean addresses, and what got through. Cleans up after itself, also on Ctrl-C.
    ///
    /// With --fleet: three agents on a three-member etcd cluster: the elected poller, a ban
    /// made on one node dropped on the others, the poller killed and replaced, status --fleet.
    Demo {
        #[arg(long)]
        fleet: bool,
    },
    /// Long fuzzing runs: every cargo-fuzz target (APIBAN responses, blocklists, the state
    /// file, the config file, control requests, SIP samples) for `--time`
    /// seconds each, then the differential test of the XDP program against its model on
    /// `--frames` frames, and the fleet's chaos test with `--chaos-seeds` random seeds
    /// (root). Crashes land in fuzz/artifacts/; a chaos failure prints its seed.
    ///
    /// Example: cargo xtask fuzz --time 600            cargo xtask fuzz --target state_file
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        time: u64,
        /// Only this target (see fuzz/Cargo.toml); skips the differential test.
        #[arg(long)]
        target: Option<String>,
        /// Frames for the differential test.
        #[arg(long, default_value_t = 5_000_000)]
        frames: u64,
        /// Seeds for the fleet's chaos test (about two minutes each).
        #[arg(long, default_value_t = 5)]
        chaos_seeds: u32,
    },
    /// Install the release binary, the systemd unit and the config (root).
    ///
    /// Example: cargo xtask install          (then edit /etc/apiban/config.toml)
    ///          cargo xtask install --destdir /tmp/pkg   (staging, for packaging)
    Install {
        /// Install under this directory instead of / (no systemctl calls).
        #[arg(long)]
        destdir: Option<PathBuf>,
    },
    /// The production programs and the agent on Debian 11's, 12's and 13's kernels (5.10,
    /// 6.1, the newest), each booted under qemu: kernel features probed, the verifier,
    /// generated frames through BPF_PROG_TEST_RUN against the model, a capture and a
    /// detection sample where the kernel has them, the agent started on a veth pair (root).
    /// With --arch arm64: the arm64 build on Debian 12's arm64 kernel (the program checks).
    ///
    /// Example: cargo xtask compat --kernel debian11
    ///          cargo xtask compat --arch arm64
    Compat {
        /// debian11, debian12, debian13 or all (repeatable); arm64 has debian12.
        #[arg(long = "kernel", default_value = "all")]
        kernels: Vec<String>,
        /// amd64 boots under qemu-system-x86_64 and also starts the agent; arm64 boots
        /// Debian 12's arm64 kernel under qemu-system-aarch64 with the arm64 build.
        #[arg(long, value_enum, default_value = "amd64")]
        arch: package::Arch,
    },
    /// Build target/debian/apiban_<version>_<arch>.deb (cargo-deb), or with --rpm
    /// target/rpm/RPMS/<arch>/apiban-<version>-1.<arch>.rpm (rpmbuild): the binary, the
    /// systemd unit, /etc/apiban/config.toml as a conffile, man pages, shell completions, the
    /// README and docs/. Built with cargo-zigbuild against glibc 2.31 (Debian 11 and later); arm64 is
    /// cross-linked by zig.
    ///
    /// Example: cargo xtask package && dpkg -i target/debian/apiban_*_amd64.deb
    ///          cargo xtask package --arch arm64 --rpm
    Package {
        #[arg(long, value_enum, default_value = "amd64")]
        arch: package::Arch,
        /// The RPM instead of the .deb.
        #[arg(long)]
        rpm: bool,
    },
    /// Benchmarks, all of them by default: `dataplane` (ns per packet under
    /// BPF_PROG_TEST_RUN, map load times), `sync` (ingesting 100k addresses, memory),
    /// `compare` (apiban against iptables, ipset and nftables: loading, and a flood on a veth
    /// pair). Root; installs iptables, ipset and nftables if missing.
    ///
    /// Example: cargo xtask bench --quick --json | tail -1 | jq .veth
    Bench {
        #[arg(value_enum)]
        kind: Option<bench::BenchKind>,
        /// Fewer repeats and smaller sizes: a few minutes, not figures to quote.
        #[arg(long, conflicts_with = "smoke")]
        quick: bool,
        /// Every part at its smallest, in the debug build, seconds each: what `cargo xtask
        /// test` runs so that no benchmark stops running unnoticed. No figures to read.
        #[arg(long)]
        smoke: bool,
        /// Print every result as one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
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
            if !key_configured(&agent_args) {
                eprintln!(
                    "[run] no APIBAN key: the agent will enforce saved bans, lists and manual \
                     bans only.\n[run] get a free key at https://apiban.org/getkey.html, then \
                     `APIBAN_KEY=<key> cargo xtask run --iface {}`.\n[run] to see apiban work \
                     without a key or internet: `cargo xtask demo`.",
                    ifaces.join(" --iface ")
                );
            }
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
            setup::ensure_test_tools(&root)?;
            setup::ensure_fuzz_tools()?;
            setup::ensure_package_tools()?;
            setup::ensure_bench_tools()?;
            test(&root)
        }
        Cmd::Demo { fleet } => {
            setup::run()?;
            require_root("the demo creates network namespaces and attaches XDP")?;
            if fleet {
                setup::ensure_test_tools(&root)?;
            }
            build_release(&root)?;
            let mut cmd = cargo(&root);
            let bin = if fleet {
                "apiban-fleet-demo"
            } else {
                "apiban-demo"
            };
            cmd.args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "tests",
                "--bin",
                bin,
                "--",
                "--agent",
            ])
            .arg(root.join("target/release/apiban"));
            // exec, so Ctrl-C reaches the demo, which cleans up, rather than killing xtask.
            exec(cmd)
        }
        Cmd::Fuzz {
            time,
            target,
            frames,
            chaos_seeds,
        } => {
            setup::run()?;
            setup::ensure_fuzz_tools()?;
            let targets = match target {
                Some(t) => vec![t],
                None => fuzz_targets(&root)?,
            };
            for t in &targets {
                fuzz_run(&root, t, &[&format!("-max_total_time={time}")])?;
            }
            if targets.len() > 1 {
                require_root("the differential test runs the XDP program")?;
                let mut cmd = cargo(&root);
                cmd.args([
                    "test",
                    "--release",
                    "-p",
                    "tests",
                    "--test",
                    "differential",
                    "--",
                    "--nocapture",
                ])
                .env("APIBAN_DIFF_FRAMES", frames.to_string());
                status(cmd).context("the differential test found a disagreement")?;
                let mut cmd = cargo(&root);
                cmd.args([
                    "test",
                    "-p",
                    "tests",
                    "--test",
                    "fleet_chaos",
                    "--",
                    "--nocapture",
                ])
                .env("APIBAN_CHAOS_SEEDS", chaos_seeds.to_string());
                status(cmd).context(
                    "the fleet's chaos test failed; APIBAN_CHAOS_SEED=<its seed> cargo test -p \
                     tests --test fleet_chaos replays it",
                )?;
            }
            Ok(())
        }
        Cmd::Compat { kernels, arch } => {
            let kernels = compat::select(&kernels, arch)?;
            setup::run()?;
            require_root("the kernel check loads XDP programs in a guest it boots")?;
            compat::run(&root, &kernels)
        }
        Cmd::Package { arch, rpm } => {
            setup::run()?;
            let format = if rpm {
                package::Format::Rpm
            } else {
                package::Format::Deb
            };
            let built = package::package(&root, arch, format)?;
            eprintln!("[package] {}", built.display());
            Ok(())
        }
        Cmd::Install { destdir } => {
            setup::run()?;
            build_release(&root)?;
            install(&root, destdir.as_deref())
        }
        Cmd::Bench {
            kind,
            quick,
            smoke,
            json,
        } => {
            setup::run()?;
            require_root("benchmarks load XDP programs")?;
            let kinds = match kind {
                Some(k) => vec![k],
                None => bench::BenchKind::ALL.to_vec(),
            };
            if kinds.contains(&bench::BenchKind::Compare) {
                setup::ensure_bench_tools()?;
            }
            if kinds.contains(&bench::BenchKind::Fleet) {
                setup::ensure_test_tools(&root)?;
            }
            let mode = match (quick, smoke) {
                (_, true) => bench::Mode::Smoke,
                (true, false) => bench::Mode::Quick,
                (false, false) => bench::Mode::Full,
            };
            bench::run(&root, &kinds, mode, json)
        }
    }
}

/// Whether `apiban run` will find a key: in its flags, the environment, or the config file.
fn key_configured(agent_args: &[String]) -> bool {
    let in_flags = agent_args
        .iter()
        .any(|a| a.starts_with("--api-key") || a.starts_with("--config"));
    let in_env = ["APIBAN_KEY", "APIBAN_KEY_FILE", "APIBAN_CONFIG"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    let in_file = std::fs::read_to_string("/etc/apiban/config.toml")
        .is_ok_and(|t| t.lines().any(|l| l.trim_start().starts_with("api-key")));
    in_flags || in_env || in_file
}

/// Builds the release binary, the package's generated assets, then the .deb; its path.
/// Installs binary, unit and config; an existing config is never overwritten.
fn install(root: &Path, destdir: Option<&Path>) -> anyhow::Result<()> {
    if destdir.is_none() {
        require_root("installing into /usr/local, /etc/systemd and /etc/apiban")?;
    }
    let base = destdir.unwrap_or(Path::new("/"));
    let at = |p: &str| base.join(p.trim_start_matches('/'));
    let copy = |from: PathBuf, to: PathBuf, mode: u32| -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        // Copy to a temporary name and rename: replacing a running binary in place fails
        // (ETXTBSY) and a half-written one must never be executed.
        let tmp = to.with_extension("apiban-new");
        std::fs::copy(&from, &tmp)
            .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, &to).with_context(|| format!("cannot install {}", to.display()))?;
        eprintln!("[install] {}", to.display());
        Ok(())
    };
    copy(
        root.join("target/release/apiban"),
        at("/usr/local/bin/apiban"),
        0o755,
    )?;
    copy(
        root.join("packaging/apiban.service"),
        at("/etc/systemd/system/apiban.service"),
        0o644,
    )?;
    let config = at("/etc/apiban/config.toml");
    if config.exists() {
        eprintln!("[install] {} exists; left as it is", config.display());
    } else {
        copy(root.join("packaging/config.toml"), config, 0o600)?;
    }
    if destdir.is_none() {
        ban_api_token(Path::new("/etc/apiban/ban-api-token"))?;
    }
    if destdir.is_none() && Path::new("/run/systemd/system").exists() {
        status({
            let mut c = Command::new("systemctl");
            c.arg("daemon-reload");
            c
        })?;
    }
    eprintln!(
        "[install] next: set `iface` in /etc/apiban/config.toml, put the APIBAN key in \
         /etc/apiban/key (chmod 600; free at https://apiban.org/getkey.html), then \
         `systemctl enable --now apiban`"
    );
    Ok(())
}

/// The ban API's token, as the package's postinst makes it: once, 32 random bytes in hex,
/// mode 0640, group `apiban` (made if missing), which a SIP proxy's user may join. The unit
/// hands it over with LoadCredential=, which fails without the file.
fn ban_api_token(path: &Path) -> anyhow::Result<()> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
        return Ok(());
    }
    let has_group = Command::new("getent")
        .args(["group", "apiban"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_group {
        status({
            let mut c = Command::new("groupadd");
            c.args(["--system", "apiban"]);
            c
        })?;
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    let mut token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    token.push('\n');
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, token.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    status({
        let mut c = Command::new("chgrp");
        c.arg("apiban").arg(path);
        c
    })?;
    eprintln!("[install] made the ban API's token {}", path.display());
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub(crate) fn cargo(root: &Path) -> Command {
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
    // The package tests install what `cargo xtask package` builds, and compare the four.
    let mut packages = Vec::new();
    for (var, arch, format) in [
        ("APIBAN_DEB", package::Arch::Amd64, package::Format::Deb),
        ("APIBAN_RPM", package::Arch::Amd64, package::Format::Rpm),
        (
            "APIBAN_DEB_ARM64",
            package::Arch::Arm64,
            package::Format::Deb,
        ),
        (
            "APIBAN_RPM_ARM64",
            package::Arch::Arm64,
            package::Format::Rpm,
        ),
    ] {
        let built = package::package(root, arch, format)
            .with_context(|| format!("building the {arch:?} {format:?} package failed"))?;
        packages.push((var, built));
    }
    // Tests that touch kernel state (namespaces, XDP attachments, pins) run one at a time.
    let args = ["test", "-p", "tests", "--", "--test-threads=1"];
    let vars: Vec<String> = packages
        .iter()
        .map(|(var, path)| format!("{var}={}", path.display()))
        .collect();
    eprintln!(
        "[test] kernel tests: {} cargo {}",
        vars.join(" "),
        args.join(" ")
    );
    let mut cmd = cargo(root);
    cmd.args(args);
    for (var, path) in &packages {
        cmd.env(var, path);
    }
    status(cmd).context("kernel tests failed")?;
    // Every benchmark, each part at its smallest: a benchmark that stops running fails here.
    bench::run(root, &bench::BenchKind::ALL, bench::Mode::Smoke, false)
        .context("a benchmark's smoke run failed (`cargo xtask bench --smoke` reruns them)")?;
    // The programs and the agent on Debian 11's, 12's and 13's kernels, and the arm64 build
    // on Debian 12's arm64 kernel, under qemu: about 20 s of guest time each.
    compat::run(root, &compat::KERNELS)
        .context("the kernel compatibility check (cargo xtask compat) failed")?;
    // A few seconds of each fuzz target over its corpus: what `cargo xtask fuzz` runs for
    // minutes, enough to catch a parser that a change broke.
    for target in fuzz_targets(root)? {
        fuzz_run(root, &target, &["-max_total_time=5"])?;
    }
    Ok(())
}

/// The fuzz targets, as fuzz/Cargo.toml declares them.
fn fuzz_targets(root: &Path) -> anyhow::Result<Vec<String>> {
    let manifest = root.join("fuzz/Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name = \""))
        .filter_map(|n| n.strip_suffix('"'))
        .filter(|n| *n != "apiban-fuzz")
        .map(str::to_owned)
        .collect())
}

/// Runs one fuzz target over its corpus in the repository, with the bounds every run gets:
/// no input may take more than 10 s or 2 GiB.
fn fuzz_run(root: &Path, target: &str, extra: &[&str]) -> anyhow::Result<()> {
    eprintln!(
        "[fuzz] {target}: cargo fuzz run {target} -- {}",
        extra.join(" ")
    );
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("fuzz"))
        .arg(format!("+{}", setup::EBPF_TOOLCHAIN))
        .args(["fuzz", "run", "-O", target])
        .arg(format!("corpus/{target}"))
        .args(["--", "-rss_limit_mb=2048", "-timeout=10", "-max_len=65536"])
        .args(extra);
    status(cmd).with_context(|| {
        format!(
            "fuzz target {target} failed: a build error (above), or a crash whose input is in \
             fuzz/artifacts/{target}/"
        )
    })
}

fn step(root: &Path, args: &[&str], what: &str) -> anyhow::Result<()> {
    eprintln!("[test] {what}: cargo {}", args.join(" "));
    let mut cmd = cargo(root);
    cmd.args(args);
    status(cmd).with_context(|| format!("{what} failed"))
}

pub(crate) fn status(mut cmd: Command) -> anyhow::Result<()> {
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
