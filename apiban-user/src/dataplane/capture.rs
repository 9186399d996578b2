//! The capture side of the program's maps: what to capture, the ring buffer of captured
//! packets and the cap's counters. Not pinned (see `map_names::CAPTURE_CONFIG`); the capture
//! session owns them while it runs. The switch that makes the program look at them is a flag
//! in `CONFIG`, which only the ledger's owner writes (see `Dataplane::set_capture`).

use apiban_common::{CaptureBudget, CaptureConfig, map_names};
use aya::maps::{Array, MapData, RingBuf};

use super::DataplaneError;

pub struct CaptureTap {
    pub controls: CaptureControls,
    pub ring: RingBuf<MapData>,
}

/// What the program captures, and the cap's counters.
pub struct CaptureControls {
    config: Array<MapData, CaptureConfig>,
    budget: Array<MapData, CaptureBudget>,
}

impl CaptureTap {
    /// Takes the capture maps out of a loaded object.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, DataplaneError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DataplaneError::MissingMap { name })
        };
        let typed = |name: &'static str| move |source| DataplaneError::Map { name, source };
        Ok(Self {
            controls: CaptureControls {
                config: Array::try_from(take(map_names::CAPTURE_CONFIG)?)
                    .map_err(typed(map_names::CAPTURE_CONFIG))?,
                budget: Array::try_from(take(map_names::CAPTURE_BUDGET)?)
                    .map_err(typed(map_names::CAPTURE_BUDGET))?,
            },
            ring: RingBuf::try_from(take(map_names::CAPTURE_RING)?)
                .map_err(typed(map_names::CAPTURE_RING))?,
        })
    }
}

impl CaptureControls {
    /// What the program captures once the flag is on; all zero captures nothing.
    pub fn set(&mut self, config: CaptureConfig) -> Result<(), DataplaneError> {
        self.config
            .set(0, &config, 0)
            .map_err(|source| DataplaneError::Map {
                name: map_names::CAPTURE_CONFIG,
                source,
            })
    }

    /// The cap's counters: packets over the cap, and lost for want of room.
    pub fn budget(&self) -> Result<CaptureBudget, DataplaneError> {
        self.budget
            .get(&0, 0)
            .map_err(|source| DataplaneError::Map {
                name: map_names::CAPTURE_BUDGET,
                source,
            })
    }
}
