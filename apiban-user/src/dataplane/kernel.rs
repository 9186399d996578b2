//! What the programs need of the kernel, probed the way libbpf does (a minimal program or map
//! per piece), so that the agent knows before loading which of its features this kernel can
//! run, says which are off and why, and a load that still fails names what is missing.
//!
//! Enforcement (the drop path) needs Linux 5.10 at most; detection and capture copy packets
//! with `bpf_xdp_load_bytes` (5.18); the server's answers need tcx (6.6). One eBPF object
//! serves all of them: the loader sets the program's `KERNEL_FEATURES` global from these
//! probes (`apiban_common::kernel_features`) and the verifier skips the code of what is off.
//! `cargo xtask compat` boots Debian 11's 5.10, 12's 6.1 and 13's kernel and checks each.

use std::fmt;

use apiban_common::kernel_features;
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use serde::{Deserialize, Serialize};

/// The oldest upstream kernel that enforces (every requirement of [`Feature::Enforcement`]).
pub const OLDEST_SUPPORTED: &str = "5.10";

/// What the agent does that depends on the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Feature {
    /// The XDP drop path: bans, the allowlist, scope, counters, observe mode, hit times.
    Enforcement,
    /// SIP scanner detection from sampled requests (`--detect`).
    Detection,
    /// Detection's rules on the server's answers (the egress classifier).
    DetectionAnswers,
    /// `apiban capture`.
    Capture,
}

impl Feature {
    pub const ALL: [Feature; 4] = [
        Feature::Enforcement,
        Feature::Detection,
        Feature::DetectionAnswers,
        Feature::Capture,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Enforcement => "enforcement",
            Feature::Detection => "detection",
            Feature::DetectionAnswers => "detection-answers",
            Feature::Capture => "capture",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug)]
enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(BpfHelper),
    /// The tcx hooks: a BPF_PROG_QUERY of loopback's tcx egress, which older kernels refuse.
    Tcx,
}

/// One thing a program uses, the upstream release that brought it, and the features that
/// need it.
#[derive(Clone, Copy, Debug)]
pub struct Requirement {
    pub what: &'static str,
    pub since: &'static str,
    pub needed_by: &'static [Feature],
    probe: Probe,
}

const SAMPLES: &[Feature] = &[
    Feature::Detection,
    Feature::DetectionAnswers,
    Feature::Capture,
];

pub const REQUIREMENTS: [Requirement; 9] = [
    Requirement {
        what: "XDP programs",
        since: "4.8",
        needed_by: &[Feature::Enforcement],
        probe: Probe::Program(ProgramType::Xdp),
    },
    Requirement {
        what: "LPM trie maps",
        since: "4.11",
        needed_by: &[Feature::Enforcement],
        probe: Probe::Map(MapType::LpmTrie),
    },
    Requirement {
        what: "per-CPU arrays",
        since: "4.6",
        needed_by: &[Feature::Enforcement],
        probe: Probe::Map(MapType::PerCpuArray),
    },
    Requirement {
        what: "bpf_jiffies64 in XDP",
        since: "5.5",
        needed_by: &[Feature::Enforcement],
        probe: Probe::Helper(BpfHelper::BPF_FUNC_jiffies64),
    },
    Requirement {
        what: "LRU hash maps",
        since: "4.10",
        needed_by: &[Feature::Detection, Feature::DetectionAnswers],
        probe: Probe::Map(MapType::LruHash),
    },
    Requirement {
        what: "BPF ring buffers",
        since: "5.8",
        needed_by: SAMPLES,
        probe: Probe::Map(MapType::RingBuf),
    },
    Requirement {
        what: "bpf_ringbuf_reserve in XDP",
        since: "5.8",
        needed_by: SAMPLES,
        probe: Probe::Helper(BpfHelper::BPF_FUNC_ringbuf_reserve),
    },
    Requirement {
        what: "bpf_xdp_load_bytes in XDP",
        since: "5.18",
        needed_by: SAMPLES,
        probe: Probe::Helper(BpfHelper::BPF_FUNC_xdp_load_bytes),
    },
    Requirement {
        what: "tcx hooks",
        since: "6.6",
        needed_by: &[Feature::DetectionAnswers],
        probe: Probe::Tcx,
    },
];

impl Requirement {
    /// Some(false) when the kernel lacks it, None when the probe could not tell.
    pub fn present(&self) -> Option<bool> {
        match self.probe {
            Probe::Program(t) => is_program_supported(t).ok(),
            Probe::Map(t) => is_map_supported(t).ok(),
            Probe::Helper(h) => is_helper_supported(ProgramType::Xdp, h).ok(),
            Probe::Tcx => match super::objects::tcx_egress_program_ids(1) {
                Ok(_) => Some(true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Some(false),
                Err(_) => None,
            },
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (Linux {})", self.what, self.since)
    }
}

/// What this kernel lets the agent do: each feature, and what it lacks for those that are off.
#[derive(Clone, Debug)]
pub struct KernelFeatures {
    pub release: String,
    missing: Vec<Requirement>,
}

impl KernelFeatures {
    /// Probes this kernel. A probe that cannot tell counts as present: the verifier or the
    /// attach then has the last word, and says what failed.
    pub fn probe() -> Self {
        Self::with_missing(
            release(),
            REQUIREMENTS
                .into_iter()
                .filter(|r| r.present() == Some(false))
                .collect(),
        )
    }

    pub fn with_missing(release: String, missing: Vec<Requirement>) -> Self {
        Self { release, missing }
    }

    /// What `feature` needs that this kernel lacks; empty when it is on.
    pub fn lacks(&self, feature: Feature) -> Vec<Requirement> {
        self.missing
            .iter()
            .filter(|r| r.needed_by.contains(&feature))
            .copied()
            .collect()
    }

    pub fn has(&self, feature: Feature) -> bool {
        self.lacks(feature).is_empty()
    }

    /// The program's `KERNEL_FEATURES` for this kernel.
    pub fn program_mask(&self) -> u32 {
        if self.has(Feature::Detection) || self.has(Feature::Capture) {
            kernel_features::PAYLOAD_COPY
        } else {
            0
        }
    }

    /// The oldest upstream release with everything `feature` needs.
    pub fn needs_linux(feature: Feature) -> &'static str {
        REQUIREMENTS
            .iter()
            .filter(|r| r.needed_by.contains(&feature))
            .max_by_key(|r| version(r.since))
            .map_or("4.8", |r| r.since)
    }

    /// Why `feature` is off, in one clause an operator can act on; None when it is on.
    pub fn why_off(&self, feature: Feature) -> Option<String> {
        let lacks = self.lacks(feature);
        (!lacks.is_empty()).then(|| {
            let items: Vec<String> = lacks.iter().map(ToString::to_string).collect();
            format!(
                "needs Linux {} or newer; this kernel ({}) lacks {}",
                Self::needs_linux(feature),
                self.release,
                items.join(", ")
            )
        })
    }

    /// Every feature, on or off, with its reason: what `status` and /metrics show.
    pub fn report(&self) -> Vec<FeatureState> {
        Feature::ALL
            .into_iter()
            .map(|feature| FeatureState {
                feature,
                enabled: self.has(feature),
                why_off: self.why_off(feature),
            })
            .collect()
    }
}

/// One feature as `status` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureState {
    pub feature: Feature,
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_off: Option<String>,
}

fn version(since: &str) -> (u32, u32) {
    let (major, minor) = since.split_once('.').unwrap_or((since, "0"));
    (major.parse().unwrap_or(0), minor.parse().unwrap_or(0))
}

/// `uname -r`.
pub fn release() -> String {
    // SAFETY: utsname is plain data that uname fills in.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uts is a valid utsname to write.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates release.
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// One sentence for an operator whose kernel cannot enforce: what it lacks, and what would
/// have it.
pub fn describe_missing(features: &KernelFeatures) -> String {
    let items: Vec<String> = features
        .lacks(Feature::Enforcement)
        .iter()
        .map(ToString::to_string)
        .collect();
    format!(
        "this kernel ({}) lacks {}; apiban needs Linux {OLDEST_SUPPORTED} or newer (checked on \
         Debian 11's 5.10, 12's 6.1 and 13's kernel)",
        features.release,
        items.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_without(whats: &[&str]) -> KernelFeatures {
        KernelFeatures::with_missing(
            "5.10.0-33-amd64".into(),
            REQUIREMENTS
                .into_iter()
                .filter(|r| whats.contains(&r.what))
                .collect(),
        )
    }

    #[test]
    fn a_5_10_kernel_enforces_and_says_why_the_rest_is_off() {
        let k = kernel_without(&["bpf_xdp_load_bytes in XDP", "tcx hooks"]);
        assert!(k.has(Feature::Enforcement));
        assert!(!k.has(Feature::Detection) && !k.has(Feature::Capture));
        assert_eq!(k.program_mask(), 0);
        assert_eq!(
            k.why_off(Feature::Detection).as_deref(),
            Some(
                "needs Linux 5.18 or newer; this kernel (5.10.0-33-amd64) lacks \
                 bpf_xdp_load_bytes in XDP (Linux 5.18)"
            )
        );
        assert_eq!(
            k.why_off(Feature::DetectionAnswers).as_deref(),
            Some(
                "needs Linux 6.6 or newer; this kernel (5.10.0-33-amd64) lacks \
                 bpf_xdp_load_bytes in XDP (Linux 5.18), tcx hooks (Linux 6.6)"
            )
        );
    }

    #[test]
    fn a_6_1_kernel_detects_from_requests_only() {
        let k = kernel_without(&["tcx hooks"]);
        assert!(k.has(Feature::Detection) && k.has(Feature::Capture));
        assert!(!k.has(Feature::DetectionAnswers));
        assert_eq!(k.program_mask(), kernel_features::PAYLOAD_COPY);
    }

    #[test]
    fn the_message_names_what_is_missing_and_since_when() {
        let k = kernel_without(&["bpf_jiffies64 in XDP"]);
        assert!(!k.has(Feature::Enforcement));
        assert_eq!(
            describe_missing(&k),
            "this kernel (5.10.0-33-amd64) lacks bpf_jiffies64 in XDP (Linux 5.5); apiban needs \
             Linux 5.10 or newer (checked on Debian 11's 5.10, 12's 6.1 and 13's kernel)"
        );
    }

    #[test]
    fn the_oldest_supported_covers_enforcement() {
        let newest = KernelFeatures::needs_linux(Feature::Enforcement);
        assert!(version(newest) <= version(OLDEST_SUPPORTED), "{newest}");
        assert_eq!(KernelFeatures::needs_linux(Feature::Detection), "5.18");
        assert_eq!(KernelFeatures::needs_linux(Feature::Capture), "5.18");
    }
}
