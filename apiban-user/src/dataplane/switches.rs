//! The program's switches: the flags word of its config map and the port scope.

use std::collections::BTreeSet;

use apiban_common::{DataplaneConfig, SCOPE_PORT_SLOTS, map_names};
use aya::maps::{Array, Map, MapData};

use super::{DataplaneError, Scope};

pub struct Switches {
    config: Array<MapData, DataplaneConfig>,
    scope_ports: Array<MapData, u8>,
}

impl Switches {
    pub(super) fn new(config: Map, scope_ports: Map) -> Result<Self, DataplaneError> {
        let typed = |name: &'static str| move |source| DataplaneError::Map { name, source };
        Ok(Self {
            config: Array::try_from(config).map_err(typed(map_names::CONFIG))?,
            scope_ports: Array::try_from(scope_ports).map_err(typed(map_names::SCOPE_PORTS))?,
        })
    }

    pub fn config(&self) -> Result<DataplaneConfig, DataplaneError> {
        self.config
            .get(&0, 0)
            .map_err(|source| DataplaneError::Map {
                name: map_names::CONFIG,
                source,
            })
    }

    fn set_config(&mut self, config: DataplaneConfig) -> Result<(), DataplaneError> {
        self.config
            .set(0, &config, 0)
            .map_err(|source| DataplaneError::Map {
                name: map_names::CONFIG,
                source,
            })
    }

    /// Sets the scope on the running program. Ports are written before the switch is
    /// flipped, so a packet never sees port scope with an empty port set.
    pub(super) fn set_scope(&mut self, scope: &Scope) -> Result<(), DataplaneError> {
        let wanted: BTreeSet<u16> = match scope {
            Scope::All => BTreeSet::new(),
            Scope::Ports(ports) => ports.clone(),
        };
        let mut config = self.config()?;
        if matches!(scope, Scope::All) {
            config.flags &= !DataplaneConfig::SCOPE_PORTS;
            self.set_config(config)?;
        }
        for port in 0..SCOPE_PORT_SLOTS {
            let on = u8::from(u16::try_from(port).is_ok_and(|p| wanted.contains(&p)));
            let current = self
                .scope_ports
                .get(&port, 0)
                .map_err(|source| DataplaneError::Map {
                    name: map_names::SCOPE_PORTS,
                    source,
                })?;
            if current != on {
                self.scope_ports
                    .set(port, &on, 0)
                    .map_err(|source| DataplaneError::Map {
                        name: map_names::SCOPE_PORTS,
                        source,
                    })?;
            }
        }
        if matches!(scope, Scope::Ports(_)) {
            config.flags |= DataplaneConfig::SCOPE_PORTS;
            self.set_config(config)?;
        }
        Ok(())
    }

    pub fn scope(&self) -> Result<Scope, DataplaneError> {
        if self.config()?.flags & DataplaneConfig::SCOPE_PORTS == 0 {
            return Ok(Scope::All);
        }
        let mut ports = BTreeSet::new();
        for (port, on) in self.scope_ports.iter().enumerate() {
            let on = on.map_err(|source| DataplaneError::Map {
                name: map_names::SCOPE_PORTS,
                source,
            })?;
            if on != 0 {
                ports.insert(port as u16);
            }
        }
        Ok(Scope::Ports(ports))
    }

    /// Sets one of the [`DataplaneConfig`] switches other than scope.
    pub(super) fn set_flag(&mut self, flag: u32, on: bool) -> Result<(), DataplaneError> {
        let mut config = self.config()?;
        let before = config.flags;
        if on {
            config.flags |= flag;
        } else {
            config.flags &= !flag;
        }
        if config.flags == before {
            return Ok(());
        }
        self.set_config(config)
    }
}
