//! One task per blocklist: fetch on its interval, hand the whole list to the owner.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Update, backoff::Backoff, unix_now};
use crate::source::blocklist::{self, ListSpec};

/// Refreshes one blocklist on its interval; a failed fetch keeps the list's bans and retries
/// with backoff.
pub async fn run_blocklist(
    spec: ListSpec,
    http: reqwest::Client,
    last_refresh: Option<u64>,
    updates: mpsc::Sender<Update>,
) {
    if let Some(last) = last_refresh {
        let age = Duration::from_secs(unix_now().saturating_sub(last));
        if age < spec.refresh {
            tokio::time::sleep(spec.refresh - age).await;
        }
    }
    let mut backoff = Backoff::new(
        Duration::from_secs(5),
        spec.refresh.max(Duration::from_secs(5)),
    );
    loop {
        let delay = match blocklist::fetch(&spec.location, &http).await {
            Ok(text) => {
                let (tx, rx) = oneshot::channel();
                let update = Update::ListSnapshot {
                    name: spec.name.clone(),
                    text,
                    reply: tx,
                };
                if updates.send(update).await.is_err() || rx.await.is_err() {
                    return;
                }
                backoff.reset();
                spec.refresh
            }
            Err(e) => {
                let update = Update::ListFailed {
                    name: spec.name.clone(),
                    error: crate::error_chain(&e),
                };
                if updates.send(update).await.is_err() {
                    return;
                }
                backoff.next_delay()
            }
        };
        tokio::time::sleep(delay).await;
    }
}
