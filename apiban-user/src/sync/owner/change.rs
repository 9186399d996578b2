//! What the owner does with one change from the control socket, the ban API or a reload:
//! the engine applies it, and the answer is one line for whoever asked.

use super::{Owner, effect};
use crate::{
    engine::Enforcer,
    sync::{Change, ChangeError},
};

impl<E: Enforcer> Owner<E> {
    /// Applies an operator's change; the answer is one line for the operator.
    pub fn change(&mut self, change: Change, now: u64) -> Result<String, ChangeError> {
        let out = match change {
            Change::Ban {
                net,
                ttl,
                comment,
                force,
            } => {
                let applied = self.engine.ban(net, ttl, comment, force, now)?;
                let until = match ttl {
                    Some(t) => format!("for {}", crate::human::format_duration(t)),
                    None => "until unbanned".to_owned(),
                };
                let mode = if self
                    .engine
                    .observing()
                    .contains(&crate::ledger::SourceId::Manual)
                {
                    " (manual bans observe: matched and counted, not dropped)"
                } else {
                    ""
                };
                format!("banned {} {until}{mode}; {}", net.trunc(), effect(applied))
            }
            Change::Unban { net } => {
                let (sources, applied) = self.engine.unban(net, now);
                if sources.is_empty() {
                    return Err(ChangeError::Refused(format!(
                        "{} is not in the ban list",
                        net.trunc()
                    )));
                }
                let names: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
                let mut msg = format!(
                    "unbanned {} (held by {}); {}",
                    net.trunc(),
                    names.join(", "),
                    effect(applied)
                );
                if sources.iter().any(|s| s.is_remote()) {
                    msg.push_str(
                        "; a feed that lists it again bans it again: `apiban allow add` keeps it out",
                    );
                }
                msg
            }
            Change::AllowAdd { net } => {
                let applied = self.engine.allow_add(net, now);
                format!("allowed {}; {}", net.trunc(), effect(applied))
            }
            Change::AllowRemove { net } => {
                let applied = self.engine.allow_remove(net, now)?;
                format!(
                    "removed {} from the allowlist; {}",
                    net.trunc(),
                    effect(applied)
                )
            }
            Change::Settings { engine, scope } => {
                self.engine.set_scope(&scope).map_err(|e| {
                    ChangeError::Failed(format!(
                        "cannot set the port scope: {}",
                        crate::error_chain(&e)
                    ))
                })?;
                let applied = self.engine.reconfigure(engine, now);
                format!("settings applied; {}", effect(applied))
            }
            Change::ApiBan { net, ttl, comment } => {
                let alert = crate::source::crowdsec::Alert {
                    net: net.trunc(),
                    ttl,
                    scenario: "apiban/ban-api".to_owned(),
                    message: comment.clone().unwrap_or_default(),
                    at: now,
                };
                let applied = self.engine.api_ban(net, ttl, comment, now)?;
                if self.alerts.as_ref().is_some_and(|a| a.post_api_bans) {
                    self.alert_crowdsec(alert, false, now);
                }
                format!(
                    "banned {} for {} (api); {}",
                    net.trunc(),
                    crate::human::format_duration(ttl),
                    effect(applied)
                )
            }
            Change::ApiUnban { net } => {
                let (removed, applied) = self.engine.api_unban(net, now);
                if !removed {
                    return Err(ChangeError::Refused(format!(
                        "{} has no api ban",
                        net.trunc()
                    )));
                }
                format!("unbanned {} (api); {}", net.trunc(), effect(applied))
            }
            Change::ApiFlush => {
                let (removed, applied) = self.engine.api_flush(now);
                format!("removed {removed} api bans; {}", effect(applied))
            }
            Change::DropList { name } => {
                let (records, applied) = self.engine.drop_list(&name, now);
                self.sync.lists.remove(&name);
                format!(
                    "dropped list {name} ({records} records); {}",
                    effect(applied)
                )
            }
        };
        tracing::info!("{out}");
        if self.engine.unsaved() {
            return Ok(format!(
                "{out}; WARNING: the state file could not be saved (see the agent's log): this \
                 is enforced now, but lost on a restart unless a later save succeeds"
            ));
        }
        Ok(out)
    }
}
