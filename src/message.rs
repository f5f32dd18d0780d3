//! A published message, shared by every queue it was routed to. Queues hold an
//! `Arc<Message>`; the body is the `Bytes` cut from the publisher's read buffer, and
//! the content header is kept raw so that consumers get it byte for byte.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
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
        gauge.add(body.len() + header.len() + PER_MESSAGE);
        let ttl = ttl_of(&properties);
        Message {
            exchange,
            routing_key,
            header,
            properties,
            body,
            ttl,
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

/// The per-message TTL in ms that an expiration property asks for.
pub fn ttl_of(properties: &BasicProperties) -> Option<u64> {
    properties
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<u64>().ok())
}

/// Whether an expiration property is valid as RabbitMQ reads it: a non-negative integer.
pub fn valid_expiration(properties: &BasicProperties) -> Result<(), String> {
    match properties.expiration() {
        Some(e) if e.as_str().parse::<u64>().is_err() => Err(e.as_str().to_string()),
        _ => Ok(()),
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        self.gauge
            .sub(self.body.len() + self.header.len() + PER_MESSAGE);
    }
}

/// Bytes of message content held by the broker, against the configured high watermark.
/// Publishing connections stop reading while it is exceeded.
pub struct MemoryGauge {
    used: AtomicUsize,
    high: usize,
    pub below: Notify,
}

impl MemoryGauge {
    pub fn new(high: usize) -> MemoryGauge {
        MemoryGauge {
            used: AtomicUsize::new(0),
            high,
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

    pub fn over(&self) -> bool {
        self.used() > self.high
    }
}
