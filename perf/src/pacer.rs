//! When each simulated user sends: an open-loop schedule kept by one pacing
//! thread, or a closed loop with a fixed number of messages in flight.
//!
//! Open loop: tokio's timers have a 1 ms resolution (a `sleep_until` fires at
//! the next millisecond tick or later), which at low load showed up as about
//! 1 ms of extra send -> deliver latency for every message, since latency is
//! measured from the intended send time. A dedicated thread with a 1 us timer
//! slack sleeps until each due time with `clock_nanosleep` precision and hands
//! the user a slot through a channel; the user's task sends as soon as it is
//! woken. The thread inherits the load generator's CPU pinning and sleeps
//! between slots, so it adds no spinning.
//!
//! Closed loop: each user keeps at most `inflight` messages sent but not yet
//! delivered to its partner; a delivery (or a refusal) returns a slot.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

/// How a user's sends are scheduled.
#[derive(Debug)]
pub enum Schedule {
    /// Open loop: each item is a slot's intended send time, in microseconds
    /// after the start; the channel closes when the run's duration is over.
    Open(mpsc::UnboundedReceiver<u64>),
    /// Closed loop: take a permit per send (returned on delivery) until the
    /// deadline.
    Closed {
        /// Permits, one per message allowed in flight.
        window: Arc<Semaphore>,
        /// When sending stops.
        until: Instant,
    },
}

impl Schedule {
    /// Waits for the next slot; returns its intended send time (microseconds
    /// after `start`), or `None` when the run is over.
    pub async fn next(&mut self, start: Instant) -> Option<u64> {
        match self {
            Schedule::Open(slots) => slots.recv().await,
            Schedule::Closed { window, until } => {
                let permit = tokio::time::timeout_at((*until).into(), window.acquire()).await.ok()?.ok()?;
                permit.forget();
                let now = Instant::now();
                (now < *until).then(|| now.duration_since(start).as_micros() as u64)
            }
        }
    }
}

/// Starts the pacing thread for `users` users, each sending `rate` messages
/// per second from `start` for `duration`; returns one schedule per user.
/// Users' first slots are spread evenly over the first interval, so the load
/// does not arrive in bursts of one message per user.
pub fn open_loop(users: usize, rate: f64, duration: Duration, start: Instant) -> Result<Vec<Schedule>, String> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err("rate must be positive".into());
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut senders = Vec::with_capacity(users);
    let mut schedules = Vec::with_capacity(users);
    for _ in 0..users {
        let (sender, receiver) = mpsc::unbounded_channel();
        senders.push(sender);
        schedules.push(Schedule::Open(receiver));
    }
    std::thread::Builder::new()
        .name("iris-perf-pacer".into())
        .spawn(move || pace(senders, interval, duration, start))
        .map_err(|e| format!("starting the pacing thread: {e}"))?;
    Ok(schedules)
}

/// Closed-loop schedules: one window of `inflight` permits per user, until `until`.
pub fn closed_loop(users: usize, inflight: u32, until: Instant) -> Vec<Schedule> {
    (0..users).map(|_| Schedule::Closed { window: Arc::new(Semaphore::new(inflight as usize)), until }).collect()
}

/// The window of a closed-loop schedule, to return permits to.
pub fn window(schedule: &Schedule) -> Option<Arc<Semaphore>> {
    match schedule {
        Schedule::Open(_) => None,
        Schedule::Closed { window, .. } => Some(Arc::clone(window)),
    }
}

/// Shortest time between two dispatch rounds. Each round wakes the load
/// generator's runtime thread (a context switch on its core); one wake per
/// slot cost more CPU than the clients themselves at 50,000 msg/s. Slots
/// due within a round go out together, at most this late.
const ROUND_GAP: Duration = Duration::from_micros(100);

fn pace(senders: Vec<mpsc::UnboundedSender<u64>>, interval: Duration, duration: Duration, start: Instant) {
    set_precise_timer_slack();
    let users = senders.len().max(1) as u32;
    // (due offset, user, slot number); the earliest first.
    let mut heap: BinaryHeap<Reverse<(Duration, usize, u64)>> =
        (0..senders.len()).map(|user| Reverse((interval * user as u32 / users, user, 0))).collect();
    let mut last_round = start;
    while let Some(&Reverse((due, _, _))) = heap.peek() {
        let at = (start + due).max(last_round + ROUND_GAP);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let now = Instant::now();
        last_round = now;
        // Everything due by now.
        while let Some(&Reverse((due, user, slot))) = heap.peek() {
            if start + due > now {
                break;
            }
            heap.pop();
            if due >= duration || senders[user].send(due.as_micros() as u64).is_err() {
                continue;
            }
            let next = interval.mul_f64((slot + 1) as f64) + (interval * user as u32 / users);
            heap.push(Reverse((next, user, slot + 1)));
        }
    }
}

/// Asks for 1 us of timer slack on this thread (the default 50 us would
/// delay every wake-up by up to that much).
fn set_precise_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}
