//! Messages waiting in delayed-message exchanges (`exchange/delayed.rs` has the
//! type's rules). One [`Delayed`] per vhost keeps them in due order; its task
//! sleeps until the earliest is due and hands each back to the vhost
//! ([`Release`]), which routes it from the exchange that held it. A stored
//! delayed exchange keeps its waiting messages in the store under its own id, so
//! they survive a restart (their delay counts from the publish, not the start).
//!
//! The messages are held in memory, each counted on the memory gauge like a
//! queued one: the memory alarm bounds them as it bounds queues.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::exchange::ExchangeDef;
use super::message::Message;
use crate::store::{wall_ms, Store};

/// One message waiting.
pub struct Waiting {
    /// The delayed exchange it waits at (not always the one it was published to).
    pub exchange: Arc<str>,
    pub delay: u64,
    pub msg: Arc<Message>,
    /// Its stored copy: the store, the exchange's id and the message's number.
    pub stored: Option<(Arc<dyn Store>, u64, u64)>,
}

#[derive(Default)]
pub struct Delayed {
    state: Mutex<State>,
    wake: Notify,
    /// Set when the vhost goes, so that the task ends.
    closed: AtomicBool,
}

#[derive(Default)]
struct State {
    /// By due time (wall-clock ms), then by arrival.
    due: BTreeMap<(u64, u64), Waiting>,
    next_seq: u64,
    /// How many wait at each exchange, for listings and to skip scans.
    per_exchange: HashMap<Arc<str>, usize>,
}

/// What the delay task needs of its vhost.
pub trait Release: Send + Sync + 'static {
    /// The delay is over: route it.
    fn release(&self, w: Waiting);
}

impl Delayed {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `msg` at exchange `x` for `delay` ms. Returns whether a copy went to
    /// the store (then the publisher's confirm waits for the next sync).
    pub fn add(
        &self,
        x: &ExchangeDef,
        delay: u64,
        msg: Arc<Message>,
        store: Option<&Arc<dyn Store>>,
    ) -> bool {
        let due = wall_ms().saturating_add(delay);
        let mut s = self.lock();
        let seq = s.next_seq;
        s.next_seq += 1;
        let stored = match (store, x.messages_id) {
            (Some(store), Some(id)) => {
                store.put_message(id, seq, msg.record());
                Some((store.clone(), id, seq))
            }
            _ => None,
        };
        let was_first = s.due.keys().next().is_none_or(|first| (due, seq) < *first);
        let persisted = stored.is_some();
        s.add(
            (due, seq),
            Waiting {
                exchange: x.name.clone(),
                delay,
                msg,
                stored,
            },
        );
        drop(s);
        if was_first {
            self.wake.notify_one();
        }
        persisted
    }

    /// A stored message read back at start-up, due `delay` ms after `stored_at`.
    pub fn restore(
        &self,
        exchange: &Arc<str>,
        (store, id, seq): (Arc<dyn Store>, u64, u64),
        stored_at: u64,
        delay: u64,
        msg: Arc<Message>,
    ) {
        let mut s = self.lock();
        s.next_seq = s.next_seq.max(seq + 1);
        s.add(
            (stored_at.saturating_add(delay), seq),
            Waiting {
                exchange: exchange.clone(),
                delay,
                msg,
                stored: Some((store, id, seq)),
            },
        );
        drop(s);
        self.wake.notify_one();
    }

    /// The exchange was deleted: what waited there goes (its stored copies go
    /// with the exchange's record).
    pub fn forget_exchange(&self, name: &str) {
        let mut s = self.lock();
        if s.per_exchange.remove(name).is_none() {
            return;
        }
        s.due.retain(|_, w| &*w.exchange != name);
    }

    /// The vhost is gone: the task ends.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// How many messages wait at this exchange.
    pub fn waiting_at(&self, name: &str) -> usize {
        self.lock().per_exchange.get(name).copied().unwrap_or(0)
    }

    /// Everything due by `now`, in due order.
    fn take_due(&self, now: u64) -> (Vec<Waiting>, Option<u64>) {
        let mut s = self.lock();
        let mut out = Vec::new();
        while let Some(entry) = s.due.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let w = entry.remove();
            if let Some(n) = s.per_exchange.get_mut(&w.exchange) {
                *n -= 1;
                if *n == 0 {
                    s.per_exchange.remove(&w.exchange);
                }
            }
            out.push(w);
        }
        let next = s.due.keys().next().map(|(due, _)| *due);
        (out, next)
    }
}

impl State {
    fn add(&mut self, key: (u64, u64), w: Waiting) {
        *self.per_exchange.entry(w.exchange.clone()).or_default() += 1;
        self.due.insert(key, w);
    }
}

/// Wakes at the earliest due time (or when an earlier message arrives) and
/// releases what is due. Sleeps are capped so that a change of the wall clock
/// is noticed within a minute.
pub async fn run<R: Release>(owner: Weak<R>, delayed: Arc<Delayed>) {
    const LONGEST_SLEEP: u64 = 60_000;
    loop {
        let (due, next) = delayed.take_due(wall_ms());
        if !due.is_empty() {
            let Some(r) = owner.upgrade() else { return };
            for w in due {
                r.release(w);
            }
            continue;
        }
        if owner.strong_count() == 0 || delayed.closed.load(Ordering::Relaxed) {
            return;
        }
        match next {
            None => delayed.wake.notified().await,
            Some(at) => {
                let wait = at.saturating_sub(wall_ms()).min(LONGEST_SLEEP);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    _ = delayed.wake.notified() => {}
                }
            }
        }
    }
}
