//! Topology changes as values. A declare or delete from AMQP, one from the config
//! file and one from an HTTP call are all a [`Change`], applied by
//! [`Vhost::apply`](super::vhost::Vhost::apply) in one place: validate, change the
//! model, persist, tell whoever listens. What actually changed, cascades included
//! (the bindings that go with a queue, an auto-delete exchange that goes with its
//! last binding), is a list of [`Event`]s, which listeners receive in order.

use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::exchange::{Destination, ExchangeDef};
use super::queue::{Consumer, Queue};

pub enum Change {
    DeclareExchange(ExchangeSpec),
    DeleteExchange {
        name: String,
        if_unused: bool,
    },
    DeclareQueue(QueueSpec),
    DeleteQueue {
        name: String,
        if_unused: bool,
        if_empty: bool,
    },
    Bind(BindingSpec),
    Unbind(BindingSpec),
    Purge {
        queue: String,
    },
}

pub struct ExchangeSpec {
    pub name: String,
    pub kind: String,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

pub struct QueueSpec {
    /// Empty: the broker names it (`amq.gen-...`).
    pub name: String,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

pub struct BindingSpec {
    pub source: String,
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// Who asks for a change. A connection owns the exclusive queues it declares and
/// may use no one else's; an operator (config file, HTTP API) owns none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    Connection(u64),
    Operator,
}

/// What a change did, as its reply reports it.
pub enum Outcome {
    /// Declared, deleted, bound or unbound: nothing to report but success.
    Done,
    Queue {
        queue: Arc<Queue>,
        messages: u32,
        consumers: u32,
    },
    QueueDeleted {
        messages: u32,
        cancellations: Cancellations,
    },
    Purged {
        messages: u32,
    },
}

pub struct Applied {
    pub outcome: Outcome,
    /// Something that survives a restart changed: the reply must wait until the
    /// store has synced it.
    pub durable: bool,
}

/// One thing that changed. Bindings say whether both their ends survive a restart.
pub enum Event {
    ExchangeDeclared(Arc<ExchangeDef>),
    ExchangeDeleted(Arc<ExchangeDef>),
    QueueDeclared(Arc<Queue>),
    QueueDeleted(Arc<Queue>),
    Bound(BindingEvent),
    Unbound(BindingEvent),
    Purged { queue: Arc<Queue>, messages: u32 },
}

pub struct BindingEvent {
    pub source: Arc<str>,
    pub destination: Destination,
    pub routing_key: Arc<str>,
    pub arguments: FieldTable,
    pub durable: bool,
}

/// Whoever must hear of topology changes: the store now; metrics, the management
/// API, definitions export and replication later. Listeners are called in
/// order, after the model changed and before the client is answered.
pub trait TopologyListener: Send + Sync {
    /// Returns whether it wrote something that must be synced before the reply.
    fn changed(&self, vhost: &str, events: &[Event]) -> Result<bool, String>;
}

/// Consumers of a deleted queue, to be told once the deleting channel has replied
/// (the order RabbitMQ's clients see: delete-ok, then basic.cancel).
pub struct Cancellations(pub(super) Vec<Arc<Consumer>>);

impl Cancellations {
    pub fn none() -> Cancellations {
        Cancellations(Vec::new())
    }

    pub fn notify(self) {
        for c in self.0 {
            c.channel.cancelled(&c.tag);
        }
    }
}
