//! Dead-lettering: a message that expired, was rejected without requeue or
//! overflowed a queue is republished to the queue's dead-letter exchange with
//! RabbitMQ's `x-death` bookkeeping, unless that would send it round a cycle.
//! Queues hand dead letters to the vhost's housekeeper, which routes them off
//! every queue's lock.

use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

use super::message::{header_routes, without, Message};
use super::values::{int_value, string_value};
use crate::store::Store;

pub struct DeadLetter {
    pub msg: Arc<Message>,
    pub queue: Arc<str>,
    pub reason: &'static str,
    pub exchange: Arc<str>,
    pub routing_key: Option<Arc<str>>,
    /// The dead queue's stored copy (store, queue id, seq): deleted once routed.
    pub source: Option<(Arc<dyn Store>, u64, u64)>,
}

impl DeadLetter {
    /// The dead letter has been routed (or could not be): its source copy goes.
    pub fn forget_source(&mut self) {
        if let Some((store, queue, seq)) = self.source.take() {
            store.delete_message(queue, seq);
        }
    }

    /// The message to republish, its x-death headers updated, and the keys to
    /// route it by.
    pub fn republished(&self) -> Republished {
        // As rabbit_dead_letter:make_msg: with x-dead-letter-routing-key the dead
        // letter goes by that key alone (and loses its CC header); without, by every
        // key the message was published with, CC and BCC ones included.
        let routing_key: Arc<str> = self
            .routing_key
            .clone()
            .unwrap_or_else(|| self.msg.routing_key.clone());
        let mut keys: Vec<Arc<str>> = vec![routing_key.clone()];
        if self.routing_key.is_none() {
            keys.extend(self.msg.extra_keys.iter().cloned());
        }
        let properties = with_x_death(self);
        let deaths = x_deaths(&properties);
        let msg = Arc::new(
            self.msg
                .republish(self.exchange.clone(), routing_key, properties),
        );
        Republished {
            msg,
            keys,
            deaths,
            rejected: self.reason == "rejected",
        }
    }
}

/// A dead letter ready to route.
pub struct Republished {
    pub msg: Arc<Message>,
    pub keys: Vec<Arc<str>>,
    deaths: Vec<Option<(String, String)>>,
    rejected: bool,
}

impl Republished {
    /// Whether the dead letter may go to `queue`: not if that closes a cycle
    /// (rejections excepted, as in RabbitMQ).
    pub fn may_enter(&self, queue: &str) -> bool {
        self.rejected || !is_cycle(queue, &self.deaths)
    }
}

/// RabbitMQ's rule (rabbit_dead_letter:is_cycle): walk the x-death entries, newest
/// first, up to the first one for `queue`; that stretch is a cycle unless some entry
/// in it is a rejection or is not a table the broker wrote. Entries further back,
/// whatever a client put there, do not matter: the broker's own entries always go in
/// front, so a forged header cannot hide a cycle the broker itself made.
fn is_cycle(queue: &str, deaths: &[Option<(String, String)>]) -> bool {
    let Some(end) = deaths
        .iter()
        .position(|d| d.as_ref().is_some_and(|(q, _)| q == queue))
    else {
        return false;
    };
    deaths[..=end]
        .iter()
        .all(|d| d.as_ref().is_some_and(|(_, reason)| reason != "rejected"))
}

/// (queue, reason) of each x-death entry, None for an entry that is not a table of those.
fn x_deaths(p: &BasicProperties) -> Vec<Option<(String, String)>> {
    let Some(headers) = p.headers() else {
        return Vec::new();
    };
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return Vec::new();
    };
    deaths
        .as_slice()
        .iter()
        .map(|d| match d {
            AMQPValue::FieldTable(t) => {
                let field = |k: &str| match t.inner().get(k) {
                    Some(AMQPValue::LongString(s)) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                };
                // No queue can be named "": a missing field matches no queue.
                Some((
                    field("queue").unwrap_or_default(),
                    field("reason").unwrap_or_default(),
                ))
            }
            _ => None,
        })
        .collect()
}

/// The message's properties with RabbitMQ's x-death bookkeeping updated.
fn with_x_death(dl: &DeadLetter) -> BasicProperties {
    let old = &dl.msg.properties;
    let mut headers = old.headers().clone().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |v: &AMQPValue| match v {
        AMQPValue::FieldTable(t) => {
            t.inner().get("queue").and_then(string_value).as_deref() == Some(&*dl.queue)
                && t.inner().get("reason").and_then(string_value).as_deref() == Some(dl.reason)
        }
        _ => false,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let entry = match deaths.iter().position(same) {
        Some(i) => {
            let mut t = match deaths.remove(i) {
                AMQPValue::FieldTable(t) => t,
                _ => FieldTable::default(),
            };
            // A client may have put any count there: it saturates, never wraps.
            let count = t
                .inner()
                .get("count")
                .and_then(int_value)
                .unwrap_or(0)
                .clamp(0, i64::MAX as i128) as i64;
            t.insert(
                ShortString::from("count"),
                AMQPValue::LongLongInt(count.saturating_add(1)),
            );
            t.insert(ShortString::from("time"), AMQPValue::Timestamp(now));
            t
        }
        None => {
            let mut t = FieldTable::default();
            t.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
            t.insert(ShortString::from("reason"), text(dl.reason));
            t.insert(ShortString::from("queue"), text(&dl.queue));
            t.insert(ShortString::from("time"), AMQPValue::Timestamp(now));
            t.insert(ShortString::from("exchange"), text(&dl.msg.exchange));
            // The publish's key, then the CC keys (BCC ones were never kept).
            let mut keys = FieldArray::default();
            keys.push(text(&dl.msg.routing_key));
            if let Ok(cc) = header_routes(old.headers().as_ref(), &["CC"]) {
                for k in cc {
                    keys.push(text(&k));
                }
            }
            t.insert(
                ShortString::from("routing-keys"),
                AMQPValue::FieldArray(keys),
            );
            if let Some(e) = old.expiration() {
                t.insert(ShortString::from("original-expiration"), text(e.as_str()));
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    let mut array = FieldArray::default();
    for d in deaths {
        array.push(d);
    }
    headers.insert(ShortString::from("x-death"), AMQPValue::FieldArray(array));
    if dl.routing_key.is_some() {
        headers = without(&headers, "CC");
    }
    for (key, value) in [
        ("x-first-death-reason", dl.reason),
        ("x-first-death-queue", &*dl.queue),
        ("x-first-death-exchange", &*dl.msg.exchange),
    ] {
        if !headers.contains_key(key) {
            headers.insert(ShortString::from(key), text(value));
        }
    }
    // The expiration goes: a dead letter must not expire again for the same reason.
    let mut p = BasicProperties::default();
    if let Some(v) = old.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = old.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    p = p.with_headers(headers);
    if let Some(v) = old.delivery_mode() {
        p = p.with_delivery_mode(*v);
    }
    if let Some(v) = old.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = old.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = old.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = old.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = old.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = old.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = old.user_id() {
        p = p.with_user_id(v.clone());
    }
    if let Some(v) = old.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = old.cluster_id() {
        p = p.with_cluster_id(v.clone());
    }
    p
}
