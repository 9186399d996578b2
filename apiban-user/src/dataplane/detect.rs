//! The detection side of the program's maps: its settings, the SIP ports, and the ring
//! buffer of samples. None of them is pinned (see `map_names::DETECT_CONFIG`); the detection
//! task owns them, and nothing here touches what is enforced.

use apiban_common::{DetectConfig, SCOPE_PORT_SLOTS, map_names};
use aya::maps::{Array, MapData, RingBuf};

use super::DataplaneError;

pub struct DetectTap {
    pub switches: DetectSwitches,
    pub samples: RingBuf<MapData>,
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
        })
    }
}

impl DetectSwitches {
    /// Marks the SIP ports, then writes the settings: the program sees ports before it is
    /// told to look at them. An all-zero `config` turns detection off.
    pub fn set(&mut self, config: DetectConfig, ports: &[u16]) -> Result<(), DataplaneError> {
        let err = |name| move |source| DataplaneError::Map { name, source };
        for port in ports {
            if u32::from(*port) < SCOPE_PORT_SLOTS {
                self.ports
                    .set(u32::from(*port), &1, 0)
                    .map_err(err(map_names::SIP_PORTS))?;
            }
        }
        for old in self.marked.iter().filter(|p| !ports.contains(p)) {
            self.ports
                .set(u32::from(*old), &0, 0)
                .map_err(err(map_names::SIP_PORTS))?;
        }
        self.marked = ports.to_vec();
        self.config
            .set(0, &config, 0)
            .map_err(err(map_names::DETECT_CONFIG))
    }
}
