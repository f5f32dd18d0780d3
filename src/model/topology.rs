//! A vhost's exchanges, queues and bindings as one immutable value. Every change
//! makes a new value that shares everything it did not touch with the old one
//! (persistent maps: O(log n) per change), and the vhost swaps it in atomically.
//! Publishers load the current value without a lock and route on it; a change
//! never makes them wait, nor recompile anything but the exchange it concerns.

use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::exchange::{delayed, Destination, Exchange};
use super::pmap::PMap;
use super::queue::Queue;

#[derive(Clone, Default)]
pub struct Topology {
    pub(super) exchanges: PMap<Arc<str>, Arc<Exchange>>,
    pub(super) queues: PMap<Arc<str>, Arc<Queue>>,
}

/// Where a publish goes.
pub enum Routed {
    NoExchange,
    Internal,
    /// These queues now, and the delayed-message exchanges where it waits.
    Queues(Vec<Arc<Queue>>, Delays),
}

/// The delayed-message exchanges a message waits at, and for how long.
#[derive(Default)]
pub struct Delays {
    pub delay: u64,
    pub exchanges: Vec<Arc<Exchange>>,
}

impl Delays {
    pub fn is_empty(&self) -> bool {
        self.exchanges.is_empty()
    }
}

impl Topology {
    pub fn exchange(&self, name: &str) -> Option<&Arc<Exchange>> {
        self.exchanges.get(name)
    }

    pub fn queue(&self, name: &str) -> Option<&Arc<Queue>> {
        self.queues.get(name)
    }

    /// Whether an exchange is internal; None when there is no such exchange.
    /// Every exchange, for listings.
    pub fn exchanges(&self) -> impl Iterator<Item = &Arc<Exchange>> {
        self.exchanges.values()
    }

    /// Every queue, for listings.
    pub fn queues(&self) -> impl Iterator<Item = &Arc<Queue>> {
        self.queues.values()
    }

    /// Whether `exchange` exists and is a topic exchange (topic permissions apply).
    pub fn is_topic(&self, exchange: &str) -> bool {
        self.exchanges
            .get(exchange)
            .is_some_and(|x| x.def.kind.name == "topic")
    }

    pub fn internal(&self, exchange: &str) -> Option<bool> {
        self.exchanges.get(exchange).map(|x| x.def.internal)
    }

    /// Where a message published to `exchange` with these routing keys goes: the
    /// publish's own key, then any CC and BCC keys (sender-selected distribution).
    /// Exchange-to-exchange bindings and alternate exchanges are followed, each
    /// exchange visited once; each queue is named once. A delayed-message exchange
    /// that the message's `x-delay` holds it at is named in the result instead of
    /// being routed through.
    pub fn route(&self, exchange: &str, keys: &[&str], headers: Option<&FieldTable>) -> Routed {
        if exchange.is_empty() {
            let mut queues: Vec<Arc<Queue>> = Vec::new();
            for key in keys {
                if let Some(q) = self.queues.get(*key) {
                    queues.push(q.clone());
                }
            }
            dedup(&mut queues);
            return Routed::Queues(queues, Delays::default());
        }
        let Some(first) = self.exchanges.get(exchange) else {
            return Routed::NoExchange;
        };
        if first.def.internal {
            return Routed::Internal;
        }
        self.walk(first, keys, headers, true)
    }

    /// The queues a delayed message whose delay is over reaches from the exchange
    /// that held it (which may be internal): no delayed exchange holds it again.
    /// None if the exchange is gone.
    pub fn route_from(
        &self,
        exchange: &str,
        keys: &[&str],
        headers: Option<&FieldTable>,
    ) -> Option<Vec<Arc<Queue>>> {
        let first = self.exchanges.get(exchange)?;
        match self.walk(first, keys, headers, false) {
            Routed::Queues(queues, _) => Some(queues),
            _ => None,
        }
    }

    /// Routes from `first`; with `hold`, delayed exchanges that the message's
    /// x-delay stops it at are named in the result instead of routed through.
    fn walk(
        &self,
        first: &Arc<Exchange>,
        keys: &[&str],
        headers: Option<&FieldTable>,
        hold: bool,
    ) -> Routed {
        let mut queues: Vec<Arc<Queue>> = Vec::new();
        let mut delays = Delays::default();
        // The message's x-delay, read once and only if a delayed exchange is met.
        let mut delay: Option<Option<u64>> = if hold { None } else { Some(None) };
        let mut visited: Vec<&str> = Vec::new();
        let mut pending: Vec<&Arc<Exchange>> = vec![first];
        let mut dests: Vec<&Destination> = Vec::new();
        while let Some(x) = pending.pop() {
            if visited.contains(&&*x.def.name) {
                continue;
            }
            visited.push(&x.def.name);
            if x.def.is_delayed() {
                if let Some(ms) = *delay.get_or_insert_with(|| delayed::delay_of(headers)) {
                    delays.delay = ms;
                    delays.exchanges.push(x.clone());
                    continue;
                }
            }
            dests.clear();
            for key in keys {
                x.route(key, headers, &mut dests);
            }
            if dests.is_empty() {
                // Unroutable here: the exchange's alternate-exchange gets it.
                if let Some(ae) = x.def.alternate.as_ref().and_then(|a| self.exchanges.get(a)) {
                    pending.push(ae);
                }
            }
            for d in dests.drain(..) {
                match d {
                    Destination::Queue(name) => {
                        if let Some(q) = self.queues.get(name) {
                            queues.push(q.clone());
                        }
                    }
                    Destination::Exchange(name) => {
                        if let Some(x) = self.exchanges.get(name) {
                            pending.push(x);
                        }
                    }
                }
            }
        }
        dedup(&mut queues);
        Routed::Queues(queues, delays)
    }
}

/// Each queue once. Sorting by address keeps a fanout to thousands of queues
/// O(n log n); small lists, the common case, are checked in place.
fn dedup(queues: &mut Vec<Arc<Queue>>) {
    if queues.len() <= 1 {
        return;
    }
    if queues.len() <= 8 {
        let mut i = 1;
        while i < queues.len() {
            if queues[..i].iter().any(|q| Arc::ptr_eq(q, &queues[i])) {
                queues.remove(i);
            } else {
                i += 1;
            }
        }
        return;
    }
    queues.sort_unstable_by_key(|q| Arc::as_ptr(q) as usize);
    queues.dedup_by(|a, b| Arc::ptr_eq(a, b));
}
