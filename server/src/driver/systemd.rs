//! The systemd service protocol (`Type=notify`, sd_notify(3)) through the
//! `sd-notify` crate: STATUS lines while the logs recover, READY once every
//! shard serves, WATCHDOG pings while every shard loop is alive, STOPPING
//! when the drain starts. Without `NOTIFY_SOCKET` (not under systemd) every
//! call does nothing. A failed notification is logged once and otherwise
//! ignored: irisd serves whether or not its supervisor hears it.

use crate::metrics::ShardMetrics;
use sd_notify::NotifyState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn notify(states: &[NotifyState<'_>]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(error) = sd_notify::notify(states) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "notifying systemd failed");
        }
    }
}

/// How much longer systemd waits for READY after each step of recovery
/// ([`progress`]): a recovery that keeps replaying segments is never timed
/// out by `TimeoutStartSec=`, one stuck on a step is, this long after it.
pub const RECOVERY_STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// Time allowed past the drain's own bound for the last syncs and the exit.
const STOP_MARGIN: Duration = Duration::from_secs(10);

/// A STATUS line (what irisd is doing, shown by `systemctl status`).
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// A STATUS line for a step of recovery, extending systemd's start timeout
/// by [`RECOVERY_STEP_TIMEOUT`] from now.
pub fn progress(text: &str) {
    notify(&[NotifyState::Status(text), NotifyState::ExtendTimeoutUsec(micros(RECOVERY_STEP_TIMEOUT))]);
}

fn micros(duration: Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

/// Start-up is complete: every shard has recovered and serves.
pub fn ready(text: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(text)]);
}

/// The drain has started; it ends within `drain_timeout`, and systemd's
/// stop timeout is extended to that plus a margin (so a configured drain
/// longer than `TimeoutStopSec=` is not cut short by a SIGKILL).
pub fn stopping(text: &str, drain_timeout: Duration) {
    let extension = micros(drain_timeout + STOP_MARGIN);
    notify(&[NotifyState::Stopping, NotifyState::Status(text), NotifyState::ExtendTimeoutUsec(extension)]);
}

/// With `WatchdogSec=` set, pings systemd at half its interval from a
/// thread of its own, but only while no shard loop is stalled
/// (`admin::stalled_shards`): a shard that stops iterating stops the pings,
/// and systemd aborts and restarts irisd, which recovers from its logs.
pub fn start_watchdog(shards: Vec<Arc<ShardMetrics>>) {
    let Some(interval) = sd_notify::watchdog_enabled() else { return };
    let period = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(interval_ms = interval.as_millis() as u64, "systemd watchdog enabled");
    let spawned = std::thread::Builder::new().name("irisd-watchdog".into()).spawn(move || {
        let mut reported = false;
        loop {
            let stalled = super::admin::stalled_shards(&shards);
            if stalled.is_empty() {
                notify(&[NotifyState::Watchdog]);
                reported = false;
            } else if !reported {
                tracing::error!(?stalled, "shard loops stalled; no more watchdog pings");
                status(&format!("shard(s) {stalled:?} stalled; watchdog pings stopped"));
                reported = true;
            }
            std::thread::sleep(period);
        }
    });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the watchdog thread; systemd's watchdog will fire");
    }
}
