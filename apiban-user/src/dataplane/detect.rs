//! The detection side of the program's maps: its settings, the SIP ports, and the ring
//! buffer of samples. None of them is pinned (see `map_names::DETECT_CONFIG`); the detection
//! task owns them, and nothing here touches what is enforced.

use apiban_common::{DetectConfig, SCOPE_PORT_SLOTS, detect, map_names};
use aya::maps::{Array, MapData, PerCpuArray, RingBuf};

use super::DataplaneError;

pub struct DetectTap {
    pub switches: DetectSwitches,
    pub samples: RingBuf<MapData>,
    pub counts: DetectCounts,
}

/// What the program passed over without reading it as a request (per CPU, summed here).
pub struct DetectCounts(PerCpuArray<MapData, u64>);

/// `DETECT_COUNTS`, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassedOver {
    pub keepalives: u64,
    pub tls: u64,
    pub untracked: u64,
}

impl DetectCounts {
    pub fn read(&self) -> Result<PassedOver, DataplaneError> {
        let sum = |slot| {
            self.0
                .get(&slot, 0)
                .map(|per_cpu| per_cpu.iter().sum::<u64>())
                .map_err(|source| DataplaneError::Map {
                    name: map_names::DETECT_COUNTS,
                    source,
                })
        };
        Ok(PassedOver {
            keepalives: sum(detect::COUNT_KEEPALIVES)?,
            tls: sum(detect::COUNT_TLS)?,
            untracked: sum(detect::COUNT_UNTRACKED)?,
        })
    }
}

/// Detection's settings in the program.
pub struct DetectSwitches {
    config: Array<MapData, DetectConfig>,
    ports: Array<MapData, u8>,
    /// The ports marked now, so that a change clears only what it must.
    marked: Vec<u16>,
}

impl DetectTap {
    /// Takes the detection maps out of a loaded object.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, DataplaneError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DataplaneError::MissingMap { name })
        };
        let typed = |name: &'static str| move |source| DataplaneError::Map { name, source };
        Ok(Self {
            switches: DetectSwitches {
                config: Array::try_from(take(map_names::DETECT_CONFIG)?)
                    .map_err(typed(map_names::DETECT_CONFIG))?,
                ports: Array::try_from(take(map_names::SIP_PORTS)?)
                    .map_err(typed(map_names::SIP_PORTS))?,
                marked: Vec::new(),
            },
            samples: RingBuf::try_from(take(map_names::SIP_SAMPLES)?)
                .map_err(typed(map_names::SIP_SAMPLES))?,
            counts: DetectCounts(
                PerCpuArray::try_from(take(map_names::DETECT_COUNTS)?)
                    .map_err(typed(map_names::DETECT_COUNTS))?,
            ),
        })
    }
}

impl DetectSwitches {
    /// Marks the SIP ports (`tls` ones as SIP over TLS, counted and never read), then
    /// writes the settings: the program sees ports before it is told to look at them. An
    /// all-zero `config` turns detection off.
    pub fn set(
        &mut self,
        config: DetectConfig,
        ports: &[u16],
        tls: &[u16],
    ) -> Result<(), DataplaneError> {
        let err = |name| move |source| DataplaneError::Map { name, source };
        let marks = ports
            .iter()
            .map(|p| (*p, detect::PORT_SIP))
            .chain(tls.iter().map(|p| (*p, detect::PORT_TLS)));
        for (port, kind) in marks {
            if u32::from(port) < SCOPE_PORT_SLOTS {
                self.ports
                    .set(u32::from(port), &kind, 0)
                    .map_err(err(map_names::SIP_PORTS))?;
            }
        }
        for old in self
            .marked
            .iter()
            .filter(|p| !ports.contains(p) && !tls.contains(p))
        {
            self.ports
                .set(u32::from(*old), &0, 0)
                .map_err(err(map_names::SIP_PORTS))?;
        }
        self.marked = ports.iter().chain(tls).copied().collect();
        self.config
            .set(0, &config, 0)
            .map_err(err(map_names::DETECT_CONFIG))
    }
}
