//! The management API's message rates: a sampler that reads every count once per
//! statistics interval (RabbitMQ's `collect_statistics_interval`, 5 s) and keeps
//! the last rate beside it, and the `message_stats` JSON built from both. It runs
//! only while the API does, so the hot path never computes a rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::model::stats::{MessageCounts, Rates, STAT_NAMES};
use crate::model::vhost::Vhost;
use crate::session::context::BrokerState;

/// Samples every `every` until `stop` changes.
pub async fn sample(state: Arc<BrokerState>, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        sample_once(&state, Instant::now());
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

fn sample_once(s: &BrokerState, now: Instant) {
    s.rates.sample(now, broker_counts(s).stats());
    for conn in s.connections() {
        for ch in conn.channels() {
            ch.rates.sample(now, ch.counts.stats());
        }
    }
    for (name, v) in s.vhost_map().iter() {
        v.rates.sample(now, vhost_counts(s, name, v).stats());
        for q in v.topology().queues() {
            q.rates.sample(now, q.stats_counts());
        }
    }
}

/// Which `message_stats` an object shows: a queue confirms and returns nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Of {
    Broker,
    Channel,
    Queue,
}

/// RabbitMQ's `message_stats`: each count with `<name>_details: {"rate": r}`, and
/// `deliver_get` (all four ways out) beside them.
pub fn message_stats(of: Of, n: [u64; 11], rates: &Rates<11>) -> Value {
    let r = rates.get();
    let mut m = Map::new();
    let mut put = |name: &str, count: u64, rate: f64| {
        m.insert(name.into(), count.into());
        m.insert(
            format!("{name}_details"),
            serde_json::json!({ "rate": (rate * 10.0).round() / 10.0 }),
        );
    };
    for (i, name) in STAT_NAMES.iter().enumerate() {
        let skip =
            of == Of::Queue && matches!(*name, "confirm" | "return_unroutable" | "drop_unroutable");
        if !skip {
            put(name, n[i], r[i]);
        }
    }
    // deliver, deliver_no_ack, get, get_no_ack.
    let (c, rate) = (4..8).fold((0, 0.0), |(c, rate), i| (c + n[i], rate + r[i]));
    put("deliver_get", c, rate);
    Value::Object(m)
}

/// The broker-wide counts now: closed channels' and connections' plus the open ones'.
pub fn broker_counts(s: &BrokerState) -> MessageCounts {
    let total = MessageCounts::default();
    s.closed.add_to(&total);
    for conn in s.connections() {
        conn.counts_into(&total);
    }
    total
}

/// One vhost's counts now: its closed connections' plus its open ones'.
pub fn vhost_counts(s: &BrokerState, name: &str, v: &Vhost) -> MessageCounts {
    let total = MessageCounts::default();
    v.closed_counts.add_to(&total);
    for conn in s.connections() {
        if conn.opened().is_some_and(|o| o.vhost == name) {
            conn.counts_into(&total);
        }
    }
    total
}
