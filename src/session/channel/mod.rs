//! An AMQP channel. `Channel` is owned by its connection task and handles the
//! channel's methods in order: channel.* and confirm.select here, the other
//! classes in a file each (`exchange`, `queue`, `basic`, `publish` for
//! basic.publish and its content, `tx`). `ChannelShared` (in `delivery`) is the
//! part queues touch when they deliver.

mod basic;
mod exchange;
mod publish;
mod queue;
mod tx;

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::protocol::{channel, confirm, AMQPClass};

use self::publish::Incoming;
use self::tx::{Tx, TxOp};
use super::delivery::{requeue, ChannelShared};
use super::shared::ConnShared;
use crate::auth::Access;
use crate::error::{AmqpError, AmqpResult};
use crate::model::change::{Actor, Cancellations, Change};
use crate::model::exchange::Destination;
use crate::model::message::MemoryGauge;
use crate::model::queue::{Consumer, Queue};
use crate::model::values::string_value;
use crate::model::vhost::Vhost;

pub struct Channel {
    pub shared: Arc<ChannelShared>,
    /// The highest publish sequence number acked to the publisher (for metrics).
    confirmed_upto: u64,
    /// The highest publish tag acked or nacked so far: an ack that settles only
    /// the next one goes with multiple=false, as RabbitMQ's does.
    settled_upto: u64,
    /// Held while open when the user has a max-channels limit.
    pub(crate) counted: Option<crate::session::context::CountedChannel>,
    vhost: Arc<Vhost>,
    gauge: Arc<MemoryGauge>,
    consumers: HashMap<Arc<str>, (Arc<Queue>, Arc<Consumer>)>,
    incoming: Option<Incoming>,
    confirm: bool,
    publish_seq: u64,
    /// Highest publish sequence number not yet confirmed to the publisher.
    confirm_due: Option<u64>,
    /// A persistent message reached a durable queue since the last confirm was sent.
    sync_needed: bool,
    /// Confirms handed to the store's committer and not yet sent.
    syncs_pending: usize,
    tx: Option<Tx>,
    consumer_prefetch: u32,
    last_queue: Option<Arc<str>>,
    /// The direct reply-to pseudo-queue this channel consumes from, if any.
    reply_queue: Option<Arc<Queue>>,
    max_message_size: u64,
    /// limits.max_consumers_per_channel; 0 is unlimited.
    max_consumers: u32,
    /// channel.close sent after an error: discard everything until close-ok.
    pub closing: bool,
    /// A queue published to has consumers falling behind.
    pub backlogged: bool,
}

/// What a channel asks of its connection after a method.
pub enum After {
    Nothing,
    /// channel.close-ok was received or sent: the channel number is free again.
    Closed,
    /// A durable change was made: send this reply (then tell these consumers their
    /// queue is gone) only once the store has synced it.
    SyncThenReply(AMQPClass, Option<Cancellations>),
    /// Handle this method again once `ready` resolves (basic.get of a message
    /// being read back from disk); nothing else on the connection goes first.
    Retry(tokio::sync::oneshot::Receiver<()>, AMQPClass),
}

impl Channel {
    pub fn new(
        (id, generation): (u16, u64),
        conn: Arc<ConnShared>,
        vhost: Arc<Vhost>,
        gauge: Arc<MemoryGauge>,
        (max_message_size, max_consumers): (u64, u32),
    ) -> Channel {
        let shared = Arc::new(ChannelShared::new(id, generation, conn.clone()));
        conn.add_channel(&shared);
        Channel {
            shared,
            vhost,
            gauge,
            consumers: HashMap::new(),
            incoming: None,
            confirm: false,
            publish_seq: 0,
            confirm_due: None,
            sync_needed: false,
            syncs_pending: 0,
            tx: None,
            consumer_prefetch: 0,
            last_queue: None,
            reply_queue: None,
            max_message_size,
            max_consumers,
            closing: false,
            backlogged: false,
            counted: None,
            confirmed_upto: 0,
            settled_upto: 0,
        }
    }

    /// RabbitMQ's permission check: ACCESS_REFUSED with its text when the user
    /// may not do `access` on the named exchange or queue.
    fn permit(&self, access: Access, kind: &str, name: &str) -> AmqpResult<()> {
        if self.shared.conn.allows(access, name) {
            return Ok(());
        }
        Err(AmqpError::access_refused(format!(
            "access to {kind} '{name}' in vhost '{}' refused for user '{}'",
            self.vhost.name,
            self.shared.conn.user()
        )))
    }

    /// RabbitMQ's topic permission check: on a topic exchange, the routing key of a
    /// publish (write) or a binding (read) must match the user's pattern for it.
    pub(super) fn permit_topic(
        &self,
        access: Access,
        exchange: &str,
        routing_key: &str,
    ) -> AmqpResult<()> {
        let Some(topics) = self.shared.conn.topic_permissions() else {
            return Ok(());
        };
        if !self.vhost.topology().is_topic(exchange) || topics.allows(access, exchange, routing_key)
        {
            return Ok(());
        }
        Err(AmqpError::access_refused(format!(
            "access to topic '{routing_key}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
            self.vhost.name,
            self.shared.conn.user()
        )))
    }

    /// The permissions a topology change needs, checked in RabbitMQ's order: names
    /// the broker refuses anyway (the default exchange, `amq.*`) are left to it.
    fn permit_change(&self, change: &Change) -> AmqpResult<()> {
        use Access::{Configure, Read, Write};
        let reserved = |name: &str| name.is_empty() || name.starts_with("amq.");
        let dest = |d: &Destination| match d {
            Destination::Queue(q) => ("queue", q.clone()),
            Destination::Exchange(x) => ("exchange", x.clone()),
        };
        match change {
            Change::DeclareExchange(x) if !x.passive && !reserved(&x.name) => {
                self.permit(Configure, "exchange", &x.name)?;
                let ae = x.arguments.inner().get("alternate-exchange");
                if let Some(ae) = ae.and_then(string_value) {
                    self.permit(Read, "exchange", &x.name)?;
                    self.permit(Write, "exchange", &ae)?;
                }
            }
            Change::DeleteExchange { name, .. } if !reserved(name) => {
                self.permit(Configure, "exchange", name)?;
            }
            Change::DeclareQueue(q) if !q.passive && (q.name.is_empty() || !reserved(&q.name)) => {
                // A server-named queue is checked as RabbitMQ checks it: by the
                // `amq.gen-` name it will get.
                let name = if q.name.is_empty() {
                    "amq.gen-"
                } else {
                    &q.name
                };
                self.permit(Configure, "queue", name)?;
                let dlx = q.arguments.inner().get("x-dead-letter-exchange");
                if let Some(dlx) = dlx.and_then(string_value) {
                    self.permit(Read, "queue", name)?;
                    self.permit(Write, "exchange", &dlx)?;
                }
            }
            Change::DeleteQueue { name, .. } => self.permit(Configure, "queue", name)?,
            Change::Purge { queue } => self.permit(Read, "queue", queue)?,
            Change::Bind(b) | Change::Unbind(b) => {
                let (kind, name) = dest(&b.destination);
                if !b.source.is_empty() && !name.is_empty() {
                    self.permit(Write, kind, &name)?;
                    self.permit(Read, "exchange", &b.source)?;
                    self.permit_topic(Read, &b.source, &b.routing_key)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Who this channel's topology changes and queue access count as.
    fn actor(&self) -> Actor {
        Actor::Connection(self.shared.conn.id)
    }

    fn reply(&self, class: AMQPClass) {
        self.shared.send(&class);
    }

    /// Releases what the channel holds: consumers are cancelled, unacked messages requeued.
    pub fn release(&mut self) {
        self.shared.close();
        for (q, c) in std::mem::take(&mut self.consumers).into_values() {
            self.drop_consumer(&q, &c);
        }
        requeue(self.shared.take_all());
        self.incoming = None;
        // Deliveries acked inside an uncommitted transaction are still unacked.
        if let Some(tx) = self.tx.take() {
            requeue(
                tx.acks
                    .into_iter()
                    .flat_map(TxOp::into_deliveries)
                    .collect(),
            );
        }
    }

    /// Detaches a consumer from its queue; an auto-delete queue may go with it,
    /// and a direct reply-to pseudo-queue always does.
    fn drop_consumer(&mut self, q: &Arc<Queue>, c: &Arc<Consumer>) {
        if q.remove_consumer(c) {
            self.vhost.delete_queue_instance(q);
        }
        if self.reply_queue.as_ref().is_some_and(|r| Arc::ptr_eq(r, q)) {
            self.vhost.drop_reply_queue(&q.name);
            self.reply_queue = None;
        }
    }

    pub fn consumer_gone(&mut self, tag: &str) {
        self.consumers.remove(tag);
    }

    /// Handles one method on this channel.
    pub fn handle(&mut self, class: AMQPClass) -> AmqpResult<After> {
        let ids = (class.get_amqp_class_id(), class.get_amqp_method_id());
        self.dispatch(class)
            .map_err(|e| e.with_method(ids.0, ids.1))
    }

    fn resolve_queue(&self, name: &str) -> AmqpResult<Arc<str>> {
        if !name.is_empty() {
            return Ok(name.into());
        }
        self.last_queue
            .clone()
            .ok_or_else(|| AmqpError::not_found("no previously declared queue".into()))
    }

    fn dispatch(&mut self, class: AMQPClass) -> AmqpResult<After> {
        use AMQPClass as C;
        match class {
            C::Channel(channel::AMQPMethod::Close(_)) => {
                self.release();
                self.reply(C::Channel(channel::AMQPMethod::CloseOk(
                    channel::CloseOk {},
                )));
                return Ok(After::Closed);
            }
            C::Channel(channel::AMQPMethod::CloseOk(_)) => return Ok(After::Closed),
            C::Channel(channel::AMQPMethod::Open(_)) => {
                return Err(AmqpError::channel_error(
                    "second 'channel.open' seen".into(),
                ))
            }
            // RabbitMQ 3.x does not implement channel.flow active=false (540).
            C::Channel(channel::AMQPMethod::Flow(f)) => {
                if !f.active {
                    return Err(AmqpError::not_implemented("active=false".into()));
                }
                self.reply(C::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                    active: true,
                })));
            }
            C::Channel(channel::AMQPMethod::FlowOk(_)) => {}
            C::Access(amq_protocol::protocol::access::AMQPMethod::Request(_)) => {
                self.reply(C::Access(
                    amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    ),
                ));
            }
            C::Exchange(m) => return self.exchange_method(m),
            C::Queue(m) => return self.queue_method(m),
            C::Basic(m) => return self.basic_method(m),
            C::Confirm(confirm::AMQPMethod::Select(s)) => {
                if self.tx.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from tx to confirm mode".into(),
                    ));
                }
                self.confirm = true;
                self.shared
                    .listing
                    .confirm
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                if !s.nowait {
                    self.reply(C::Confirm(confirm::AMQPMethod::SelectOk(
                        confirm::SelectOk {},
                    )));
                }
            }
            C::Tx(m) => return self.tx_method(m),
            // connection.* on a channel other than 0
            _ => return Err(AmqpError::command_invalid("unimplemented method".into())),
        }
        Ok(After::Nothing)
    }

    /// Under a channel-wide prefetch, credit freed by one queue's ack may let any
    /// of the channel's consumers go on, not only that queue's.
    fn after_settle(&self) {
        if self.shared.lock().prefetch != 0 {
            self.kick_consumers();
        }
    }

    fn kick_consumers(&self) {
        for (q, _) in self.consumers.values() {
            q.kick();
        }
    }

    /// A connection's socket drained: deliveries held back may flow again.
    pub fn resume(&self) {
        self.kick_consumers();
    }

    /// Replies now, or once the store has synced a durable change. With nowait
    /// there is no reply, but a durable change still goes into the next flush.
    fn answer(
        &self,
        durable: bool,
        nowait: bool,
        reply: AMQPClass,
        cancel: Option<Cancellations>,
    ) -> After {
        if nowait {
            if let Some(c) = cancel {
                c.notify();
            }
            return After::Nothing;
        }
        if durable && self.vhost.store.is_some() {
            return After::SyncThenReply(reply, cancel);
        }
        self.reply(reply);
        if let Some(c) = cancel {
            c.notify();
        }
        After::Nothing
    }
}

/// `basic.publish` style name of a method, for reply texts.
pub fn class_name(class: &AMQPClass) -> String {
    let dbg = format!("{class:?}");
    // Debug output is like `Basic(Publish(Publish { .. }))`.
    let mut parts = dbg.split(['(', ' ']);
    let c = parts.next().unwrap_or("").to_lowercase();
    let m = parts.next().unwrap_or("").to_string();
    let mut method = String::new();
    for (i, ch) in m.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            method.push('_');
        }
        method.extend(ch.to_lowercase());
    }
    format!("'{c}.{method}'")
}
