//! Message counts and rates, as RabbitMQ names them. A count is kept where the hot
//! path already is (per channel, so an uncontended atomic add; per queue, mostly
//! under the queue's own lock) and summed when read. Rates are not computed on the
//! hot path at all: a sampler (the management API's, when it runs) reads the counts
//! once per statistics interval and keeps the last rate beside them, so a request
//! only reads, and a broker without the API pays nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Message counts as RabbitMQ's global metrics name them, kept per channel (so a
/// count is one uncontended atomic add) and summed when metrics are read.
#[derive(Default, Debug)]
pub struct MessageCounts {
    pub received: AtomicU64,
    pub received_confirm: AtomicU64,
    pub routed: AtomicU64,
    pub unroutable_dropped: AtomicU64,
    pub unroutable_returned: AtomicU64,
    pub confirmed: AtomicU64,
    pub delivered_consume_auto_ack: AtomicU64,
    pub delivered_consume_manual_ack: AtomicU64,
    pub delivered_get_auto_ack: AtomicU64,
    pub delivered_get_manual_ack: AtomicU64,
    pub get_empty: AtomicU64,
    pub redelivered: AtomicU64,
    pub acknowledged: AtomicU64,
    /// Published body sizes: how many fell at or under each of [`SIZE_BUCKETS`]
    /// (the last counts the rest), and their sum.
    pub sizes: [AtomicU64; SIZE_BUCKETS.len() + 1],
    pub size_sum: AtomicU64,
}

/// The upper bounds (bytes) of the message size histogram, those of RabbitMQ 4's
/// `rabbitmq_message_size_bytes` (then +Inf).
pub const SIZE_BUCKETS: [u64; 8] = [
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
];

impl MessageCounts {
    pub fn bump(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Every counter with its RabbitMQ name (after `rabbitmq_global_messages_`).
    pub fn named(&self) -> [(&'static str, &AtomicU64); 13] {
        [
            ("received_total", &self.received),
            ("received_confirm_total", &self.received_confirm),
            ("routed_total", &self.routed),
            ("unroutable_dropped_total", &self.unroutable_dropped),
            ("unroutable_returned_total", &self.unroutable_returned),
            ("confirmed_total", &self.confirmed),
            (
                "delivered_consume_auto_ack_total",
                &self.delivered_consume_auto_ack,
            ),
            (
                "delivered_consume_manual_ack_total",
                &self.delivered_consume_manual_ack,
            ),
            ("delivered_get_auto_ack_total", &self.delivered_get_auto_ack),
            (
                "delivered_get_manual_ack_total",
                &self.delivered_get_manual_ack,
            ),
            ("get_empty_total", &self.get_empty),
            ("redelivered_total", &self.redelivered),
            ("acknowledged_total", &self.acknowledged),
        ]
    }

    /// Adds these counts to `into` (a closing channel's to its connection's, a
    /// closing connection's to the broker's).
    pub fn add_to(&self, into: &MessageCounts) {
        for ((_, from), (_, to)) in self.named().iter().zip(into.named().iter()) {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        for (from, to) in self.sizes.iter().zip(into.sizes.iter()) {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        into.size_sum
            .fetch_add(self.size_sum.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// The management API's `message_stats` names, in the order of
/// [`MessageCounts::stats`] (`deliver_get` is the sum of the four deliveries).
pub const STAT_NAMES: [&str; 11] = [
    "publish",
    "confirm",
    "return_unroutable",
    "drop_unroutable",
    "deliver",
    "deliver_no_ack",
    "get",
    "get_no_ack",
    "get_empty",
    "redeliver",
    "ack",
];

impl MessageCounts {
    /// A published body of `len` bytes, for the size histogram.
    pub fn sized(&self, len: usize) {
        let len = len as u64;
        // Eight bounds: a few comparisons, not worth a search.
        let i = SIZE_BUCKETS
            .iter()
            .position(|&b| len <= b)
            .unwrap_or(SIZE_BUCKETS.len());
        self.sizes[i].fetch_add(1, Ordering::Relaxed);
        self.size_sum.fetch_add(len, Ordering::Relaxed);
    }

    /// A message handed out by basic.get (or the management API's get).
    pub fn fetched(&self, no_ack: bool, redelivered: bool) {
        MessageCounts::bump(
            if no_ack {
                &self.delivered_get_auto_ack
            } else {
                &self.delivered_get_manual_ack
            },
            1,
        );
        if redelivered {
            MessageCounts::bump(&self.redelivered, 1);
        }
    }

    /// The counts under [`STAT_NAMES`].
    pub fn stats(&self) -> [u64; 11] {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            l(&self.received),
            l(&self.confirmed),
            l(&self.unroutable_returned),
            l(&self.unroutable_dropped),
            l(&self.delivered_consume_manual_ack),
            l(&self.delivered_consume_auto_ack),
            l(&self.delivered_get_manual_ack),
            l(&self.delivered_get_auto_ack),
            l(&self.get_empty),
            l(&self.redelivered),
            l(&self.acknowledged),
        ]
    }
}

/// The last rate of each of `N` counters: per second, over the last interval
/// between two samples (RabbitMQ's `<name>_details.rate`).
#[derive(Default)]
pub struct Rates<const N: usize> {
    window: Mutex<Window<N>>,
}

struct Window<const N: usize> {
    at: Option<Instant>,
    last: [u64; N],
    rate: [f64; N],
}

impl<const N: usize> Default for Window<N> {
    fn default() -> Self {
        Window {
            at: None,
            last: [0; N],
            rate: [0.0; N],
        }
    }
}

impl<const N: usize> Rates<N> {
    /// Takes a sample: the rates become the change since the last one per second.
    /// The first sample only sets the base.
    pub fn sample(&self, now: Instant, counts: [u64; N]) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = w.at {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            if secs > 0.0 {
                let Window { last, rate, .. } = &mut *w;
                for ((r, now), before) in rate.iter_mut().zip(counts).zip(last.iter()) {
                    // A counter never goes back; a sum over objects can (one closed
                    // and its counts moved elsewhere): no negative rates.
                    *r = now.saturating_sub(*before) as f64 / secs;
                }
            }
        }
        w.at = Some(now);
        w.last = counts;
    }

    pub fn get(&self) -> [f64; N] {
        self.window.lock().unwrap_or_else(|p| p.into_inner()).rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_rate_is_the_change_per_second_since_the_last_sample() {
        let r = Rates::<2>::default();
        let t = Instant::now();
        r.sample(t, [100, 7]);
        assert_eq!(r.get(), [0.0, 0.0], "one sample is no rate yet");
        r.sample(t + Duration::from_secs(5), [600, 7]);
        assert_eq!(r.get(), [100.0, 0.0]);
        r.sample(t + Duration::from_secs(10), [500, 17]);
        assert_eq!(
            r.get(),
            [0.0, 2.0],
            "a count that went back is no negative rate"
        );
    }
}
