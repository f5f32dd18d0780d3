//! basic.publish: the method, its content header and body frames assembled into a
//! message, routed through the topology to queues; and publisher confirms, sent
//! at once or after the store's next sync when a persistent message went to disk.

use crate::session::shared::MessageCounts;
use std::sync::Arc;

use amq_protocol::protocol::{basic, AMQPClass, BasicProperties};
use bytes::{Bytes, BytesMut};

use super::Channel;
use crate::error::{AmqpError, AmqpResult};
use crate::model::message::{
    encode_header, header_cost, header_routes, valid_expiration, without, Message, Reservation,
    ROUTING_HEADERS,
};
use crate::model::queue::Enqueued;
use crate::model::topology::{Delays, Routed};
use crate::model::vhost::REPLY_TO;
use crate::protocol::{short, write_return};
use crate::session::shared::{ConnEvent, Synced};

/// A publish whose content is still arriving.
pub(super) struct Incoming {
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
pub(super) struct BodyParts {
    parts: Vec<Bytes>,
    tail: BytesMut,
}

/// Frames at least this large are kept as they are.
pub(super) const KEEP_FRAME: usize = 4096;

impl BodyParts {
    pub(super) fn push(&mut self, frame: Bytes) {
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

    pub(super) fn into_body(mut self, len: u64) -> Bytes {
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
pub(super) const TX_OVERHEAD: usize = std::mem::size_of::<Publish>() + 64;

/// A publish with all its content, ready to route.
pub(super) struct Publish {
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

impl Channel {
    /// basic.publish: its content header and body follow on this channel.
    pub(super) fn publish(&mut self, p: basic::Publish) -> AmqpResult<()> {
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
        Ok(())
    }

    /// Sends the confirms that became due while handling the last batch of frames.
    pub fn flush_confirms(&mut self) {
        let settled = self.shared.take_settled_persistent();
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
            self.count_confirmed(tag);
            let multiple = self.settle(tag);
            self.reply(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: tag,
                multiple,
            })));
            return;
        };
        self.sync_needed = false;
        self.confirm_after_sync(Synced::AckUpTo(tag));
    }

    /// Records that publishes up to `tag` are answered; whether the answer must
    /// say multiple (it covers more than the one publish after the last answer).
    fn settle(&mut self, tag: u64) -> bool {
        let multiple = tag > self.settled_upto.saturating_add(1);
        self.settled_upto = self.settled_upto.max(tag);
        multiple
    }

    /// Counts the publishes a basic.ack up to `tag` confirms.
    fn count_confirmed(&mut self, tag: u64) {
        if tag > self.confirmed_upto {
            MessageCounts::bump(&self.shared.counts.confirmed, tag - self.confirmed_upto);
            self.confirmed_upto = tag;
        }
    }

    /// Sends `confirm` once the store's next flush is done, after every confirm
    /// already waiting for one (the committer releases waiters in order).
    pub(super) fn confirm_after_sync(&mut self, confirm: Synced) {
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
        if !self.shared.is_open() {
            return;
        }
        // A confirm's nack says requeue=true, as RabbitMQ's (the field's default
        // there; it means nothing to a publisher).
        let class = match confirm {
            Synced::AckUpTo(upto) if ok => {
                self.count_confirmed(upto);
                basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: upto,
                    multiple: self.settle(upto),
                })
            }
            Synced::AckUpTo(upto) => basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: upto,
                multiple: self.settle(upto),
                requeue: true,
            }),
            Synced::Nack(tag) => {
                self.settle(tag);
                basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: tag,
                    multiple: false,
                    requeue: true,
                })
            }
        };
        self.reply(AMQPClass::Basic(class));
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
            inc.held.grow(&self.gauge, header_cost(&raw));
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

    pub(super) fn complete(&mut self) -> AmqpResult<()> {
        let Some(inc) = self.incoming.take() else {
            return Ok(());
        };
        let Some((header, properties, _)) = inc.header else {
            return Ok(());
        };
        let body = inc.body.into_body(inc.received);
        let mut held = inc.held;
        // As RabbitMQ: write permission on the exchange comes first.
        self.permit(crate::auth::Access::Write, "exchange", &inc.exchange)
            .map_err(|e| e.with_method(60, 40))?;
        self.permit_topic(crate::auth::Access::Write, &inc.exchange, &inc.routing_key)
            .map_err(|e| e.with_method(60, 40))?;
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
            (encode_header(inc.received, &properties), properties)
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
            header_routes(properties.headers().as_ref(), &ROUTING_HEADERS).map_err(invalid)?;
        // BCC only routes: RabbitMQ strips it before the message is kept or delivered.
        let stripped = properties
            .headers()
            .as_ref()
            .filter(|h| h.contains_key("BCC"))
            .map(|h| without(h, "BCC"));
        let (header, properties) = match stripped {
            Some(h) => {
                // On the wire bytes: the other headers stay in the publisher's order.
                let raw = crate::protocol::ordered::without_header(&header, "BCC");
                let properties = properties.with_headers(h);
                let header = raw.unwrap_or_else(|| encode_header(inc.received, &properties));
                (header, properties)
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
            let whole = p.body.len() + header_cost(&p.header) + TX_OVERHEAD;
            held.at_least(&self.gauge, whole);
            p._held = Some(held);
            tx.publishes.push(p);
            return Ok(());
        }
        drop(held);
        self.route(p, false).map_err(|e| e.with_method(60, 40))
    }

    /// The errors a publish to `exchange` would get: 404 if missing, 403 if internal.
    pub(super) fn check_exchange(&mut self, exchange: &str) -> AmqpResult<()> {
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
    pub(super) fn route(&mut self, p: Publish, committed: bool) -> AmqpResult<()> {
        let reply = p.exchange.is_empty() && p.routing_key.starts_with(REPLY_TO);
        let (queues, delays) = if reply {
            let q = self.vhost.reply_queue(&p.routing_key).into_iter().collect();
            (q, Delays::default())
        } else {
            let mut keys: Vec<&str> = vec![&p.routing_key];
            keys.extend(p.extra_keys.iter().map(|k| &**k));
            let routed =
                self.vhost
                    .topology()
                    .route(&p.exchange, &keys, p.properties.headers().as_ref());
            match routed {
                Routed::NoExchange if committed => (Vec::new(), Delays::default()),
                Routed::NoExchange => return Err(self.vhost.not_found_exchange(&p.exchange)),
                Routed::Internal => {
                    return Err(AmqpError::access_refused(format!(
                        "cannot publish to internal {}",
                        crate::error::exchange_name(&p.exchange, &self.vhost.name)
                    )))
                }
                Routed::Queues(q, d) => (q, d),
            }
        };
        let counts = &self.shared.counts;
        MessageCounts::bump(&counts.received, 1);
        counts.sized(p.body.len());
        if self.confirm {
            MessageCounts::bump(&counts.received_confirm, 1);
        }
        // A message held by a delayed exchange counts as routed: whether it reaches
        // a queue is known only later (RabbitMQ's plugin returns it as unroutable
        // at once, and then delivers it all the same).
        if queues.is_empty() && delays.is_empty() {
            MessageCounts::bump(
                if p.mandatory {
                    &counts.unroutable_returned
                } else {
                    &counts.unroutable_dropped
                },
                1,
            );
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
            MessageCounts::bump(&counts.routed, 1);
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
            if !delays.is_empty() && self.vhost.delay(&delays, &msg) {
                self.sync_needed = true;
            }
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
                    self.settle(self.publish_seq);
                    self.reply(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                        delivery_tag: self.publish_seq,
                        multiple: false,
                        requeue: true,
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
}
