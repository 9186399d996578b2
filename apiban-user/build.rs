//! Compiles the XDP program (apiban-ebpf) with the pinned nightly and bpf-linker, so that
//! `cargo build --release` yields one `apiban` binary with the eBPF object embedded.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Must match xtask's EBPF_TOOLCHAIN and ../shared/toolchain.md: its LLVM major version has to
/// equal bpf-linker's.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

fn main() -> anyhow::Result<()> {
    // A clear message beats aya-build's spawn error when the eBPF toolchain is missing.
    let toolchain_ok = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !toolchain_ok {
        bail!("the eBPF toolchain {EBPF_TOOLCHAIN} is not installed: run `cargo xtask setup`");
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !linker_ok {
        bail!("bpf-linker is not on PATH: run `cargo xtask setup`");
    }
    // aya-build watches the eBPF crate only; the types it shares with this one live in
    // apiban-common, and a change there (a struct's size) must rebuild the object too, or
    // the two sides disagree on every record's layout.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../apiban-common")
    );
    let bench = std::env::var_os("CARGO_FEATURE_BENCH_PROGRAMS").is_some();
    let ebpf = aya_build::Package {
        name: "apiban-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../apiban-ebpf"),
        features: if bench { &["bench"] } else { &[] },
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
        .context("building the XDP program (apiban-ebpf) failed")
}
