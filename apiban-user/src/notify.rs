//! systemd's notify protocol (sd_notify(3)) through the sd-notify crate: READY, RELOADING,
//! STOPPING, STATUS and the watchdog. Without systemd ($NOTIFY_SOCKET unset) every call is a
//! no-op.

use std::time::Duration;

use sd_notify::NotifyState;

pub struct Notifier {
    active: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads NOTIFY_SOCKET and WATCHDOG_USEC (honouring WATCHDOG_PID) once, at start.
    pub fn from_env() -> Self {
        Self {
            active: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled().filter(|w| !w.is_zero()),
        }
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// How often to ping: half the watchdog interval, as sd_watchdog_enabled(3) advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    fn send(&self, states: &[NotifyState]) {
        if self.active
            && let Err(e) = sd_notify::notify(states)
        {
            tracing::debug!(error = %crate::error_chain(&e), "sd_notify failed");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// RELOADING with the monotonic time systemd needs to match it (Type=notify-reload).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(e) => tracing::debug!(error = %e, "no monotonic clock for RELOADING"),
        }
    }

    pub fn stopping(&self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping; the XDP program stays attached"),
        ]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}
