//! What the agent tells the operator around its run: interfaces it waits for, attachments
//! nobody configured, what stays enforced when it stops, its periodic counters, and a dry
//! run's result.

use super::*;

/// Waits up to `timeout` for every interface to exist: at boot, udev may still be renaming
/// them, and a VLAN or bond may be created later. Interfaces that exist but are down are
/// fine: the program attaches to them now and runs when they come up.
pub(super) fn wait_for_interfaces(ifaces: &[String], timeout: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    let mut announced = false;
    loop {
        let missing: Vec<&str> = ifaces
            .iter()
            .filter(|i| loader::ifindex(i).is_none())
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "interface {} did not appear within {} (--iface-wait); check the name with \
                 `ip link`, or raise --iface-wait if it is created late in boot",
                missing.join(", "),
                crate::human::format_duration(timeout)
            );
        }
        if !announced {
            tracing::warn!(
                missing = missing.join(","),
                "waiting up to {} for the interface to appear",
                crate::human::format_duration(timeout)
            );
            announced = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Interfaces where apiban's program still runs from an earlier configuration: it keeps
/// enforcing there on the shared maps, which may not be what the operator wants.
pub(super) fn warn_unconfigured_attachments(config: &AgentConfig) {
    let Ok(pins) = loader::attached_pins(&config.attach.bpffs_dir) else {
        return;
    };
    for (iface, _) in pins {
        if !config.attach.ifaces.contains(&iface) && loader::ifindex(&iface).is_some() {
            tracing::warn!(
                iface,
                "apiban's program still runs on this interface, which is not configured; \
                 `apiban detach --iface {iface}` removes it"
            );
        }
    }
}

/// The last word on stopping, from what the kernel says runs on each interface now.
/// `enforced` is how many prefixes the maps hold, when the owner could still say.
pub(super) fn report_stop(enforcement: &loader::Enforcement, enforced: Option<usize>) {
    let mut kept = Vec::new();
    for (attachment, state) in enforcement.check() {
        match state {
            loader::AttachmentState::Enforcing { mode } => {
                kept.push(format!("{} ({mode})", attachment.iface));
            }
            loader::AttachmentState::Replaced { found } => tracing::warn!(
                iface = attachment.iface,
                found = %found.map(|p| format!("program {}", p.id)).unwrap_or_else(|| "none".into()),
                "stopped; apiban's program no longer runs on this interface: nothing is \
                 enforced there"
            ),
            loader::AttachmentState::Gone => {
                tracing::warn!(iface = attachment.iface, "stopped; the interface is gone")
            }
            loader::AttachmentState::Unknown(why) => tracing::warn!(
                iface = attachment.iface,
                %why,
                "stopped; cannot confirm that the program stays attached"
            ),
        }
    }
    if !kept.is_empty() {
        let what = match enforced {
            Some(1) => "1 prefix".to_owned(),
            Some(n) => format!("{n} prefixes"),
            None => "the bans in its maps".to_owned(),
        };
        tracing::info!(
            prog_id = enforcement.program_id(),
            "stopped; checked with the kernel: the XDP program stays attached to {} and keeps \
             enforcing {what}",
            kept.join(", ")
        );
    }
}

pub(super) fn log_stats(dataplane: Option<&crate::dataplane::DataplaneReader>, enforced: usize) {
    let Some(dataplane) = dataplane else {
        tracing::info!(would_block = enforced, "dry run");
        return;
    };
    match dataplane.stats() {
        Ok(stats) => {
            use apiban_common::Verdict;
            tracing::info!(
                enforced,
                dropped = stats.get(Verdict::Dropped).packets,
                allowed = stats.get(Verdict::Allowed).packets,
                passed = stats.get(Verdict::Passed).packets,
                not_ip = stats.get(Verdict::NotIp).packets,
                malformed = stats.get(Verdict::Malformed).packets,
                "dataplane counters"
            )
        }
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "could not read dataplane counters")
        }
    }
}

/// What a dry run would have blocked, on stdout, one prefix per line.
pub(super) fn report_dry_run(enforced: &std::collections::BTreeSet<ipnet::IpNet>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for net in enforced {
        let _ = writeln!(out, "{net}");
    }
    tracing::info!(
        prefixes = enforced.len(),
        "dry run: the prefixes above would be blocked"
    );
}
