//! One task per vhost for work that must not run under a queue's lock: routing
//! dead letters, and the timers for message TTL and `x-expires`. Queues send it
//! [`Housekeeping`] over a channel; what it decides goes back to its owner (the
//! vhost) through [`Keeper`], so this file knows queues but not vhosts.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Weak};

use tokio::sync::mpsc::UnboundedReceiver;

use super::dead_letter::DeadLetter;
use super::queue::{at_instant, now_ms, Housekeeping, Queue};

/// What the housekeeper needs of its vhost.
pub trait Keeper: Send + Sync + 'static {
    fn dead_letter(&self, dl: DeadLetter);
    /// `x-expires` ran out for this queue: delete it if it is still there.
    fn expired(&self, q: &Arc<Queue>);
}

pub async fn housekeeper<K: Keeper>(owner: Weak<K>, mut rx: UnboundedReceiver<Housekeeping>) {
    // One wake-up per queue (its earliest); the heap may hold superseded entries,
    // which are skipped when they come up and dropped whenever they outnumber the
    // live ones, so that queues deleted with far-off timers cost nothing.
    let mut timers: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut waiting: HashMap<usize, (u64, Weak<Queue>)> = HashMap::new();
    loop {
        if timers.len() > 1024 && timers.len() > 2 * waiting.len() {
            waiting.retain(|_, (_, q)| q.strong_count() > 0);
            timers = waiting
                .iter()
                .map(|(key, (at, _))| Reverse((*at, *key)))
                .collect();
        }
        let next = timers.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            msg = rx.recv() => match msg {
                None => return,
                Some(Housekeeping::PagedOut(p)) => {
                    // The read goes through the store's thread; others go on meanwhile.
                    let owner = owner.clone();
                    tokio::spawn(async move {
                        let read = p.store.read(p.queue, vec![p.seq]).await;
                        let dl = match read.into_iter().next().map(|(_, r)| r) {
                            Some(Ok(Some(m))) => (p.make)(m),
                            _ => None,
                        };
                        match (dl, owner.upgrade()) {
                            (Some(dl), Some(v)) => v.dead_letter(dl),
                            (None, _) => {
                                tracing::error!(seq = p.seq, "a paged-out message could not be read back to dead-letter it; it is dropped");
                                p.store.delete_message(p.queue, p.seq);
                            }
                            (Some(_), None) => {}
                        }
                    });
                }
                Some(Housekeeping::DeadLetter(dl)) => {
                    let Some(v) = owner.upgrade() else { return };
                    v.dead_letter(dl);
                }
                Some(Housekeeping::Wake(q, at)) => {
                    let key = Weak::as_ptr(&q) as usize;
                    waiting.insert(key, (at, q));
                    timers.push(Reverse((at, key)));
                }
            },
            _ = tokio::time::sleep_until(at_instant(next.unwrap_or(0)).into()), if next.is_some() => {
                let now = now_ms();
                while let Some(Reverse((at, key))) = timers.peek().copied() {
                    if at > now {
                        break;
                    }
                    timers.pop();
                    if waiting.get(&key).is_none_or(|(due, _)| *due != at) {
                        continue;
                    }
                    let Some(q) = waiting.remove(&key).and_then(|(_, w)| w.upgrade()) else { continue };
                    if q.on_wake(at) {
                        let Some(v) = owner.upgrade() else { return };
                        v.expired(&q);
                    }
                }
            }
        }
    }
}
