//! The CrowdSec task: reads LAPI's decision stream on its interval and hands each answer to
//! the owner. Its first call, and the first after any failure, asks for every active
//! decision (`startup=true`), which the engine diffs against what it holds: LAPI moves a
//! bouncer's position when it answers, so an answer lost on the way would otherwise lose
//! the changes it carried. A failure keeps every ban and retries with backoff.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{Update, backoff::Backoff};
use crate::source::crowdsec::{self, CrowdsecSpec};

pub async fn run_crowdsec(
    spec: CrowdsecSpec,
    http: reqwest::Client,
    updates: mpsc::Sender<Update>,
) {
    let mut backoff = Backoff::new(
        Duration::from_secs(2),
        spec.interval.max(Duration::from_secs(60)),
    );
    let mut startup = true;
    loop {
        let delay = match crowdsec::pull(&spec, &http, startup).await {
            Ok(stream) => {
                let (tx, rx) = oneshot::channel();
                let update = Update::CrowdsecStream {
                    startup,
                    stream,
                    reply: tx,
                };
                if updates.send(update).await.is_err() || rx.await.is_err() {
                    return;
                }
                startup = false;
                backoff.reset();
                spec.interval
            }
            Err(e) => {
                startup = true;
                let update = Update::CrowdsecFailed {
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
