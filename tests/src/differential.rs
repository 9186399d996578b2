//! The XDP program against an independent model of its policy (`reference`), frame by
//! frame under BPF_PROG_TEST_RUN, on frames from `framegen`: the engine of
//! tests/tests/differential.rs, and of the kernel check that `cargo xtask compat` boots on
//! older kernels (src/bin/apiban-kernel-check.rs).

use std::{collections::BTreeSet, path::Path};

use apiban::{
    dataplane::{Scope, loader},
    ledger::{Ledger, SourceId},
    sanitise::AllowList,
};
use apiban_common::{Counter, VERDICT_COUNT, Verdict, map_names};
use aya::maps::{Map, MapData, PerCpuArray};
use ipnet::IpNet;

use crate::{
    BpffsDir,
    framegen::FrameGen,
    reference::{self, Policy},
};

pub fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter()
        .map(|s| s.parse().expect("a test prefix"))
        .collect()
}

/// The program with a policy in its maps.
pub struct Under {
    pub loaded: loader::Loaded,
    stats: PerCpuArray<MapData, Counter>,
    _dir: BpffsDir,
}

impl Under {
    pub fn new(policy: &Policy) -> Self {
        let dir = BpffsDir::new();
        let mut loaded = loader::load(&loader::LoadOptions {
            bpffs_dir: dir.path.clone(),
            ..Default::default()
        })
        .expect("load the XDP program");
        let (enforced, observed) = marks(policy);
        loaded.dataplane.deny_batch(&enforced, false).expect("deny");
        loaded
            .dataplane
            .deny_batch(&observed, true)
            .expect("deny, observe only");
        for net in &policy.allow {
            loaded.dataplane.allow(*net).expect("allow");
        }
        let scope = match &policy.ports {
            None => Scope::All,
            Some(p) => Scope::Ports(p.clone()),
        };
        loaded.dataplane.set_scope(&scope).expect("scope");
        let stats = PerCpuArray::try_from(Map::PerCpuArray(
            MapData::from_pin(Path::new(&dir.path).join(map_names::STATS)).expect("STATS"),
        ))
        .expect("a per-CPU array");
        Self {
            loaded,
            stats,
            _dir: dir,
        }
    }

    /// Counter slot 0 ("other": test runs come in on loopback, which has no slot).
    pub fn counts(&self) -> [u64; VERDICT_COUNT as usize] {
        let mut out = [0; VERDICT_COUNT as usize];
        for v in Verdict::ALL {
            out[v as usize] = self
                .stats
                .get(&(v as u32), 0)
                .expect("a counter")
                .iter()
                .map(|c| c.packets)
                .sum();
        }
        out
    }

    /// The program's verdict on `frame`: its action, and which counter moved.
    pub fn verdict(&mut self, frame: &[u8]) -> (u32, Option<Verdict>) {
        let before = self.counts();
        let action = crate::run_frame(&mut self.loaded, frame);
        let after = self.counts();
        let moved: Vec<Verdict> = Verdict::ALL
            .into_iter()
            .filter(|v| after[*v as usize] != before[*v as usize])
            .collect();
        (action, (moved.len() == 1).then(|| moved[0]))
    }
}

/// The deny entries as the agent writes them, enforcing and observe-only: an enforcing
/// source bans `policy.deny`, a list in observe mode `policy.observe`, and the ledger says
/// which entries carry the mark.
pub fn marks(policy: &Policy) -> (Vec<IpNet>, Vec<IpNet>) {
    let trial = SourceId::List("trial".into());
    let mut ledger = Ledger::default();
    for net in &policy.deny {
        ledger.observe(*net, &SourceId::Apiban, 1, None, None);
    }
    for net in &policy.observe {
        ledger.observe(*net, &trial, 1, None, None);
    }
    // The allowlist goes into the dataplane below: the program, not the ledger, must let it win.
    let desired = ledger.desired_modes(2, &AllowList::default(), &[trial].into());
    let enforced = desired
        .nets
        .difference(&desired.observed)
        .copied()
        .collect();
    (enforced, desired.observed.into_iter().collect())
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

pub fn configurations() -> Vec<(&'static str, Policy)> {
    let deny = nets(&[
        "203.0.113.7/32",
        "203.0.113.77/32",
        "198.51.100.0/24",
        "100.64.0.0/16",
        "2001:db8::66/128",
        "2001:db8:bad::/48",
        "2001:db8:1000::/36",
    ]);
    let allow = nets(&[
        "198.51.100.10/32",
        "198.51.100.128/25",
        "100.64.7.0/24",
        "2001:db8:bad::1/128",
        "2001:db8:1000:ffff::/64",
        "45.91.0.128/25",
    ]);
    // On trial: alone, inside enforced prefixes, around enforced hosts, and listed twice.
    let observe = nets(&[
        "45.90.0.1/32",
        "45.91.0.0/24",
        "198.51.100.77/32",
        "203.0.113.7/32",
        "2001:db8:b5::/48",
        "2001:db8:b6::1/128",
        "2001:db8::66/128",
    ]);
    let deny = [deny, nets(&["45.91.0.9/32"])].concat();
    let ports: BTreeSet<u16> = [5060, 5061].into();
    let mut wide = deny.clone();
    // Wider than the filter's span: it saturates, every packet takes the full lookup.
    wide.extend(nets(&["45.0.0.0/8", "2a01::/16"]));
    vec![
        (
            "scope all, no allowlist",
            Policy {
                deny: deny.clone(),
                observe: observe.clone(),
                ..Default::default()
            },
        ),
        (
            "scope all, allowlist",
            Policy {
                deny: deny.clone(),
                observe: observe.clone(),
                allow: allow.clone(),
                ports: None,
            },
        ),
        (
            "scope ports, no allowlist",
            Policy {
                deny: deny.clone(),
                observe: observe.clone(),
                allow: vec![],
                ports: Some(ports.clone()),
            },
        ),
        (
            "scope ports, allowlist, wide prefixes",
            Policy {
                deny: wide,
                observe,
                allow,
                ports: Some(ports),
            },
        ),
    ]
}

/// What a run saw: frames per verdict the model gave, and how many were IP.
#[derive(Debug)]
pub struct Agreement {
    pub seen: [usize; VERDICT_COUNT as usize],
    pub ip_frames: usize,
}

/// `frames` generated frames (spread over [`configurations`]) through the program and the
/// model; the first disagreement, with the frame in hex, is the error.
pub fn run(frames: usize, seed: u64) -> Result<Agreement, String> {
    let configs = configurations();
    let per_config = frames.div_ceil(configs.len());
    let mut seen = [0usize; VERDICT_COUNT as usize];
    let mut ip_frames = 0usize;
    for (i, (name, policy)) in configs.iter().enumerate() {
        let mut under = Under::new(policy);
        let pools: Vec<IpNet> = policy
            .deny
            .iter()
            .chain(&policy.observe)
            .chain(&policy.allow)
            .copied()
            .collect();
        let ports: Vec<u16> = policy
            .ports
            .clone()
            .map(|p| p.into_iter().collect())
            .unwrap_or_else(|| vec![5060]);
        let mut frames = FrameGen::new(seed.wrapping_add(i as u64), pools, ports);
        for n in 0..per_config {
            let frame = frames.frame();
            let (want, reading) = reference::verdict(&frame, policy);
            if let Err(e) = reference::crosscheck(&frame, &reading) {
                return Err(format!(
                    "{name}, frame {n} (seed {seed}): the model misreads the frame: {e}\n{}",
                    reference::hex(&frame)
                ));
            }
            if reading.source.is_some() {
                ip_frames += 1;
            }
            let (action, got) = under.verdict(&frame);
            let want_action = if want == Verdict::Dropped {
                XDP_DROP
            } else {
                XDP_PASS
            };
            if got != Some(want) || action != want_action {
                // What the maps hold for the source, read from userspace: tells a program
                // that misreads its maps from maps that were never written.
                let maps = reading
                    .source
                    .map(|src| format!("{:?}", under.loaded.dataplane.verdict_for(src)));
                return Err(format!(
                    "{name}, frame {n} (seed {seed}): the program says {got:?} (action \
                     {action}), the model {want:?}; the maps, read from userspace, say \
                     {maps:?} for source {:?}\n{}",
                    reading.source,
                    reference::hex(&frame)
                ));
            }
            seen[want as usize] += 1;
        }
    }
    Ok(Agreement { seen, ip_frames })
}
