//! The CrowdSec task: reads LAPI's decision stream on its interval and hands each answer to
//! the owner. Its first call, and the first after any failure, asks for every active
//! decision (`startup=true`), which the engine diffs against what it holds: LAPI moves a
//! bouncer's position when it answers, so an answer lost on the way would otherwise lose
//! the changes it carried. A failure keeps every ban and retries with backoff.
//!
//! And the alerts task: this host's detection bans (and, if asked, the ban API's) posted to
//! LAPI as alerts with a ban decision, so that CrowdSec's other bouncers ban the scanner too.
//! The owner hands them over without waiting (a full queue drops and counts); a failed post
//! is retried with backoff, the oldest dropped past [`ALERTS_PENDING`]. Detection never
//! waits for CrowdSec.

use std::{collections::VecDeque, time::Duration};

use tokio::sync::{mpsc, oneshot};

use super::{Update, backoff::Backoff};
use crate::source::crowdsec::{self, Alert, AlertSpec, CrowdsecError, CrowdsecSpec};

/// Alerts kept while LAPI cannot take them.
pub const ALERTS_PENDING: usize = 1024;
/// Alerts posted in one request.
const ALERTS_PER_POST: usize = 100;

/// The owner's end of the alerts task.
#[derive(Clone, Debug)]
pub struct AlertOutbox {
    pub tx: mpsc::Sender<Alert>,
    pub post_api_bans: bool,
    pub post_forgeable: bool,
}

/// The client for LAPI, or None after telling the owner why there is none (its settings
/// were checked when read: a CA or certificate that no longer builds is rare).
async fn client_for(
    tls: &crowdsec::LapiTls,
    updates: &mpsc::Sender<Update>,
) -> Option<reqwest::Client> {
    match crowdsec::client(tls) {
        Ok(client) => Some(client),
        Err(e) => {
            let error = format!(
                "cannot connect to LAPI with the configured TLS: {}",
                crate::error_chain(&e)
            );
            let _ = updates.send(Update::CrowdsecFailed { error }).await;
            None
        }
    }
}

/// Posts what arrives on `rx` until the owner drops its end.
pub async fn run_alerts(
    spec: AlertSpec,
    mut rx: mpsc::Receiver<Alert>,
    updates: mpsc::Sender<Update>,
) {
    let Some(http) = client_for(&spec.tls, &updates).await else {
        return;
    };
    let mut token: Option<String> = None;
    let mut pending: VecDeque<Alert> = VecDeque::new();
    let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(alert) => pending.push_back(alert),
                None => return,
            }
        }
        while let Ok(alert) = rx.try_recv() {
            pending.push_back(alert);
        }
        let mut dropped = 0;
        while pending.len() > ALERTS_PENDING {
            pending.pop_front();
            dropped += 1;
        }
        let batch: Vec<Alert> = pending.iter().take(ALERTS_PER_POST).cloned().collect();
        let mut result = post(&spec, &http, &mut token, &batch).await;
        if matches!(result, Err(CrowdsecError::KeyRefused { .. })) {
            // The token expired (an hour): log in again, once.
            token = None;
            result = post(&spec, &http, &mut token, &batch).await;
        }
        let (posted, error) = match result {
            Ok(()) => {
                pending.drain(..batch.len());
                backoff.reset();
                (batch.len(), None)
            }
            Err(e) => (0, Some(crate::error_chain(&e))),
        };
        let failed = error.is_some();
        let update = Update::CrowdsecAlertsPosted {
            posted,
            dropped,
            error,
        };
        if updates.send(update).await.is_err() {
            return;
        }
        if failed {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

async fn post(
    spec: &AlertSpec,
    http: &reqwest::Client,
    token: &mut Option<String>,
    batch: &[Alert],
) -> Result<(), CrowdsecError> {
    let t = match token {
        Some(t) => t,
        None => {
            token.insert(crowdsec::login(&spec.url, &spec.machine, &spec.password, http).await?)
        }
    };
    crowdsec::post_alerts(&spec.url, t, batch, http).await
}

pub async fn run_crowdsec(spec: CrowdsecSpec, updates: mpsc::Sender<Update>) {
    let Some(http) = client_for(&spec.tls, &updates).await else {
        return;
    };
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
