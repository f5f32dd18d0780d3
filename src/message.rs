//! A published message, shared by every queue it was routed to. Queues hold an
//! `Arc<Message>`; the body is the `Bytes` cut from the publisher's read buffer, and
//! the content header is kept raw so that consumers get it byte for byte.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;
use tokio::sync::Notify;

pub struct Message {
    pub exchange: Arc<str>,
    pub routing_key: Arc<str>,
    /// Raw content header payload: class, weight, body size, property flags and values.
    pub header: Bytes,
    pub properties: BasicProperties,
    pub body: Bytes,
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
        gauge.add(body.len() + header.len());
        Message {
            exchange,
            routing_key,
            header,
            properties,
            body,
            gauge,
        }
    }

    pub fn persistent(&self) -> bool {
        self.properties.delivery_mode() == &Some(2)
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        self.gauge.sub(self.body.len() + self.header.len());
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
