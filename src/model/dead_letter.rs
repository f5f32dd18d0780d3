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
        // On the header's bytes where they can be read (always, for what a client
        // could send): the order of the entries RabbitMQ keeps stays as it was.
        let msg = match raw_x_death(self) {
            Some((header, properties)) => self.msg.republish_with_header(
                self.exchange.clone(),
                routing_key,
                header,
                properties,
            ),
            None => self
                .msg
                .republish(self.exchange.clone(), routing_key, with_x_death(self)),
        };
        let deaths = x_deaths(&msg.properties);
        let msg = Arc::new(msg);
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

/// The dead letter's content header with RabbitMQ's x-death bookkeeping, done as
/// rabbit_dead_letter does it on the header's entries (3.10): the first death
/// adds x-first-death-* and an x-death entry in the order count, reason, queue,
/// time, exchange, routing-keys[, original-expiration]; a later one groups the
/// existing entries by queue and reason, bumps the matching entry's count (its
/// time stays) or adds a new one, and puts that entry first, its keys sorted,
/// the others after it. Every edit leaves the top level sorted; nested tables
/// elsewhere keep their order. The expiration property goes. None if the header
/// cannot be read.
///
/// One deliberate difference: RabbitMQ's grouping reverses the other entries
/// when there are several. That lets a client's forged entry with reason
/// "rejected" stay between a queue and its next death for ever, so that two
/// queues dead-lettering into each other by TTL bounce a message endlessly (the
/// cycle check stops at a rejection). Here the others keep their order, so the
/// forged entry drifts behind and the cycle is found.
fn raw_x_death(dl: &DeadLetter) -> Option<(bytes::Bytes, BasicProperties)> {
    use crate::protocol::ordered::{
        array, array_items, int_of, long, longstr, string_of, table, table_of, timestamp,
        RawHeader, RawTable, FLAG_EXPIRATION,
    };
    let mut header = RawHeader::parse(&dl.msg.header)?;
    let mut headers = header.headers()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut keys = vec![longstr(dl.msg.routing_key.as_bytes())];
    if let Ok(cc) = header_routes(dl.msg.properties.headers().as_ref(), &["CC"]) {
        keys.extend(cc.iter().map(|k| longstr(k.as_bytes())));
    }
    let mut info = RawTable::default();
    info.set("reason", longstr(dl.reason.as_bytes()));
    info.set("queue", longstr(dl.queue.as_bytes()));
    info.set("time", timestamp(now));
    info.set("exchange", longstr(dl.msg.exchange.as_bytes()));
    info.set("routing-keys", array(&keys));
    if let Some(e) = header.property(FLAG_EXPIRATION) {
        info.set(
            "original-expiration",
            longstr(e.get(1..).unwrap_or_default()),
        );
    }
    let with_count = |n: i64, info: &RawTable| {
        let mut t = RawTable::default();
        t.set("count", long(n));
        t.entries.extend(info.entries.iter().cloned());
        t
    };
    let key_of = |t: &RawTable| {
        (
            t.get("queue").and_then(string_of).map(<[u8]>::to_vec),
            t.get("reason").and_then(string_of).map(<[u8]>::to_vec),
        )
    };
    let this = (
        Some(dl.queue.as_bytes().to_vec()),
        Some(dl.reason.as_bytes().to_vec()),
    );
    match headers.get("x-death").map(<[u8]>::to_vec) {
        None => {
            for (key, value) in [
                ("x-first-death-reason", dl.reason.as_bytes()),
                ("x-first-death-queue", dl.queue.as_bytes()),
                ("x-first-death-exchange", dl.msg.exchange.as_bytes()),
            ] {
                headers.set(key, longstr(value));
            }
            headers.set("x-death", array(&[table(&with_count(1, &info))]));
        }
        Some(value) => match array_items(&value) {
            Some(items) => {
                let tables: Vec<RawTable> = items.iter().filter_map(|i| table_of(i)).collect();
                // rabbit_dead_letter:group_by_queue_and_reason.
                let grouped: Vec<RawTable> = if tables.len() <= 1 {
                    tables
                } else {
                    let mut seen = Vec::new();
                    let mut acc: Vec<RawTable> = Vec::new();
                    for t in &tables {
                        let key = key_of(t);
                        let matches: Vec<&RawTable> =
                            tables.iter().filter(|x| key_of(x) == key).collect();
                        let mut first = matches[0].clone();
                        if first.get("count").is_none() {
                            first = with_count(matches.len() as i64, &first);
                        }
                        if !seen.contains(&key) {
                            acc.push(first);
                        }
                        seen.push(key);
                    }
                    acc
                };
                let (matching, others): (Vec<RawTable>, Vec<RawTable>) =
                    grouped.into_iter().partition(|t| key_of(t) == this);
                let mut entry = match matching.into_iter().next() {
                    None => with_count(1, &info),
                    Some(mut m) => match m.get("count").and_then(int_of) {
                        // A client may have put any count there: it saturates.
                        Some(n) => {
                            let n = n.clamp(0, i64::MAX as i128) as i64;
                            m.set("count", long(n.saturating_add(1)));
                            m
                        }
                        None => with_count(1, &m),
                    },
                };
                entry.sort();
                let mut all = vec![table(&entry)];
                all.extend(others.iter().map(table));
                headers.set("x-death", array(&all));
            }
            // Not an array: RabbitMQ resets it.
            None => headers.set("x-death", array(&[table(&with_count(1, &info))])),
        },
    }
    headers.sort();
    if dl.routing_key.is_some() {
        headers.remove("CC");
    }
    header.set_headers(&headers);
    header.remove(FLAG_EXPIRATION);
    let bytes = header.encode();
    let properties = crate::protocol::decode_stored_header(&bytes)?.properties;
    Some((bytes, properties))
}

/// The message's properties with RabbitMQ's x-death bookkeeping updated, for a
/// header that could not be taken apart (decoded and encoded whole).
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
