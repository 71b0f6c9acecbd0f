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

/// A STATUS line (what irisd is doing, shown by `systemctl status`).
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// Start-up is complete: every shard has recovered and serves.
pub fn ready(text: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(text)]);
}

/// The drain has started.
pub fn stopping(text: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(text)]);
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
