//! An AMQP channel. `Channel` is owned by its connection task and handles the
//! channel's methods in order; `ChannelShared` is the part queues touch when they
//! deliver: the delivery-tag counter, the unacked messages and the channel-wide
//! prefetch, behind a small per-channel mutex so that tags reach the wire in order.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use amq_protocol::protocol::{
    basic, channel, confirm, exchange, queue, tx, AMQPClass, BasicProperties,
};
use bytes::{Bytes, BytesMut};

use crate::connection::{ConnEvent, ConnShared, Synced};
use crate::error::{queue_name, AmqpError, AmqpResult};
use crate::model::change::{
    Actor, BindingSpec, Cancellations, Change, ExchangeSpec, Outcome, QueueSpec,
};
use crate::model::exchange::Destination;
use crate::model::message::{
    valid_expiration, without, MemoryGauge, Message, Reservation, ROUTING_HEADERS,
};
use crate::model::queue::{ConsumeRefused, Consumer, Deliver, Enqueued, Queue, QueuedMessage};
use crate::model::topology::Routed;
use crate::model::values::int_value;
use crate::model::vhost::{Vhost, REPLY_TO};
use crate::protocol::{short, write_get_ok, write_method, write_return};

/// A delivery awaiting ack.
struct Unacked {
    tag: u64,
    queue: Arc<Queue>,
    msg: QueuedMessage,
    consumer: Option<Arc<Consumer>>,
}

#[derive(Default)]
struct DeliveryState {
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    /// basic.qos global=true: unacked deliveries allowed on the whole channel; 0 is unlimited.
    prefetch: u32,
}

pub struct ChannelShared {
    pub id: u16,
    /// Tells this channel from an earlier one with the same number.
    pub generation: u64,
    pub conn: Arc<ConnShared>,
    open: AtomicBool,
    /// A persisted message was acked, nacked or rejected: its deletion should be
    /// synced soon rather than left to sled's periodic flush.
    settled_persistent: AtomicBool,
    state: Mutex<DeliveryState>,
}

impl ChannelShared {
    fn lock(&self) -> MutexGuard<'_, DeliveryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Deliver for ChannelShared {
    fn can_deliver(&self) -> bool {
        self.open.load(Ordering::Acquire) && self.conn.outbox.has_room()
    }

    /// Called by a queue, under its lock: assigns the delivery tag and writes basic.deliver.
    fn deliver(
        &self,
        queue: &Arc<Queue>,
        consumer: &Arc<Consumer>,
        m: QueuedMessage,
    ) -> Result<(), QueuedMessage> {
        let mut st = self.lock();
        if !consumer.no_ack && st.prefetch != 0 && st.unacked.len() as u32 >= st.prefetch {
            return Err(m);
        }
        st.next_tag += 1;
        let tag = st.next_tag;
        self.conn
            .outbox
            .note_delivery(m.msg.body.len() + m.msg.header.len());
        self.conn.outbox.append().deliver(
            self.id,
            &consumer.tag,
            tag,
            m.redelivered,
            &m.msg.exchange,
            &m.msg.routing_key,
            &m.msg.header,
            &m.msg.body,
            self.conn.frame_max(),
        );
        if !consumer.no_ack {
            consumer.unacked.fetch_add(1, Ordering::AcqRel);
            st.unacked.insert(
                tag,
                Unacked {
                    tag,
                    queue: queue.clone(),
                    msg: m,
                    consumer: Some(consumer.clone()),
                },
            );
        } else {
            queue.forget(&m);
        }
        Ok(())
    }

    /// The queue of one of this channel's consumers was deleted.
    fn cancelled(&self, tag: &Arc<str>) {
        if !self.open.load(Ordering::Acquire) {
            return;
        }
        if self.conn.consumer_cancel_notify() {
            self.send(&AMQPClass::Basic(basic::AMQPMethod::Cancel(
                basic::Cancel {
                    consumer_tag: short(&**tag),
                    nowait: true,
                },
            )));
        }
        self.conn.event(ConnEvent::ConsumerGone {
            channel: self.id,
            generation: self.generation,
            tag: tag.clone(),
        });
    }
}

impl ChannelShared {
    fn get_ok(&self, queue: &Arc<Queue>, m: QueuedMessage, remaining: u32, no_ack: bool) {
        let mut st = self.lock();
        st.next_tag += 1;
        let tag = st.next_tag;
        {
            let mut out = self.conn.outbox.append();
            write_get_ok(
                out.buf(),
                self.id,
                tag,
                m.redelivered,
                &m.msg.exchange,
                &m.msg.routing_key,
                remaining,
            );
            out.content(self.id, &m.msg.header, &m.msg.body, self.conn.frame_max());
        }
        if !no_ack {
            st.unacked.insert(
                tag,
                Unacked {
                    tag,
                    queue: queue.clone(),
                    msg: m,
                    consumer: None,
                },
            );
        } else {
            queue.forget(&m);
        }
    }

    pub fn send(&self, class: &AMQPClass) {
        write_method(self.conn.outbox.append().buf(), self.id, class);
    }

    /// Removes deliveries by tag (with `multiple`, every tag up to it; tag 0 means all).
    fn take(&self, tag: u64, multiple: bool) -> AmqpResult<Vec<Unacked>> {
        let taken = self.take_inner(tag, multiple)?;
        if taken.iter().any(|u| u.msg.is_persisted()) {
            self.settled_persistent.store(true, Ordering::Release);
        }
        Ok(taken)
    }

    fn take_inner(&self, tag: u64, multiple: bool) -> AmqpResult<Vec<Unacked>> {
        let mut st = self.lock();
        if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            if tag != 0
                && !st.unacked.contains_key(&tag)
                && st.unacked.range(..=upto).next().is_none()
            {
                return Err(unknown_tag(tag));
            }
            let rest = st.unacked.split_off(&upto.saturating_add(1));
            let taken = std::mem::replace(&mut st.unacked, rest);
            Ok(taken.into_values().collect())
        } else {
            st.unacked
                .remove(&tag)
                .map(|u| vec![u])
                .ok_or_else(|| unknown_tag(tag))
        }
    }

    fn take_all(&self) -> Vec<Unacked> {
        std::mem::take(&mut self.lock().unacked)
            .into_values()
            .collect()
    }
}

fn unknown_tag(tag: u64) -> AmqpError {
    AmqpError::precondition_failed(format!("unknown delivery tag {tag}"))
}

/// Gives credit back for settled deliveries, forgets them, and kicks each queue once.
fn settle(done: Vec<Unacked>) {
    for u in &done {
        u.queue.forget(&u.msg);
    }
    release(done);
}

/// Gives credit back for deliveries that were dealt with, and kicks each queue once.
fn release(done: Vec<Unacked>) {
    let mut queues: Vec<Arc<Queue>> = Vec::new();
    for u in &done {
        if let Some(c) = &u.consumer {
            c.release_credit();
        }
        if !queues.iter().any(|q| Arc::ptr_eq(q, &u.queue)) {
            queues.push(u.queue.clone());
        }
    }
    drop(done);
    for q in queues {
        q.kick();
    }
}

/// Requeues deliveries, or rejects them (dead-lettering where the queue says so).
fn nack_taken(taken: Vec<Unacked>, requeue_it: bool) {
    if requeue_it {
        requeue(taken);
    } else {
        for u in &taken {
            u.queue.rejected(u.msg.clone());
        }
        release(taken);
    }
}

/// Puts deliveries back in their queues, in their original positions.
fn requeue(done: Vec<Unacked>) {
    let mut per_queue: Vec<(Arc<Queue>, Vec<QueuedMessage>)> = Vec::new();
    for u in done {
        if let Some(c) = &u.consumer {
            c.release_credit();
        }
        match per_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
            Some((_, v)) => v.push(u.msg),
            None => per_queue.push((u.queue, vec![u.msg])),
        }
    }
    for (q, msgs) in per_queue {
        q.requeue(msgs);
    }
}

/// A publish whose content is still arriving.
struct Incoming {
    exchange: Arc<str>,
    routing_key: Arc<str>,
    mandatory: bool,
    header: Option<(Bytes, BasicProperties, u64)>,
    body: BodyParts,
    received: u64,
    /// What this publish holds so far, counted against the watermark.
    held: Reservation,
}

/// A body arriving in frames. Large frames stay the buffers they arrived in; small
/// ones are copied together, so that a body sent a byte per frame costs a byte per
/// byte, not an allocation per frame.
#[derive(Default)]
struct BodyParts {
    parts: Vec<Bytes>,
    tail: BytesMut,
}

/// Frames at least this large are kept as they are.
const KEEP_FRAME: usize = 4096;

impl BodyParts {
    fn push(&mut self, frame: Bytes) {
        // The first frame is kept as it is: most bodies are one frame, copied nowhere.
        if self.parts.is_empty() && self.tail.is_empty() {
            self.parts.push(frame);
            return;
        }
        if frame.len() < KEEP_FRAME {
            self.tail.extend_from_slice(&frame);
            return;
        }
        if !self.tail.is_empty() {
            self.parts.push(self.tail.split().freeze());
        }
        self.parts.push(frame);
    }

    fn into_body(mut self, len: u64) -> Bytes {
        if !self.tail.is_empty() {
            self.parts.push(self.tail.split().freeze());
        }
        match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts.pop().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(len as usize);
                for part in self.parts {
                    all.extend_from_slice(&part);
                }
                all.freeze()
            }
        }
    }
}

/// What a publish held by a transaction costs beyond its content.
const TX_OVERHEAD: usize = std::mem::size_of::<Publish>() + 64;

/// A publish with all its content, ready to route.
struct Publish {
    exchange: Arc<str>,
    routing_key: Arc<str>,
    mandatory: bool,
    header: Bytes,
    properties: BasicProperties,
    body: Bytes,
    /// CC and BCC routing keys.
    extra_keys: Vec<Arc<str>>,
    /// Held by a transaction until commit: counted against the watermark.
    _held: Option<Reservation>,
}

/// An ack, nack or reject inside a transaction. The deliveries it names were taken
/// out of the unacked map when it arrived (an unknown tag fails right then, as in
/// RabbitMQ, not halfway through the commit); rollback puts them back.
enum TxOp {
    Ack(Vec<Unacked>),
    Nack(Vec<Unacked>, bool),
}

impl TxOp {
    fn into_deliveries(self) -> Vec<Unacked> {
        match self {
            TxOp::Ack(v) | TxOp::Nack(v, _) => v,
        }
    }
}

#[derive(Default)]
struct Tx {
    publishes: Vec<Publish>,
    acks: Vec<TxOp>,
}

pub struct Channel {
    pub shared: Arc<ChannelShared>,
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
}

impl Channel {
    pub fn new(
        (id, generation): (u16, u64),
        conn: Arc<ConnShared>,
        vhost: Arc<Vhost>,
        gauge: Arc<MemoryGauge>,
        (max_message_size, max_consumers): (u64, u32),
    ) -> Channel {
        Channel {
            shared: Arc::new(ChannelShared {
                id,
                generation,
                conn,
                open: AtomicBool::new(true),
                settled_persistent: AtomicBool::new(false),
                state: Mutex::new(DeliveryState::default()),
            }),
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
        }
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
        self.shared.open.store(false, Ordering::Release);
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

    /// Sends the confirms that became due while handling the last batch of frames.
    pub fn flush_confirms(&mut self) {
        let settled = self.shared.settled_persistent.swap(false, Ordering::AcqRel);
        let Some(tag) = self.confirm_due.take() else {
            // Acks of persistent messages join the next group commit; ask for one.
            if let (true, Some(store)) = (settled, &self.vhost.store) {
                store.sync(Box::new(|_| {}));
            }
            return;
        };
        // Confirms leave in order: once one waits for a flush, later ones wait behind it.
        let wait = self.vhost.store.is_some() && (self.sync_needed || self.syncs_pending > 0);
        if !wait {
            self.reply(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: tag,
                multiple: true,
            })));
            return;
        };
        self.sync_needed = false;
        self.confirm_after_sync(Synced::AckUpTo(tag));
    }

    /// Sends `confirm` once the store's next flush is done, after every confirm
    /// already waiting for one (the committer releases waiters in order).
    fn confirm_after_sync(&mut self, confirm: Synced) {
        let Some(store) = &self.vhost.store else {
            return;
        };
        self.syncs_pending += 1;
        let conn = self.shared.conn.clone();
        let (channel, generation) = (self.shared.id, self.shared.generation);
        store.sync(Box::new(move |result| {
            conn.event(ConnEvent::Synced {
                channel,
                generation,
                confirm,
                ok: result.is_ok(),
            })
        }));
    }

    /// A flush that a publisher confirm waited for has finished.
    pub fn synced(&mut self, confirm: Synced, ok: bool) {
        self.syncs_pending = self.syncs_pending.saturating_sub(1);
        if !self.shared.open.load(Ordering::Acquire) {
            return;
        }
        let class = match confirm {
            Synced::AckUpTo(upto) if ok => basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: upto,
                multiple: true,
            }),
            Synced::AckUpTo(upto) => basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: upto,
                multiple: true,
                requeue: false,
            }),
            Synced::Nack(tag) => basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: tag,
                multiple: false,
                requeue: false,
            }),
        };
        self.reply(AMQPClass::Basic(class));
    }

    pub fn consumer_gone(&mut self, tag: &str) {
        self.consumers.remove(tag);
    }

    /// Mid-publish, only content frames may arrive on this channel.
    pub fn check_not_mid_content(&self) -> AmqpResult<()> {
        match &self.incoming {
            None => Ok(()),
            Some(i) if i.header.is_none() => Err(AmqpError::unexpected_frame(
                "expected content header for class 60, got non content header frame instead".into(),
            )
            .with_method(60, 40)),
            Some(_) => Err(AmqpError::unexpected_frame(
                "expected content body, got non content body frame instead".into(),
            )
            .with_method(60, 40)),
        }
    }

    pub fn handle_header(
        &mut self,
        raw: Bytes,
        body_size: u64,
        properties: BasicProperties,
    ) -> AmqpResult<()> {
        let Some(inc) = self.incoming.as_mut().filter(|i| i.header.is_none()) else {
            return Err(AmqpError::unexpected_frame(
                "expected method frame, got non method frame instead".into(),
            ));
        };
        // RabbitMQ's command assembler: a header for another class, or with a
        // weight, is not the header basic.publish waits for.
        let class_id = raw.get(..2).map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
        if raw.get(2..4) != Some(&[0, 0][..]) {
            return Err(AmqpError::unexpected_frame(
                "expected content header for class 60, got non content header frame instead".into(),
            )
            .with_method(60, 40));
        }
        if class_id != 60 {
            return Err(AmqpError::unexpected_frame(format!(
                "expected content header for class 60, got one for class {class_id} instead"
            ))
            .with_method(60, 40));
        }
        if body_size > self.max_message_size {
            self.incoming = None;
            return Err(AmqpError::precondition_failed(format!(
                "message size {} is larger than configured max size {}",
                body_size, self.max_message_size
            ))
            .with_method(60, 40));
        }
        if body_size > 0 {
            inc.held
                .grow(&self.gauge, crate::model::message::header_cost(&raw));
        }
        inc.header = Some((raw, properties, body_size));
        if body_size == 0 {
            self.complete()?;
        }
        Ok(())
    }

    pub fn handle_body(&mut self, body: Bytes) -> AmqpResult<()> {
        let Some(inc) = self.incoming.as_mut() else {
            return Err(AmqpError::unexpected_frame(
                "expected method frame, got non method frame instead".into(),
            ));
        };
        if inc.header.is_none() {
            return Err(AmqpError::unexpected_frame(
                "expected content header for class 60, got non content header frame instead".into(),
            )
            .with_method(60, 40));
        }
        let expected = inc.header.as_ref().map(|h| h.2).unwrap_or(0);
        inc.received += body.len() as u64;
        if inc.received > expected {
            return Err(AmqpError::frame_error(format!(
                "body of {} bytes exceeds the {} announced in the content header",
                inc.received, expected
            )));
        }
        // A body complete with this frame becomes a Message, which counts itself.
        if inc.received < expected {
            inc.held.grow(&self.gauge, body.len());
        }
        inc.body.push(body);
        if inc.received == expected {
            self.complete()?;
        }
        Ok(())
    }

    fn complete(&mut self) -> AmqpResult<()> {
        let Some(inc) = self.incoming.take() else {
            return Ok(());
        };
        let Some((header, properties, _)) = inc.header else {
            return Ok(());
        };
        let body = inc.body.into_body(inc.received);
        let mut held = inc.held;
        if let Some(uid) = properties.user_id() {
            let user = self.shared.conn.user();
            if uid.as_str() != user {
                return Err(AmqpError::precondition_failed(format!(
                    "user_id property set to '{}' but authenticated user was '{user}'",
                    uid.as_str()
                ))
                .with_method(60, 40));
            }
        }
        let (header, properties) = if properties
            .reply_to()
            .as_ref()
            .is_some_and(|r| r.as_str() == REPLY_TO)
        {
            // Direct reply-to: the reply address becomes this channel's pseudo-queue.
            let Some(q) = &self.reply_queue else {
                return Err(AmqpError::precondition_failed(
                    "fast reply consumer does not exist".into(),
                )
                .with_method(60, 40));
            };
            let properties = properties.with_reply_to(short(&*q.name));
            (
                crate::model::message::encode_header(inc.received, &properties),
                properties,
            )
        } else {
            (header, properties)
        };
        // What RabbitMQ's make_message refuses: "invalid message: <reason>".
        let invalid = |why: String| {
            AmqpError::precondition_failed(format!("invalid message: {why}")).with_method(60, 40)
        };
        if let Some(mode) = properties.delivery_mode().filter(|m| !matches!(m, 1 | 2)) {
            return Err(invalid(format!("{{delivery_mode_unknown,{mode}}}")));
        }
        let extra_keys =
            crate::model::message::header_routes(properties.headers().as_ref(), &ROUTING_HEADERS)
                .map_err(invalid)?;
        // BCC only routes: RabbitMQ strips it before the message is kept or delivered.
        let stripped = properties
            .headers()
            .as_ref()
            .filter(|h| h.contains_key("BCC"))
            .map(|h| without(h, "BCC"));
        let (header, properties) = match stripped {
            Some(h) => {
                let properties = properties.with_headers(h);
                (
                    crate::model::message::encode_header(inc.received, &properties),
                    properties,
                )
            }
            None => (header, properties),
        };
        if let Err(bad) = valid_expiration(&properties) {
            return Err(
                AmqpError::precondition_failed(format!("invalid expiration {bad}"))
                    .with_method(60, 40),
            );
        }
        let mut p = Publish {
            exchange: inc.exchange,
            routing_key: inc.routing_key,
            mandatory: inc.mandatory,
            header,
            properties,
            body,
            extra_keys,
            _held: None,
        };
        if self.tx.is_some() {
            // As RabbitMQ: the exchange is checked at publish, not at commit.
            self.check_exchange(&p.exchange)
                .map_err(|e| e.with_method(60, 40))?;
        }
        if let Some(tx) = self.tx.as_mut() {
            let whole = p.body.len() + crate::model::message::header_cost(&p.header) + TX_OVERHEAD;
            held.at_least(&self.gauge, whole);
            p._held = Some(held);
            tx.publishes.push(p);
            return Ok(());
        }
        drop(held);
        self.route(p, false).map_err(|e| e.with_method(60, 40))
    }

    /// The errors a publish to `exchange` would get: 404 if missing, 403 if internal.
    fn check_exchange(&mut self, exchange: &str) -> AmqpResult<()> {
        if exchange.is_empty() {
            return Ok(());
        }
        match self.vhost.topology().internal(exchange) {
            None => Err(self.vhost.not_found_exchange(exchange)),
            Some(true) => Err(AmqpError::access_refused(format!(
                "cannot publish to internal {}",
                crate::error::exchange_name(exchange, &self.vhost.name)
            ))),
            Some(false) => Ok(()),
        }
    }

    /// Routes a publish. At a commit (`committed`), an exchange deleted since the
    /// publish was checked routes nowhere, as the message was already accepted.
    fn route(&mut self, p: Publish, committed: bool) -> AmqpResult<()> {
        let reply = p.exchange.is_empty() && p.routing_key.starts_with(REPLY_TO);
        let queues = if reply {
            self.vhost.reply_queue(&p.routing_key).into_iter().collect()
        } else {
            let mut keys: Vec<&str> = vec![&p.routing_key];
            keys.extend(p.extra_keys.iter().map(|k| &**k));
            let routed =
                self.vhost
                    .topology()
                    .route(&p.exchange, &keys, p.properties.headers().as_ref());
            match routed {
                Routed::NoExchange if committed => Vec::new(),
                Routed::NoExchange => return Err(self.vhost.not_found_exchange(&p.exchange)),
                Routed::Internal => {
                    return Err(AmqpError::access_refused(format!(
                        "cannot publish to internal {}",
                        crate::error::exchange_name(&p.exchange, &self.vhost.name)
                    )))
                }
                Routed::Queues(q) => q,
            }
        };
        if queues.is_empty() {
            if p.mandatory {
                let mut out = self.shared.conn.outbox.append();
                write_return(
                    out.buf(),
                    self.shared.id,
                    312,
                    "NO_ROUTE",
                    &p.exchange,
                    &p.routing_key,
                );
                out.content(
                    self.shared.id,
                    &p.header,
                    &p.body,
                    self.shared.conn.frame_max(),
                );
            }
        } else {
            let mut msg = Message::new(
                p.exchange,
                p.routing_key,
                p.header,
                p.properties,
                p.body,
                self.gauge.clone(),
            );
            msg.extra_keys = p.extra_keys;
            let msg = Arc::new(msg);
            let mut rejected = false;
            for q in &queues {
                match q.publish(msg.clone()) {
                    Enqueued::Rejected => rejected = true,
                    Enqueued::Persisted => self.sync_needed = true,
                    Enqueued::Accepted | Enqueued::Gone => {}
                }
                self.backlogged |= q.backlogged();
            }
            if rejected && self.confirm {
                // A nack cannot ride on a multiple=true ack: send what is due first,
                // and when those acks wait for a flush, the nack waits behind them.
                self.flush_confirms();
                self.publish_seq += 1;
                if self.syncs_pending > 0 {
                    self.confirm_after_sync(Synced::Nack(self.publish_seq));
                } else {
                    self.reply(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                        delivery_tag: self.publish_seq,
                        multiple: false,
                        requeue: false,
                    })));
                }
                return Ok(());
            }
        }
        if self.confirm {
            self.publish_seq += 1;
            self.confirm_due = Some(self.publish_seq);
        }
        Ok(())
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
            C::Basic(m) => self.basic_method(m)?,
            C::Confirm(confirm::AMQPMethod::Select(s)) => {
                if self.tx.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from tx to confirm mode".into(),
                    ));
                }
                self.confirm = true;
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

    fn exchange_method(&mut self, m: exchange::AMQPMethod) -> AmqpResult<After> {
        use exchange::AMQPMethod as M;
        let (change, nowait, ok) = match m {
            M::Declare(d) => (
                Change::DeclareExchange(ExchangeSpec {
                    name: d.exchange.to_string(),
                    kind: d.kind.to_string(),
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments,
                }),
                d.nowait,
                M::DeclareOk(exchange::DeclareOk {}),
            ),
            M::Delete(d) => (
                Change::DeleteExchange {
                    name: d.exchange.to_string(),
                    if_unused: d.if_unused,
                },
                d.nowait,
                M::DeleteOk(exchange::DeleteOk {}),
            ),
            M::Bind(b) => (
                Change::Bind(BindingSpec {
                    source: b.source.to_string(),
                    destination: Destination::Exchange(b.destination.as_str().into()),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                }),
                b.nowait,
                M::BindOk(exchange::BindOk {}),
            ),
            M::Unbind(b) => (
                Change::Unbind(BindingSpec {
                    source: b.source.to_string(),
                    destination: Destination::Exchange(b.destination.as_str().into()),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                }),
                b.nowait,
                M::UnbindOk(exchange::UnbindOk {}),
            ),
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "unexpected method {}",
                    class_name(&AMQPClass::Exchange(other))
                )))
            }
        };
        let applied = self.vhost.apply(change, self.actor())?;
        Ok(self.answer(applied.durable, nowait, AMQPClass::Exchange(ok), None))
    }

    fn queue_method(&mut self, m: queue::AMQPMethod) -> AmqpResult<After> {
        use queue::AMQPMethod as M;
        let (change, nowait) = match m {
            M::Declare(d) => {
                let name = if d.passive && d.queue.as_str().is_empty() {
                    self.resolve_queue("")?.to_string()
                } else {
                    d.queue.to_string()
                };
                // Direct reply-to names exist for passive declares, as in RabbitMQ.
                if d.passive
                    && (name == REPLY_TO
                        || (name.starts_with(REPLY_TO) && self.vhost.reply_queue(&name).is_some()))
                {
                    let ok = AMQPClass::Queue(M::DeclareOk(queue::DeclareOk {
                        queue: short(name.as_str()),
                        message_count: 0,
                        consumer_count: self.reply_queue.is_some() as u32,
                    }));
                    return Ok(self.answer(false, d.nowait, ok, None));
                }
                let change = Change::DeclareQueue(QueueSpec {
                    name,
                    passive: d.passive,
                    durable: d.durable,
                    exclusive: d.exclusive,
                    auto_delete: d.auto_delete,
                    arguments: d.arguments,
                });
                (change, d.nowait)
            }
            M::Bind(b) => {
                let q = self.resolve_queue(b.queue.as_str())?;
                let change = Change::Bind(BindingSpec {
                    source: b.exchange.to_string(),
                    destination: Destination::Queue(q),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                });
                (change, b.nowait)
            }
            M::Unbind(b) => {
                let q = self.resolve_queue(b.queue.as_str())?;
                let change = Change::Unbind(BindingSpec {
                    source: b.exchange.to_string(),
                    destination: Destination::Queue(q),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                });
                (change, false)
            }
            M::Purge(p) => {
                let queue = self.resolve_queue(p.queue.as_str())?.to_string();
                (Change::Purge { queue }, p.nowait)
            }
            M::Delete(d) => {
                let name = self.resolve_queue(d.queue.as_str())?.to_string();
                let change = Change::DeleteQueue {
                    name,
                    if_unused: d.if_unused,
                    if_empty: d.if_empty,
                };
                (change, d.nowait)
            }
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "unexpected method {}",
                    class_name(&AMQPClass::Queue(other))
                )))
            }
        };
        let is_bind = matches!(change, Change::Bind(_));
        let applied = self.vhost.apply(change, self.actor())?;
        let (reply, cancel) = match applied.outcome {
            Outcome::Queue {
                queue,
                messages,
                consumers,
            } => {
                self.last_queue = Some(queue.name.clone());
                let ok = M::DeclareOk(queue::DeclareOk {
                    queue: short(&*queue.name),
                    message_count: messages,
                    consumer_count: consumers,
                });
                (ok, None)
            }
            Outcome::QueueDeleted {
                messages,
                cancellations,
            } => (
                M::DeleteOk(queue::DeleteOk {
                    message_count: messages,
                }),
                Some(cancellations),
            ),
            Outcome::Purged { messages } => (
                M::PurgeOk(queue::PurgeOk {
                    message_count: messages,
                }),
                None,
            ),
            Outcome::Done if is_bind => (M::BindOk(queue::BindOk {}), None),
            Outcome::Done => (M::UnbindOk(queue::UnbindOk {}), None),
        };
        Ok(self.answer(applied.durable, nowait, AMQPClass::Queue(reply), cancel))
    }

    fn basic_method(&mut self, m: basic::AMQPMethod) -> AmqpResult<()> {
        use basic::AMQPMethod as M;
        match m {
            M::Publish(p) => {
                if p.immediate {
                    return Err(AmqpError::not_implemented("immediate=true".into()));
                }
                self.incoming = Some(Incoming {
                    exchange: p.exchange.as_str().into(),
                    routing_key: p.routing_key.as_str().into(),
                    mandatory: p.mandatory,
                    header: None,
                    body: BodyParts::default(),
                    received: 0,
                    held: Reservation::default(),
                });
            }
            M::Qos(q) => {
                if q.global {
                    self.shared.lock().prefetch = q.prefetch_count as u32;
                } else {
                    // As RabbitMQ does: a per-consumer qos also lifts the channel-wide limit.
                    self.shared.lock().prefetch = 0;
                    self.consumer_prefetch = q.prefetch_count as u32;
                }
                self.reply(AMQPClass::Basic(M::QosOk(basic::QosOk {})));
                self.kick_consumers();
            }
            M::Consume(c) => self.consume(c)?,
            M::Cancel(c) => {
                let tag = c.consumer_tag.as_str();
                if let Some((q, c)) = self.consumers.remove(tag) {
                    self.drop_consumer(&q, &c);
                }
                if !c.nowait {
                    self.reply(AMQPClass::Basic(M::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag,
                    })));
                }
            }
            M::Get(g) => {
                let name = self.resolve_queue(g.queue.as_str())?;
                let q = self.vhost.queue(&name, self.actor())?;
                match q.get() {
                    Some((m, remaining)) => self.shared.get_ok(&q, m, remaining, g.no_ack),
                    None => self.reply(AMQPClass::Basic(M::GetEmpty(basic::GetEmpty {}))),
                }
            }
            M::Ack(a) => {
                if let Some(tx) = self.tx.as_mut() {
                    let taken = self.shared.take(a.delivery_tag, a.multiple)?;
                    tx.acks.push(TxOp::Ack(taken));
                } else {
                    settle(self.shared.take(a.delivery_tag, a.multiple)?);
                    self.after_settle();
                }
            }
            M::Nack(n) => {
                if let Some(tx) = self.tx.as_mut() {
                    let taken = self.shared.take(n.delivery_tag, n.multiple)?;
                    tx.acks.push(TxOp::Nack(taken, n.requeue));
                } else {
                    self.nack(n.delivery_tag, n.multiple, n.requeue)?;
                    self.after_settle();
                }
            }
            M::Reject(r) => {
                if let Some(tx) = self.tx.as_mut() {
                    let taken = self.shared.take(r.delivery_tag, false)?;
                    tx.acks.push(TxOp::Nack(taken, r.requeue));
                } else {
                    self.nack(r.delivery_tag, false, r.requeue)?;
                    self.after_settle();
                }
            }
            M::Recover(r) => {
                if !r.requeue {
                    return Err(AmqpError::not_implemented("requeue=false".into()));
                }
                requeue(self.shared.take_all());
                self.reply(AMQPClass::Basic(M::RecoverOk(basic::RecoverOk {})));
            }
            M::RecoverAsync(r) => {
                if !r.requeue {
                    return Err(AmqpError::not_implemented("requeue=false".into()));
                }
                requeue(self.shared.take_all());
            }
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "unexpected method {}",
                    class_name(&AMQPClass::Basic(other))
                )))
            }
        }
        Ok(())
    }

    fn nack(&self, tag: u64, multiple: bool, requeue_it: bool) -> AmqpResult<()> {
        nack_taken(self.shared.take(tag, multiple)?, requeue_it);
        Ok(())
    }

    fn consume(&mut self, c: basic::Consume) -> AmqpResult<()> {
        if self.max_consumers != 0 && self.consumers.len() >= self.max_consumers as usize {
            // RabbitMQ's consumer_max_per_channel answer (a connection error).
            return Err(AmqpError::not_allowed(format!(
                "reached maximum ({}) of consumers per channel",
                self.max_consumers
            )));
        }
        let name = self.resolve_queue(c.queue.as_str())?;
        let q = if &*name == REPLY_TO {
            if !c.no_ack {
                return Err(AmqpError::precondition_failed(
                    "reply consumer cannot acknowledge".into(),
                ));
            }
            if self.reply_queue.is_some() {
                return Err(AmqpError::precondition_failed(
                    "reply consumer already set".into(),
                ));
            }
            let q = self.vhost.new_reply_queue();
            self.reply_queue = Some(q.clone());
            q
        } else {
            self.vhost.queue(&name, self.actor())?
        };
        let tag: Arc<str> = if c.consumer_tag.as_str().is_empty() {
            generated_tag().into()
        } else {
            c.consumer_tag.as_str().into()
        };
        if self.consumers.contains_key(&tag) {
            return Err(AmqpError::not_allowed(format!(
                "attempt to reuse consumer tag '{tag}'"
            )));
        }
        let consumer = Arc::new(Consumer {
            tag: tag.clone(),
            channel: self.shared.clone() as Arc<dyn Deliver>,
            no_ack: c.no_ack,
            exclusive: c.exclusive,
            prefetch: self.consumer_prefetch,
            unacked: Default::default(),
            priority: c
                .arguments
                .inner()
                .get("x-priority")
                .and_then(int_value)
                .map(|p| p.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
                .unwrap_or(0),
        });
        let nowait = c.nowait;
        let shared = self.shared.clone();
        let ok_tag = tag.clone();
        let added = q.add_consumer(consumer.clone(), move || {
            if !nowait {
                shared.send(&AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(
                    basic::ConsumeOk {
                        consumer_tag: short(&*ok_tag),
                    },
                )));
            }
        });
        match added {
            Ok(()) => {
                self.consumers.insert(tag, (q, consumer));
                Ok(())
            }
            Err(ConsumeRefused::ExclusiveInUse) => Err(AmqpError::access_refused(format!(
                "{} in exclusive use",
                queue_name(&name, &self.vhost.name)
            ))),
            Err(ConsumeRefused::Deleted) => Err(self.vhost.not_found_queue(&name)),
        }
    }

    fn tx_method(&mut self, m: tx::AMQPMethod) -> AmqpResult<After> {
        use tx::AMQPMethod as M;
        match m {
            M::Select(_) => {
                if self.confirm {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from confirm to tx mode".into(),
                    ));
                }
                if self.tx.is_none() {
                    self.tx = Some(Tx::default());
                }
                self.reply(AMQPClass::Tx(M::SelectOk(tx::SelectOk {})));
            }
            M::Commit(_) => {
                let Some(tx) = self.tx.replace(Tx::default()) else {
                    return Err(AmqpError::precondition_failed(
                        "channel is not transactional".into(),
                    ));
                };
                self.sync_needed = false;
                // Every publish was checked when it arrived: routing cannot fail now.
                for p in tx.publishes {
                    self.route(p, true)?;
                }
                // Acks and persistent publishes are on disk before commit-ok.
                let durable = self.sync_needed || !tx.acks.is_empty();
                self.sync_needed = false;
                for op in tx.acks {
                    match op {
                        TxOp::Ack(taken) => settle(taken),
                        TxOp::Nack(taken, rq) => nack_taken(taken, rq),
                    }
                }
                self.after_settle();
                return Ok(self.answer(
                    durable,
                    false,
                    AMQPClass::Tx(M::CommitOk(tx::CommitOk {})),
                    None,
                ));
            }
            M::Rollback(_) => {
                let Some(tx) = self.tx.replace(Tx::default()) else {
                    return Err(AmqpError::precondition_failed(
                        "channel is not transactional".into(),
                    ));
                };
                // Discarded acks leave their deliveries unacked, as before them.
                let mut st = self.shared.lock();
                for u in tx.acks.into_iter().flat_map(TxOp::into_deliveries) {
                    st.unacked.insert(u.tag, u);
                }
                drop(st);
                self.reply(AMQPClass::Tx(M::RollbackOk(tx::RollbackOk {})));
            }
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "unexpected method {}",
                    class_name(&AMQPClass::Tx(other))
                )))
            }
        }
        Ok(After::Nothing)
    }
}

/// RabbitMQ's `amq.ctag-` tags for consumers that did not name themselves.
fn generated_tag() -> String {
    use std::hash::BuildHasher;
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let h = std::collections::hash_map::RandomState::new().hash_one(n);
    format!("amq.ctag-{h:016x}{n:06x}")
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
