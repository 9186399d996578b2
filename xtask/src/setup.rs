//! `cargo xtask setup`: installs what building apiban needs, skipping what is there.
//! The pins follow ../shared/toolchain.md, a recipe verified on the project's machines.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

/// Must match apiban-user/build.rs. Its LLVM major (22) must equal bpf-linker's.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";
const LLVM_MAJOR: u32 = 22;
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    ensure_rustup()?;
    ensure_host_components()?;
    ensure_ebpf_toolchain()?;
    ensure_bpf_linker()?;
    ensure_iproute2()?;
    ensure_protoc()?;
    Ok(())
}

fn progress(what: &str, outcome: &str) {
    eprintln!("[setup] {what}: {outcome}");
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_step(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    progress(what, "installing");
    // An installer's chatter is progress, like ours: on stderr, so that what a command prints
    // on stdout (`cargo xtask bench --json`) stays what it promises.
    let status = cmd
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("could not run {cmd:?} to install {what}"))?;
    if !status.success() {
        bail!("installing {what} failed: {cmd:?} exited with {status}");
    }
    progress(what, "installed");
    Ok(())
}

fn ensure_rustup() -> anyhow::Result<()> {
    if output("rustup", &["--version"]).is_none() {
        bail!("rustup is missing: install it from https://rustup.rs, then run `cargo xtask setup`");
    }
    progress("rustup", "present");
    Ok(())
}

/// The host toolchain comes from rust-toolchain.toml; cargo is already running on it, but
/// rustup may not have added the components (RUSTUP_AUTO_INSTALL=0 on some machines).
fn ensure_host_components() -> anyhow::Result<()> {
    let toolchain = host_toolchain()?;
    let installed = output(
        "rustup",
        &[
            "component",
            "list",
            "--installed",
            "--toolchain",
            &toolchain,
        ],
    )
    .unwrap_or_default();
    let missing: Vec<&str> = ["rustfmt", "clippy"]
        .into_iter()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    let what = format!("host toolchain {toolchain} (rustfmt, clippy)");
    if missing.is_empty() {
        progress(&what, "present");
        return Ok(());
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add", "--toolchain", &toolchain])
        .args(&missing);
    run_step(&what, &mut cmd)
}

fn host_toolchain() -> anyhow::Result<String> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rust-toolchain.toml");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("could not read {}", file.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|rest| rest.split('"').nth(1))
        .map(str::to_owned)
        .with_context(|| format!("no channel in {}", file.display()))
}

fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    let what = format!("eBPF toolchain {EBPF_TOOLCHAIN} + rust-src");
    let has_toolchain = output("rustup", &["run", EBPF_TOOLCHAIN, "rustc", "--version"]).is_some();
    let has_src = has_toolchain
        && output(
            "rustup",
            &[
                "component",
                "list",
                "--installed",
                "--toolchain",
                EBPF_TOOLCHAIN,
            ],
        )
        .is_some_and(|l| l.lines().any(|c| c.starts_with("rust-src")));
    if has_src {
        progress(&what, "present");
        return Ok(());
    }
    let mut cmd = Command::new("rustup");
    cmd.args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]);
    run_step(&what, &mut cmd)
}

fn bpf_linker_ok() -> bool {
    output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let what = format!("bpf-linker {BPF_LINKER_VERSION} (LLVM {LLVM_MAJOR})");
    if bpf_linker_ok() {
        progress(&what, "present");
        return Ok(());
    }
    let prefix = format!("/usr/lib/llvm-{LLVM_MAJOR}");
    ensure_llvm(&prefix)?;
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.env("LLVM_PREFIX", &prefix).args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--no-default-features",
        "--features",
        &format!("llvm-{LLVM_MAJOR}"),
    ]);
    run_step(
        &format!("{what}, building from crates.io (a few minutes)"),
        &mut cmd,
    )?;
    if !bpf_linker_ok() {
        bail!("bpf-linker was installed but does not run: is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn ensure_llvm(prefix: &str) -> anyhow::Result<()> {
    let package = format!("llvm-{LLVM_MAJOR}-dev");
    if Path::new(prefix).join("bin/llvm-config").exists() {
        progress(&package, "present");
        return Ok(());
    }
    apt_install(&package, "bpf-linker links against it")
}

fn ensure_iproute2() -> anyhow::Result<()> {
    ensure_tool(
        "ip",
        &["-V"],
        "iproute2",
        "the tests build network namespaces with `ip`",
    )
}

/// etcd-client's build script generates its gRPC code with protoc.
fn ensure_protoc() -> anyhow::Result<()> {
    ensure_tool(
        "protoc",
        &["--version"],
        "protobuf-compiler",
        "the etcd client (for --cluster) is generated from protobuf at build time",
    )
}

/// What the tests use beyond building: systemd-analyze verifies the unit, setpriv runs the
/// agent with exactly the unit's capabilities, etcd is the fleet tests' cluster, SIPVicious
/// and SIPp are the detection tests' attackers and customer, Kamailio the ban API's client.
pub fn ensure_test_tools(root: &Path) -> anyhow::Result<()> {
    // `sipp -v` exits with 99, so the binary being there is what counts.
    if Path::new("/usr/bin/sipp").exists() {
        progress("sip-tester", "present");
    } else {
        apt_install("sip-tester", "the detection tests flood and call with SIPp")?;
    }
    ensure_sipvicious(root)?;
    // The ban API's test runs a real Kamailio whose pike module calls it over http_client;
    // the detection tests put it in front of attackers and phones as a registrar, on UDP,
    // TCP and TLS.
    let modules = Path::new("/usr/lib/x86_64-linux-gnu/kamailio/modules");
    if Path::new("/usr/sbin/kamailio").exists()
        && modules.join("http_client.so").exists()
        && modules.join("tls.so").exists()
    {
        progress("kamailio", "present");
    } else {
        for (package, why) in [
            (
                "kamailio",
                "the ban API and detection tests run a real Kamailio",
            ),
            (
                "kamailio-utils-modules",
                "the ban API test bans through Kamailio's pike + http_client",
            ),
            (
                "kamailio-tls-modules",
                "the detection tests' registrar also listens on TLS",
            ),
        ] {
            apt_install(package, why)?;
        }
    }
    ensure_tool(
        "tshark",
        &["--version"],
        "tshark",
        "the capture test reads apiban's pcap files with tshark",
    )?;
    ensure_tool(
        "man",
        &["--version"],
        "man-db",
        "the package test reads the installed man page",
    )?;
    ensure_tool(
        "promtool",
        &["--version"],
        "prometheus",
        "the metrics test checks /metrics with promtool",
    )?;
    ensure_tool(
        "etcd",
        &["--version"],
        "etcd-server",
        "the fleet tests run a three-member etcd cluster",
    )?;
    ensure_tool(
        "faketime",
        &["--version"],
        "faketime",
        "the fleet's clock test runs nodes days fast and hours slow",
    )?;
    ensure_crowdsec()?;
    ensure_tool(
        "systemd-analyze",
        &["--version"],
        "systemd",
        "the tests verify packaging/apiban.service with systemd-analyze",
    )?;
    ensure_tool(
        "setpriv",
        &["--version"],
        "util-linux",
        "the tests run the agent with the unit's capabilities via setpriv",
    )
}

const SIPVICIOUS_VERSION: &str = "0.3.8";

/// Where the tests find SIPVicious: a virtualenv of its own under target/, so that nothing
/// is installed into the system's Python.
pub fn sipvicious_venv(root: &Path) -> std::path::PathBuf {
    root.join("target/test-tools/sipvicious")
}

/// SIPVicious from PyPI (pinned), the scanner real attackers run.
fn ensure_sipvicious(root: &Path) -> anyhow::Result<()> {
    let venv = sipvicious_venv(root);
    let what = format!(
        "sipvicious {SIPVICIOUS_VERSION} (PyPI, in {})",
        venv.display()
    );
    let pip = venv.join("bin/pip");
    let installed = output(&pip.display().to_string(), &["show", "sipvicious"])
        .is_some_and(|v| v.contains(&format!("Version: {SIPVICIOUS_VERSION}")));
    if installed {
        progress(&what, "present");
        return Ok(());
    }
    if output("python3", &["-c", "import venv, ensurepip"]).is_none() {
        apt_install("python3-venv", "SIPVicious is installed into a virtualenv")?;
    }
    run_step(
        "a virtualenv for sipvicious",
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
    )?;
    run_step(
        &what,
        Command::new(&pip).args([
            "install",
            "-q",
            &format!("sipvicious=={SIPVICIOUS_VERSION}"),
        ]),
    )
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, for the fuzz targets' runs in `test` and `fuzz` (it uses the eBPF nightly).
pub fn ensure_fuzz_tools() -> anyhow::Result<()> {
    let what = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    if output("cargo", &["fuzz", "--version"]).is_some_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        progress(&what, "present");
        return Ok(());
    }
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]);
    run_step(&format!("{what}, building from crates.io"), &mut cmd)
}

const CARGO_DEB_VERSION: &str = "3.8.0";

/// cargo-deb, which `cargo xtask package` builds the .deb with.
pub fn ensure_package_tools() -> anyhow::Result<()> {
    let what = format!("cargo-deb {CARGO_DEB_VERSION}");
    if output("cargo", &["deb", "--version"]).is_some_and(|v| v.contains(CARGO_DEB_VERSION)) {
        progress(&what, "present");
        return Ok(());
    }
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args([
        "install",
        "cargo-deb",
        "--version",
        CARGO_DEB_VERSION,
        "--locked",
    ]);
    run_step(&format!("{what}, building from crates.io"), &mut cmd)
}

/// rpmbuild, which builds the RPM from the spec; rpmlint, which the packaging test runs.
pub fn ensure_rpm_tools() -> anyhow::Result<()> {
    ensure_tool(
        "rpmbuild",
        &["--version"],
        "rpm",
        "`cargo xtask package --rpm` builds the RPM with rpmbuild",
    )?;
    ensure_tool(
        "rpmlint",
        &["--version"],
        "rpmlint",
        "the packaging test lints the RPM",
    )
}

/// The Rust standard library for `triple`, which the package builds link.
pub fn ensure_rust_target(triple: &str) -> anyhow::Result<()> {
    let toolchain = host_toolchain()?;
    let installed = output(
        "rustup",
        &["target", "list", "--installed", "--toolchain", &toolchain],
    )
    .unwrap_or_default();
    let what = format!("Rust target {triple} for {toolchain}");
    if installed.lines().any(|l| l.trim() == triple) {
        progress(&what, "present");
        return Ok(());
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", "--toolchain", &toolchain, triple]);
    run_step(&what, &mut cmd)
}

const ZIGLANG_VERSION: &str = "0.17.1";
const CARGO_ZIGBUILD_VERSION: &str = "0.24.1";

/// zig and cargo-zigbuild (PyPI, pinned, both prebuilt) in a virtualenv of their own under
/// target/: the package builds link with zig against an older glibc's symbols. Its path.
pub fn ensure_zigbuild(root: &Path) -> anyhow::Result<std::path::PathBuf> {
    let venv = root.join("target/build-tools/zigbuild");
    let what = format!(
        "zig {ZIGLANG_VERSION} and cargo-zigbuild {CARGO_ZIGBUILD_VERSION} (PyPI, in {})",
        venv.display()
    );
    let python = venv.join("bin/python");
    let zig = output(&python.display().to_string(), &["-m", "ziglang", "version"]);
    let zigbuild = output(
        &venv.join("bin/cargo-zigbuild").display().to_string(),
        &["--version"],
    );
    if zig.is_some_and(|v| v.trim() == ZIGLANG_VERSION)
        && zigbuild.is_some_and(|v| v.contains(CARGO_ZIGBUILD_VERSION))
    {
        progress(&what, "present");
        return Ok(venv);
    }
    if output("python3", &["-c", "import venv, ensurepip"]).is_none() {
        apt_install("python3-venv", "zig is installed into a virtualenv")?;
    }
    run_step(
        "a virtualenv for zig",
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
    )?;
    run_step(
        &what,
        Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            &format!("ziglang=={ZIGLANG_VERSION}"),
            &format!("cargo-zigbuild=={CARGO_ZIGBUILD_VERSION}"),
        ]),
    )?;
    Ok(venv)
}

/// What `cargo xtask compat` boots Debian's kernels with (and, for `arm64`, its arm64 one).
pub fn ensure_compat_tools(arm64: bool) -> anyhow::Result<()> {
    if arm64 {
        ensure_tool(
            "qemu-system-aarch64",
            &["--version"],
            "qemu-system-arm",
            "the compat check boots Debian's arm64 kernel under qemu",
        )?;
    }
    ensure_tool(
        "qemu-system-x86_64",
        &["--version"],
        "qemu-system-x86",
        "the compat check boots Debian's kernels under qemu",
    )?;
    ensure_tool(
        "cpio",
        &["--version"],
        "cpio",
        "the compat check packs its initramfs with cpio",
    )?;
    ensure_tool(
        "xz",
        &["--version"],
        "xz-utils",
        "the compat check unpacks Debian 13's compressed kernel modules",
    )?;
    ensure_tool(
        "readelf",
        &["--version"],
        "binutils",
        "the compat check finds the libraries its guests' binaries load with readelf",
    )
}

/// The firewalls `cargo xtask bench` compares apiban with.
pub fn ensure_bench_tools() -> anyhow::Result<()> {
    for (program, package) in [
        ("iptables", "iptables"),
        ("ipset", "ipset"),
        ("nft", "nftables"),
    ] {
        ensure_tool(
            program,
            &["--version"],
            package,
            "the benchmark compares apiban with it",
        )?;
    }
    Ok(())
}

fn ensure_tool(program: &str, args: &[&str], package: &str, why: &str) -> anyhow::Result<()> {
    if output(program, args).is_some() {
        progress(package, "present");
        return Ok(());
    }
    apt_install(package, why)
}

/// Debian's CrowdSec, whose Local API the CrowdSec tests run privately. Its postinst
/// registers with CrowdSec's Central API, which cannot be reached here; a non-empty
/// online_api_credentials.yaml makes it skip that (README.Debian), and nothing is started.
fn ensure_crowdsec() -> anyhow::Result<()> {
    if output("cscli", &["version"]).is_some() && Path::new("/usr/bin/crowdsec").exists() {
        progress("crowdsec", "present");
        return Ok(());
    }
    let credentials = Path::new("/etc/crowdsec/online_api_credentials.yaml");
    if crate::is_root() && !credentials.exists() {
        std::fs::create_dir_all("/etc/crowdsec").context("cannot create /etc/crowdsec")?;
        std::fs::write(
            credentials,
            "# no CAPI: written by `cargo xtask setup`, so that installing makes no online call\n",
        )
        .context("cannot write /etc/crowdsec/online_api_credentials.yaml")?;
    }
    apt_install(
        "crowdsec",
        "the CrowdSec tests read decisions from its Local API",
    )
}

fn apt_install(package: &str, why: &str) -> anyhow::Result<()> {
    let debian = Path::new("/etc/debian_version").exists();
    let root = crate::is_root();
    if !(debian && root) {
        bail!(
            "{package} is missing ({why}); install it with your package manager \
             (Debian/Ubuntu: `apt-get install {package}` as root), then run `cargo xtask setup`"
        );
    }
    run_step(
        "apt package lists",
        Command::new("apt-get").arg("update").arg("-q"),
    )?;
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", package]);
    run_step(package, &mut cmd)
}
