//! The names the agent finds the eBPF object's maps and programs by.

/// Names of the maps in the eBPF object. The agent pins each under its bpffs directory with
/// this name, so a renamed map is a breaking change for adoption of pinned state.
pub mod map_names {
    /// Banned single hosts (/32, /128): the open-addressed tables of [`crate::host_table`],
    /// keys and hit counts in separate arrays.
    pub const DENY_V4_HOST_KEYS: &str = "DENY_V4_HOST_KEYS";
    pub const DENY_V6_HOST_KEYS: &str = "DENY_V6_HOST_KEYS";
    pub const DENY_V4_HOST_HITS: &str = "DENY_V4_HOST_HITS";
    pub const DENY_V6_HOST_HITS: &str = "DENY_V6_HOST_HITS";
    /// The bucket counts of both host tables, which the program needs to find a home bucket.
    pub const HOST_TABLES: &str = "HOST_TABLES";
    /// The host hashes of versions before the host tables. A starting agent moves what they
    /// hold into the tables before its program is attached, then removes their pins.
    pub const LEGACY_DENY_V4_HOSTS: &str = "DENY_V4_HOSTS";
    pub const LEGACY_DENY_V6_HOSTS: &str = "DENY_V6_HOSTS";
    /// Banned prefixes shorter than a host: LPM tries.
    pub const DENY_V4: &str = "DENY_V4";
    pub const DENY_V6: &str = "DENY_V6";
    /// One bit per IPv4 /24 (IPv6: per hashed /48) that a deny entry covers; see [`crate::block_filter`].
    pub const DENY_V4_FILTER: &str = "DENY_V4_FILTER";
    pub const DENY_V6_FILTER: &str = "DENY_V6_FILTER";
    /// The same for allow entries.
    pub const ALLOW_V4_FILTER: &str = "ALLOW_V4_FILTER";
    pub const ALLOW_V6_FILTER: &str = "ALLOW_V6_FILTER";
    pub const ALLOW_V4: &str = "ALLOW_V4";
    pub const ALLOW_V6: &str = "ALLOW_V6";
    /// Packets and bytes per verdict and interface. Renamed from `STATS` when the `observed`
    /// verdict made its layout grow: a starting agent removes the old pin (see
    /// [`LEGACY_STATS`]), so counters restart from zero once, on that upgrade.
    pub const STATS: &str = "VERDICT_STATS";
    pub const LEGACY_STATS: &str = "STATS";
    /// Per-CPU; rebuilt on every load, so not pinned.
    pub const HIT_CLOCK: &str = "HIT_CLOCK";
    pub const CONFIG: &str = "CONFIG";
    pub const SCOPE_PORTS: &str = "SCOPE_PORTS";
    /// ifindex -> counter slot, so counters are per interface without a hash lookup.
    pub const IFACE_SLOTS: &str = "IFACE_SLOTS";
    /// SIP scanner detection (see [`crate::detect`]): its settings, the SIP ports, the
    /// per-source request counts and the samples sent to the agent. Rebuilt on every load,
    /// so not pinned: a program left running without its agent detects nothing new.
    pub const DETECT_CONFIG: &str = "DETECT_CONFIG";
    pub const SIP_PORTS: &str = "SIP_PORTS";
    pub const SIP_SOURCES: &str = "SIP_SOURCES";
    pub const SIP_SAMPLES: &str = "SIP_SAMPLES";
    pub const SAMPLE_BUDGET: &str = "SAMPLE_BUDGET";
    pub const DETECT_COUNTS: &str = "DETECT_COUNTS";
    /// `apiban capture` (see [`crate::capture`]): what to capture, the records, the cap.
    /// Rebuilt on every load like detection's; the switch is a flag in the pinned `CONFIG`,
    /// which a starting agent clears.
    pub const CAPTURE_CONFIG: &str = "CAPTURE_CONFIG";
    pub const CAPTURE_RING: &str = "CAPTURE_RING";
    pub const CAPTURE_BUDGET: &str = "CAPTURE_BUDGET";
    /// Only used by the benchmark programs; never pinned.
    pub const BENCH_PARAMS: &str = "BENCH_PARAMS";
    /// The yardsticks' arrays (the size of the IPv4 host table's keys and of its hit counts)
    /// and the peers' maps: a hash of hosts and one LPM trie of everything.
    pub const BENCH_LIMIT_KEYS: &str = "BENCH_LIMIT_KEYS";
    pub const BENCH_LIMIT_HITS: &str = "BENCH_LIMIT_HITS";
    pub const BENCH_HASH_V4: &str = "BENCH_HASH_V4";
    pub const BENCH_LPM_V4: &str = "BENCH_LPM_V4";
    pub const TRAFFICGEN: &str = "TRAFFICGEN";
    pub const TRAFFICGEN_SOURCES: &str = "TRAFFICGEN_SOURCES";

    /// The maps that hold enforcement state and are pinned for adoption across restarts.
    pub const PINNED: [&str; 17] = [
        DENY_V4_HOST_KEYS,
        DENY_V6_HOST_KEYS,
        DENY_V4_HOST_HITS,
        DENY_V6_HOST_HITS,
        HOST_TABLES,
        DENY_V4,
        DENY_V6,
        DENY_V4_FILTER,
        DENY_V6_FILTER,
        ALLOW_V4_FILTER,
        ALLOW_V6_FILTER,
        ALLOW_V4,
        ALLOW_V6,
        STATS,
        CONFIG,
        SCOPE_PORTS,
        IFACE_SLOTS,
    ];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// The production XDP program.
    pub const APIBAN: &str = "apiban";
    /// The production TC egress classifier: the SIP responses detection's sources get.
    pub const EGRESS: &str = "apiban_egress";
    /// A bare `XDP_DROP`: the cost floor of an XDP program on this machine.
    pub const BENCH_FLOOR: &str = "bench_floor";
    /// A bare `TC_ACT_OK` classifier: the floor of the egress program's cost.
    pub const BENCH_TC_FLOOR: &str = "bench_tc_floor";
    /// The production logic behind a step that rewrites the source address on every run, so
    /// that `BPF_PROG_TEST_RUN` with `repeat` cycles through many distinct keys.
    pub const BENCH_CYCLE: &str = "bench_cycle";
    /// A traffic generator for the veth benchmark: rewrites the source address of each live
    /// frame and redirects it into a veth, as xdp-trafficgen does.
    pub const BENCH_TRAFFICGEN: &str = "bench_trafficgen";
    /// The physical limit: the same parse, then one dependent random 8-byte load from an array
    /// the size of the host table's keys (`_2`: and a second load, dependent on the first,
    /// from one the size of its hit counts). No lookup of a table that size is cheaper.
    pub const BENCH_LIMIT_1: &str = "bench_limit_1";
    pub const BENCH_LIMIT_2: &str = "bench_limit_2";
    /// The peers: the same bans in a `BPF_MAP_TYPE_HASH` of hosts (as xdp-filter and most
    /// XDP blocklists keep them), and in a single LPM trie (where apiban started).
    pub const BENCH_HASH: &str = "bench_hash";
    pub const BENCH_LPM: &str = "bench_lpm";
    /// Prototypes of other host-table layouts (see the benchmark's prototype table).
    pub const BENCH_PROTOS: [&str; 18] = [
        "bench_proto_prod_classify",
        "bench_proto_prod_classify_untracked",
        "bench_proto_prod_counted",
        "bench_proto_prod_lookup",
        "bench_proto_prod_hosts",
        "bench_proto_keys_mmap",
        "bench_proto_filter_branch_key",
        "bench_proto_filter_key",
        "bench_proto_bloom_key",
        "bench_proto_filter_key_hits_atomic",
        "bench_proto_filter_key_hits_plain",
        "bench_proto_filter_coloc8_atomic",
        "bench_proto_filter_coloc8_plain",
        "bench_proto_filter_coloc16_plain",
        "bench_proto_bloom_coloc8_plain",
        "bench_proto_prod_lookup_paced",
        "bench_proto_prod_lookup_booked",
        "bench_proto_prod_lookup_logged",
    ];
    /// The one-load limit with work added after the load: 48 and 96 additions that do not
    /// wait for it, 48 that do, and the production's per-interface counter (see the
    /// benchmark's pipeline table).
    pub const BENCH_PIPELINE: [&str; 4] = [
        "bench_pipe_limit_pad",
        "bench_pipe_limit_pad_twice",
        "bench_pipe_limit_pad_dependent",
        "bench_pipe_limit_counted",
    ];
}
