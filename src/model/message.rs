//! A published message, shared by every queue it was routed to. Queues hold an
//! `Arc<Message>`; the body is the `Bytes` cut from the publisher's read buffer, and
//! the content header is kept raw so that consumers get it byte for byte.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::FieldTable;

use crate::store::{MessageRecord, StoredMessage};
use bytes::Bytes;
use tokio::sync::Notify;

/// What a message costs beyond its content: this struct, its Arc and the queue
/// entries that point at it, so that the watermark tracks real memory.
const PER_MESSAGE: usize = std::mem::size_of::<Message>() + 128;

pub struct Message {
    pub exchange: Arc<str>,
    pub routing_key: Arc<str>,
    /// Raw content header payload: class, weight, body size, property flags and values.
    pub header: Bytes,
    pub properties: BasicProperties,
    pub body: Bytes,
    /// Per-message TTL in ms, from the expiration property.
    pub ttl: Option<u64>,
    /// CC and BCC routing keys it was published with, for dead-lettering.
    pub extra_keys: Vec<Arc<str>>,
    /// What this message counts for on the gauge.
    charged: usize,
    gauge: Arc<MemoryGauge>,
}

impl Message {
    pub fn new(
        exchange: Arc<str>,
        routing_key: Arc<str>,
        header: Bytes,
        properties: BasicProperties,
        body: Bytes,
        gauge: Arc<MemoryGauge>,
    ) -> Message {
        let charged = cost(&header, &body);
        gauge.add(charged);
        let ttl = ttl_of(&properties);
        Message {
            exchange,
            routing_key,
            header,
            properties,
            body,
            ttl,
            extra_keys: Vec::new(),
            charged,
            gauge,
        }
    }

    /// The same body republished under new properties (dead-lettering rewrites headers).
    pub fn republish(
        &self,
        exchange: Arc<str>,
        routing_key: Arc<str>,
        properties: BasicProperties,
    ) -> Message {
        let header = encode_header(self.body.len() as u64, &properties);
        self.republish_with_header(exchange, routing_key, header, properties)
    }

    /// As `republish`, with the content header already encoded (its properties
    /// decoded from it), so that header bytes the broker did not change stay as sent.
    pub fn republish_with_header(
        &self,
        exchange: Arc<str>,
        routing_key: Arc<str>,
        header: Bytes,
        properties: BasicProperties,
    ) -> Message {
        Message::new(
            exchange,
            routing_key,
            header,
            properties,
            self.body.clone(),
            self.gauge.clone(),
        )
    }

    pub fn persistent(&self) -> bool {
        self.properties.delivery_mode() == &Some(2)
    }
}

/// A content header payload for properties the broker changed itself.
pub fn encode_header(body_size: u64, properties: &BasicProperties) -> Bytes {
    use amq_protocol::frame::WriteContext;
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&60u16.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&body_size.to_be_bytes());
    match amq_protocol::protocol::basic::gen_properties(properties)(WriteContext::from(v)) {
        Ok(ctx) => Bytes::from(ctx.write),
        Err(e) => {
            tracing::error!("cannot encode properties: {e:?}");
            Bytes::new()
        }
    }
}

/// The headers whose arrays of strings are extra routing keys (RabbitMQ's
/// sender-selected distribution); BCC is removed before the message is kept.
pub const ROUTING_HEADERS: [&str; 2] = ["CC", "BCC"];

/// The extra routing keys in `names` headers: the long strings of each array, as
/// rabbit_basic:header_routes reads them. Any other type of value is an error, in
/// RabbitMQ's words (`{unacceptable_type_in_header,"CC",longstr}`).
pub fn header_routes(
    headers: Option<&amq_protocol::types::FieldTable>,
    names: &[&str],
) -> Result<Vec<Arc<str>>, String> {
    use amq_protocol::types::AMQPValue;
    let mut keys = Vec::new();
    let Some(headers) = headers else {
        return Ok(keys);
    };
    for name in names {
        match headers.inner().get(*name) {
            None => {}
            Some(AMQPValue::FieldArray(a)) => {
                for v in a.as_slice() {
                    if let AMQPValue::LongString(s) = v {
                        keys.push(String::from_utf8_lossy(s.as_bytes()).into());
                    }
                }
            }
            Some(other) => {
                return Err(format!(
                    "{{unacceptable_type_in_header,\"{name}\",{}}}",
                    super::values::type_name(other)
                ))
            }
        }
    }
    Ok(keys)
}

/// The longest TTL RabbitMQ accepts, per message or per queue: ten years in ms.
pub const MAX_EXPIRY: u64 = 315_360_000_000;

/// The per-message TTL in ms that an expiration property asks for.
pub fn ttl_of(properties: &BasicProperties) -> Option<u64> {
    properties
        .expiration()
        .as_ref()
        .and_then(|e| parse_expiration(e.as_str()).ok())
}

/// Reads an expiration as RabbitMQ does (Erlang's `string:to_integer`, then
/// `check_expiry`); the error is RabbitMQ's reason, as its reply text shows it.
pub fn parse_expiration(text: &str) -> Result<u64, String> {
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let end = digits
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    if end == 0 {
        return Err("no_integer".into());
    }
    if end < digits.len() {
        return Err(format!("{{leftover_string,{:?}}}", &digits[end..]));
    }
    let shown = if negative {
        format!("-{digits}")
    } else {
        digits.to_string()
    };
    // Digits only: a value too long for u64 is simply too large.
    let value = digits.parse::<u64>().unwrap_or(u64::MAX);
    if negative && value != 0 {
        return Err(format!("{{value_negative,{shown}}}"));
    }
    if value > MAX_EXPIRY {
        return Err(format!("{{value_too_large,{shown}}}"));
    }
    Ok(value)
}

/// Whether an expiration property is valid as RabbitMQ reads it; Err is the reply text's detail.
pub fn valid_expiration(properties: &BasicProperties) -> Result<(), String> {
    match properties.expiration() {
        Some(e) => parse_expiration(e.as_str())
            .map(|_| ())
            .map_err(|why| format!("'{}': {why}", e.as_str())),
        None => Ok(()),
    }
}

/// Decoded header values cost far more than their wire form (a map node, a boxed
/// value, a string each): this is what one costs, roughly.
const PER_HEADER_VALUE: usize = 96;

/// What the watermark counts for a message: its content, its decoded headers and
/// its bookkeeping.
fn cost(header: &Bytes, body: &Bytes) -> usize {
    body.len() + PER_MESSAGE + header_cost(header)
}

/// What a content header costs in memory once decoded.
pub fn header_cost(header: &[u8]) -> usize {
    // The header was checked on arrival (or written by the broker), so the walk
    // cannot fail here; a failure only means nothing extra is counted.
    let values =
        crate::protocol::check_content_header(header, &crate::protocol::TableLimits::UNBOUNDED)
            .unwrap_or(0);
    header.len() + values * PER_HEADER_VALUE
}

impl Drop for Message {
    fn drop(&mut self) {
        self.gauge.sub(self.charged);
    }
}

/// Bytes a client made the broker hold before they became a `Message` (a body
/// still arriving, a publish inside an uncommitted transaction): counted against
/// the watermark while held, released on drop.
#[derive(Default)]
pub struct Reservation {
    /// Taken on first use only: most publishes never need it, and cloning a shared
    /// Arc on every publish would be contended across connections.
    gauge: Option<Arc<MemoryGauge>>,
    bytes: usize,
}

impl Reservation {
    /// Counts at least `n` bytes in all.
    pub fn at_least(&mut self, gauge: &Arc<MemoryGauge>, n: usize) {
        self.grow(gauge, n.saturating_sub(self.bytes));
    }

    pub fn grow(&mut self, gauge: &Arc<MemoryGauge>, n: usize) {
        if n == 0 {
            return;
        }
        gauge.add(n);
        self.gauge.get_or_insert_with(|| gauge.clone());
        self.bytes += n;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.sub(self.bytes);
        }
    }
}

/// Bytes of message content held by the broker, against the configured high watermark.
/// Publishing connections stop reading while it is exceeded.
pub struct MemoryGauge {
    used: AtomicUsize,
    high: usize,
    /// The process's resident bytes, last read (memory.rs); with the `rss`
    /// strategy they count against the watermark as well as the bodies held.
    resident: AtomicUsize,
    counts_resident: bool,
    /// Free disk space is below `limits.disk_free_limit`: publishers are blocked
    /// as for memory (RabbitMQ's disk alarm).
    disk_alarm: std::sync::atomic::AtomicBool,
    /// The store's: set while its writes fail or it has given up the space it
    /// keeps for a full disk. Counts as the disk alarm.
    store_alarm: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>>,
    pub below: Notify,
}

impl MemoryGauge {
    /// A gauge counting the bodies held only (the `bodies` strategy).
    pub fn new(high: usize) -> MemoryGauge {
        MemoryGauge::with_strategy(high, false)
    }

    /// With `counts_resident`, the process's resident memory counts too.
    pub fn with_strategy(high: usize, counts_resident: bool) -> MemoryGauge {
        MemoryGauge {
            used: AtomicUsize::new(0),
            high,
            resident: AtomicUsize::new(0),
            counts_resident,
            disk_alarm: std::sync::atomic::AtomicBool::new(false),
            store_alarm: std::sync::OnceLock::new(),
            below: Notify::new(),
        }
    }

    fn add(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        let before = self.used.fetch_sub(n, Ordering::Relaxed);
        if before > self.high && before - n <= self.high {
            self.below.notify_waiters();
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether publishers must wait: memory above the watermark, or the disk alarm.
    pub fn over(&self) -> bool {
        self.memory_over() || self.disk_alarm()
    }

    pub fn memory_over(&self) -> bool {
        self.used() > self.high || self.resident_over()
    }

    fn resident_over(&self) -> bool {
        self.counts_resident && self.resident.load(Ordering::Relaxed) > self.high
    }

    pub fn counts_resident(&self) -> bool {
        self.counts_resident
    }

    pub fn high(&self) -> usize {
        self.high
    }

    /// The process's resident bytes, as last read (0 before the first reading).
    pub fn resident(&self) -> usize {
        self.resident.load(Ordering::Relaxed)
    }

    /// Records a reading of resident memory; returns whether the memory alarm
    /// went on or off with it.
    pub fn set_resident(&self, bytes: usize) -> bool {
        let before = self.memory_over();
        self.resident.store(bytes, Ordering::Relaxed);
        let after = self.memory_over();
        if before && !after {
            self.below.notify_waiters();
        }
        before != after
    }

    /// Free disk below the limit, or the store's alarm.
    pub fn disk_alarm(&self) -> bool {
        self.disk_alarm.load(Ordering::Relaxed)
            || self
                .store_alarm
                .get()
                .is_some_and(|a| a.load(Ordering::Relaxed))
    }

    /// Publishers wait while `alarm` is set (blocked connections look again
    /// every 100 ms).
    pub fn watch_store_alarm(&self, alarm: Arc<std::sync::atomic::AtomicBool>) {
        let _ = self.store_alarm.set(alarm);
    }

    /// Raises or clears the disk alarm; returns whether it changed.
    pub fn set_disk_alarm(&self, on: bool) -> bool {
        let was = self.disk_alarm.swap(on, Ordering::AcqRel);
        if was && !on {
            self.below.notify_waiters();
        }
        was != on
    }
}

/// A header table less one key (FieldTable has no remove).
pub fn without(h: &FieldTable, key: &str) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in h.inner().iter().filter(|(k, _)| k.as_str() != key) {
        out.insert(k.clone(), v.clone());
    }
    out
}

impl Message {
    /// A message read back from the store, its header decoded.
    pub fn from_stored(m: StoredMessage, gauge: &Arc<MemoryGauge>) -> Result<Message, String> {
        let properties = match crate::protocol::decode_stored_header(&m.header) {
            Some(h) => h.properties,
            None => return Err("unreadable content header".into()),
        };
        // Only the publish's own key is stored; the CC keys are still in the header
        // (BCC ones are not kept, so a dead letter after a restart goes without them).
        let extra_keys = header_routes(properties.headers().as_ref(), &["CC"]).unwrap_or_default();
        let mut msg = Message::new(
            m.exchange.into(),
            m.routing_key.into(),
            m.header,
            properties,
            m.body,
            gauge.clone(),
        );
        msg.extra_keys = extra_keys;
        Ok(msg)
    }

    /// What the store keeps of this message (shared, not copied).
    pub fn record(&self) -> MessageRecord {
        MessageRecord {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            header: self.header.clone(),
            body: self.body.clone(),
            priority: self.properties.priority().unwrap_or(0),
            ttl: self.ttl,
        }
    }
}
