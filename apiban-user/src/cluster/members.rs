//! Which etcd members answer: each endpoint is asked, every few seconds, for a read that
//! only a member in the quorum serves. What changes is said once in the log (a member down,
//! the same member back), and the count is in `status` and /metrics. The other cluster
//! tasks move to another member on their own (see `cluster::connect`) and say nothing of
//! one member's failure. The same round asks for etcd's alarms: with `NOSPACE` raised
//! (its quota full) etcd refuses every write, which the operator must be told how to end.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use etcd_client::{AlarmAction, AlarmType, Client, GetOptions};
use tokio::sync::watch as tokio_watch;

use super::settings::ClusterSettings;
use super::{CallError, ClusterStats, connect_options_for, within_for};

/// How often each member is asked.
pub(super) const EVERY: Duration = Duration::from_secs(2);
/// How long a member may take to answer before it counts as down for this round.
const DEADLINE: Duration = Duration::from_secs(1);

/// Rounds in a row a member must fail before it is said to be down.
const DOWN_AFTER: u32 = 2;
/// Rounds in a row a member may answer `etcdserver: no leader` before it is said to be
/// down. A Raft election (the leader member killed) makes every live member answer so for a
/// second or two, and that is no member being down; a member that still says it after
/// 10 s is cut off from the quorum and serves this node nothing.
const NO_LEADER_DOWN_AFTER: u32 = 5;

/// One member as the monitor last saw it.
struct Member {
    endpoint: String,
    client: Option<Client>,
    /// What the log last said of it; None before it said anything.
    answering: Option<bool>,
    /// Rounds in a row it failed.
    failures: u32,
    /// Every failure in this row was an answer of "no leader" (an election, or this member
    /// cut off from the quorum), not a member that does not answer at all.
    only_no_leader: bool,
}

/// What the log says of a member after one round.
#[derive(Debug, PartialEq, Eq)]
enum Said {
    Down,
    Back,
}

impl Member {
    fn new(endpoint: String) -> Self {
        Member {
            endpoint,
            client: None,
            answering: None,
            failures: 0,
            only_no_leader: true,
        }
    }

    /// Counts one round's answer; says what the log must now say, once per change.
    fn record(&mut self, answered: Result<(), Refusal>) -> Option<Said> {
        match answered {
            Ok(()) => {
                self.failures = 0;
                self.only_no_leader = true;
                let was = self.answering.replace(true);
                (was == Some(false)).then_some(Said::Back)
            }
            Err(refusal) => {
                self.failures += 1;
                self.only_no_leader &= refusal == Refusal::NoLeader;
                let down_after = if self.only_no_leader {
                    NO_LEADER_DOWN_AFTER
                } else {
                    DOWN_AFTER
                };
                if self.failures >= down_after && self.answering != Some(false) {
                    self.answering = Some(false);
                    Some(Said::Down)
                } else {
                    None
                }
            }
        }
    }
}

/// How a member failed one round.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Refusal {
    /// It answered that it has no Raft leader, or that the leader changed under the read.
    NoLeader,
    /// No answer, or any other error.
    Other,
}

impl Refusal {
    fn of(e: &CallError) -> Self {
        match e {
            CallError::Etcd(etcd_client::Error::GRpcStatus(status))
                if ["no leader", "leader changed"]
                    .iter()
                    .any(|m| status.message().contains(m)) =>
            {
                Refusal::NoLeader
            }
            _ => Refusal::Other,
        }
    }
}

pub async fn run(
    settings: Arc<ClusterSettings>,
    stats: Arc<ClusterStats>,
    mut stop: tokio_watch::Receiver<bool>,
) {
    let mut members: Vec<Member> = settings
        .endpoints
        .iter()
        .map(|endpoint| Member::new(endpoint.clone()))
        .collect();
    stats.members.store(members.len() as u64, Ordering::Relaxed);
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut answering = 0;
        for m in &mut members {
            let result = ask(&settings, m).await;
            let now = result.is_ok();
            answering += u64::from(now);
            let refusal = result.as_ref().map_err(Refusal::of).map(|_| ());
            match (m.record(refusal), &result) {
                (Some(Said::Down), Err(e)) if m.only_no_leader => tracing::warn!(
                    member = %m.endpoint,
                    error = %crate::error_chain(e),
                    "an etcd member does not answer with a leader (cut off from the quorum?); this node uses the others"
                ),
                (Some(Said::Down), Err(e)) => tracing::warn!(
                    member = %m.endpoint,
                    error = %crate::error_chain(e),
                    "an etcd member does not answer; this node uses the others"
                ),
                (Some(Said::Back), _) => {
                    tracing::info!(member = %m.endpoint, "the etcd member answers again")
                }
                _ => {}
            }
            if !now {
                m.client = None;
            }
        }
        stats.members_answering.store(answering, Ordering::Relaxed);
        // Alarms are the cluster's: one member that answers can say.
        let Some(client) = members.iter_mut().find_map(|m| m.client.as_mut()) else {
            continue;
        };
        let nospace = match within_for(
            "the alarms",
            DEADLINE,
            client.alarm(AlarmAction::Get, AlarmType::None, None),
        )
        .await
        {
            Ok(answer) => answer
                .alarms()
                .iter()
                .any(|a| a.alarm() == AlarmType::Nospace),
            Err(e) => {
                // A user without the right to read alarms, most often: nothing to say.
                tracing::debug!(error = %crate::error_chain(&e), "cannot read etcd's alarms");
                continue;
            }
        };
        if nospace {
            stats
                .nospace_seen_ms
                .store(super::clock::unix_now_ms(), Ordering::Relaxed);
        }
        if stats.nospace.swap(nospace, Ordering::Relaxed) != nospace {
            if nospace {
                tracing::error!(
                    "etcd's space quota is full (NOSPACE alarm): it refuses every write, so operators' changes wait and the leader does not poll APIBAN; enforcement goes on. Fix it on etcd: compact, `etcdctl defrag`, then `etcdctl alarm disarm`"
                );
            } else {
                tracing::info!("etcd's NOSPACE alarm is cleared: it takes writes again");
            }
        }
    }
}

/// A linearizable read of one key, from this member only.
async fn ask(settings: &ClusterSettings, m: &mut Member) -> Result<(), CallError> {
    let client = match &mut m.client {
        Some(c) => c,
        None => {
            let options = connect_options_for(settings)?;
            let connected = within_for(
                "a connection",
                DEADLINE,
                Client::connect([&m.endpoint], Some(options)),
            )
            .await?;
            m.client.insert(connected)
        }
    };
    let probe = GetOptions::new().with_keys_only().with_limit(1);
    within_for(
        "a read",
        DEADLINE,
        client.get(settings.prefix.as_str(), Some(probe)),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rounds(m: &mut Member, answers: &[Result<(), Refusal>]) -> Vec<Option<Said>> {
        answers.iter().map(|a| m.record(*a)).collect()
    }

    #[test]
    fn a_member_that_does_not_answer_is_said_down_once_after_two_rounds_and_back_once() {
        let mut m = Member::new("a".into());
        let said = rounds(
            &mut m,
            &[
                Ok(()),
                Err(Refusal::Other),
                Err(Refusal::Other),
                Err(Refusal::Other),
                Ok(()),
                Ok(()),
            ],
        );
        assert_eq!(
            said,
            [None, None, Some(Said::Down), None, Some(Said::Back), None]
        );
    }

    #[test]
    fn an_election_is_no_member_down() {
        let mut m = Member::new("a".into());
        let no_leader = Err(Refusal::NoLeader);
        let said = rounds(&mut m, &[Ok(()), no_leader, no_leader, no_leader, Ok(())]);
        assert_eq!(said, [None, None, None, None, None]);
    }

    #[test]
    fn a_member_cut_off_from_the_quorum_is_said_down_after_ten_seconds() {
        let mut m = Member::new("a".into());
        let said = rounds(&mut m, &[Err(Refusal::NoLeader); 6]);
        let down = said.iter().position(|s| s.is_some()).unwrap();
        assert_eq!(said[down], Some(Said::Down));
        assert_eq!(EVERY * (down as u32 + 1), Duration::from_secs(10));
        assert_eq!(said.iter().filter(|s| s.is_some()).count(), 1);
    }

    #[test]
    fn no_leader_then_no_answer_is_a_member_down() {
        let mut m = Member::new("a".into());
        let said = rounds(&mut m, &[Err(Refusal::NoLeader), Err(Refusal::Other)]);
        assert_eq!(said, [None, Some(Said::Down)]);
    }

    #[test]
    fn only_etcds_no_leader_answer_counts_as_an_election() {
        let no_leader = CallError::Etcd(etcd_client::Error::GRpcStatus(
            tonic::Status::unavailable("etcdserver: no leader"),
        ));
        assert_eq!(Refusal::of(&no_leader), Refusal::NoLeader);
        let changed = CallError::Etcd(etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
            "etcdserver: leader changed",
        )));
        assert_eq!(Refusal::of(&changed), Refusal::NoLeader);
        let refused = CallError::Etcd(etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
            "connection refused",
        )));
        assert_eq!(Refusal::of(&refused), Refusal::Other);
        assert_eq!(Refusal::of(&CallError::Timeout("a read")), Refusal::Other);
    }
}
