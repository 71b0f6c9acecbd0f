//! When each simulated user sends: an open-loop schedule kept by one pacing
//! thread, or a closed loop with a fixed number of messages in flight.
//!
//! Open loop: tokio's timers have a 1 ms resolution (a `sleep_until` fires at
//! the next millisecond tick or later), which at low load showed up as about
//! 1 ms of extra send -> deliver latency for every message, since latency is
//! measured from the intended send time. A dedicated thread with a 1 us timer
//! slack sleeps until each due time with `clock_nanosleep` precision and
//! releases the user's slot (a counter, so nothing queues however far a user
//! falls behind); the user's task sends as soon as it is woken, and a user that
//! fell behind sends its released slots back to back, their lateness counted. The thread inherits the load generator's CPU pinning and sleeps
//! between slots, so it adds no spinning.
//!
//! Closed loop: each user keeps at most `inflight` messages sent but not yet
//! delivered to its partner; a delivery (or a refusal) returns a slot.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};

/// How a user's sends are scheduled.
#[derive(Debug)]
pub enum Schedule {
    /// Open loop: slots released by the pacing thread.
    Open {
        /// The pacer's side.
        slots: Arc<Released>,
        /// Next slot this user sends.
        next: u64,
        /// Time between slots.
        interval: Duration,
        /// Offset of slot 0 from the start.
        offset: Duration,
    },
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
            Schedule::Open { slots, next, interval, offset } => loop {
                let notified = slots.notify.notified();
                if *next < slots.count.load(Ordering::Acquire) {
                    let due = *offset + interval.mul_f64(*next as f64);
                    *next += 1;
                    return Some(due.as_micros() as u64);
                }
                if slots.done.load(Ordering::Acquire) && *next >= slots.count.load(Ordering::Acquire) {
                    return None;
                }
                notified.await;
            },
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
    for user in 0..users {
        let slots = Arc::new(Released::default());
        senders.push(Arc::clone(&slots));
        schedules.push(Schedule::Open { slots, next: 0, interval, offset: offset(interval, user, users) });
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

/// One user's released open-loop slots.
#[derive(Debug, Default)]
pub struct Released {
    /// Slots released so far (slot k is due at offset + k * interval).
    count: AtomicU64,
    /// No more slots will be released.
    done: AtomicBool,
    /// Wakes the user's task.
    notify: Notify,
}

/// Slot 0 of `user`: users are spread evenly over the first interval.
fn offset(interval: Duration, user: usize, users: usize) -> Duration {
    interval.mul_f64(user as f64 / users.max(1) as f64)
}

/// The window of a closed-loop schedule, to return permits to.
pub fn window(schedule: &Schedule) -> Option<Arc<Semaphore>> {
    match schedule {
        Schedule::Open { .. } => None,
        Schedule::Closed { window, .. } => Some(Arc::clone(window)),
    }
}

/// Shortest time between two dispatch rounds. Each round wakes the load
/// generator's runtime thread (a context switch on its core); one wake per
/// slot cost more CPU than the clients themselves at 50,000 msg/s. Slots
/// due within a round go out together, at most this late.
const ROUND_GAP: Duration = Duration::from_micros(100);

fn pace(senders: Vec<Arc<Released>>, interval: Duration, duration: Duration, start: Instant) {
    set_precise_timer_slack();
    let users = senders.len();
    // (due offset, user, slot number); the earliest first.
    let mut heap: BinaryHeap<Reverse<(Duration, usize, u64)>> =
        (0..users).map(|user| Reverse((offset(interval, user, users), user, 0))).collect();
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
            if due >= duration {
                continue;
            }
            senders[user].count.store(slot + 1, Ordering::Release);
            senders[user].notify.notify_one();
            let next = offset(interval, user, users) + interval.mul_f64((slot + 1) as f64);
            heap.push(Reverse((next, user, slot + 1)));
        }
    }
    for slots in &senders {
        slots.done.store(true, Ordering::Release);
        slots.notify.notify_one();
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
