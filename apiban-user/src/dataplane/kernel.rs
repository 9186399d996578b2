//! What the XDP program needs of the kernel, probed the way libbpf does (a minimal program or
//! map per feature), so that a load that fails on an old kernel says what is missing rather
//! than only that the verifier refused.
//!
//! The oldest kernel with everything is 5.18 (`bpf_xdp_load_bytes`); the compat check
//! (`cargo xtask compat`) boots Debian 12's 6.1 and runs the program there.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// The oldest upstream kernel that has every [`REQUIREMENTS`] entry.
pub const OLDEST_SUPPORTED: &str = "5.18";

#[derive(Clone, Copy, Debug)]
enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(BpfHelper),
}

/// One thing the program uses, the upstream release that brought it, and what for.
#[derive(Clone, Copy, Debug)]
pub struct Requirement {
    pub what: &'static str,
    pub since: &'static str,
    pub used_for: &'static str,
    probe: Probe,
}

pub const REQUIREMENTS: [Requirement; 9] = [
    Requirement {
        what: "XDP programs",
        since: "4.8",
        used_for: "the dataplane itself",
        probe: Probe::Program(ProgramType::Xdp),
    },
    Requirement {
        what: "LPM trie maps",
        since: "4.11",
        used_for: "banned prefixes and the allowlist",
        probe: Probe::Map(MapType::LpmTrie),
    },
    Requirement {
        what: "LRU hash maps",
        since: "4.10",
        used_for: "SIP detection's per-source counts",
        probe: Probe::Map(MapType::LruHash),
    },
    Requirement {
        what: "per-CPU arrays",
        since: "4.6",
        used_for: "the verdict counters",
        probe: Probe::Map(MapType::PerCpuArray),
    },
    Requirement {
        what: "BPF ring buffers",
        since: "5.8",
        used_for: "detection samples and captures",
        probe: Probe::Map(MapType::RingBuf),
    },
    Requirement {
        what: "bpf_jiffies64 in XDP",
        since: "5.5",
        used_for: "hit times",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_jiffies64),
    },
    Requirement {
        what: "bpf_ktime_get_coarse_ns in XDP",
        since: "5.11",
        used_for: "hit times",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_ktime_get_coarse_ns),
    },
    Requirement {
        what: "bpf_ringbuf_reserve in XDP",
        since: "5.8",
        used_for: "detection samples and captures",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_ringbuf_reserve),
    },
    Requirement {
        what: "bpf_xdp_load_bytes in XDP",
        since: "5.18",
        used_for: "copying SIP payloads and captured packets",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_xdp_load_bytes),
    },
];

impl Requirement {
    /// Some(false) when the kernel lacks it, None when the probe could not tell.
    pub fn present(&self) -> Option<bool> {
        match self.probe {
            Probe::Program(t) => is_program_supported(t).ok(),
            Probe::Map(t) => is_map_supported(t).ok(),
            Probe::Helper(h) => is_helper_supported(ProgramType::Xdp, h).ok(),
        }
    }
}

/// The requirements this kernel lacks, as far as the probes can tell.
pub fn missing() -> Vec<Requirement> {
    REQUIREMENTS
        .into_iter()
        .filter(|r| r.present() == Some(false))
        .collect()
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

/// One sentence for an operator: what this kernel lacks, and what would have it.
pub fn describe_missing(release: &str, missing: &[Requirement]) -> String {
    let items: Vec<String> = missing
        .iter()
        .map(|r| format!("{} (Linux {}, for {})", r.what, r.since, r.used_for))
        .collect();
    format!(
        "this kernel ({release}) lacks {}; apiban needs Linux {OLDEST_SUPPORTED} or newer \
         (checked on Debian 12's 6.1)",
        items.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_what_is_missing_and_since_when() {
        let text = describe_missing("5.15.0-91-generic", &REQUIREMENTS[8..]);
        assert_eq!(
            text,
            "this kernel (5.15.0-91-generic) lacks bpf_xdp_load_bytes in XDP (Linux 5.18, for \
             copying SIP payloads and captured packets); apiban needs Linux 5.18 or newer \
             (checked on Debian 12's 6.1)"
        );
    }

    #[test]
    fn the_oldest_supported_is_the_newest_requirement() {
        let newest = REQUIREMENTS
            .iter()
            .map(|r| {
                let (major, minor) = r.since.split_once('.').expect("x.y");
                (
                    major.parse::<u32>().expect("a number"),
                    minor.parse::<u32>().expect("a number"),
                )
            })
            .max()
            .expect("requirements");
        assert_eq!(format!("{}.{}", newest.0, newest.1), OLDEST_SUPPORTED);
    }
}
