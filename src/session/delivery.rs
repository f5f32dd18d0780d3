//! A channel's deliveries: the delivery-tag counter, the unacked messages and the
//! channel-wide prefetch, behind a small per-channel mutex that queues take (after
//! their own) when they deliver, so tags reach the wire in order. This is the
//! session layer's side of the model's `Deliver` trait; settling (ack, nack,
//! reject, requeue) goes back to the queues from here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use amq_protocol::protocol::{basic, AMQPClass};

use super::shared::MessageCounts;
use super::shared::{ConnEvent, ConnShared};
use crate::error::{AmqpError, AmqpResult};
use crate::model::queue::{Consumer, Deliver, Queue, QueuedMessage};
use crate::protocol::{short, write_get_ok, write_method};

/// A delivery awaiting ack.
pub(super) struct Unacked {
    pub(super) tag: u64,
    queue: Arc<Queue>,
    msg: QueuedMessage,
    consumer: Option<Arc<Consumer>>,
    /// When it was delivered (`coarse_ms`), for the consumer timeout.
    at: u64,
}

#[derive(Default)]
pub(super) struct DeliveryState {
    next_tag: u64,
    pub(super) unacked: BTreeMap<u64, Unacked>,
    /// basic.qos global=true: unacked deliveries allowed on the whole channel; 0 is unlimited.
    pub(super) prefetch: u32,
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
    /// What listings show of the channel's settings.
    pub listing: ChannelListing,
    /// Its message counts, for metrics, and their last rates.
    pub counts: crate::session::shared::MessageCounts,
    pub rates: crate::model::stats::Rates<11>,
}

/// A channel's settings as the management API lists them.
#[derive(Default)]
pub struct ChannelListing {
    pub confirm: AtomicBool,
    pub transactional: AtomicBool,
    /// basic.qos global=false: each new consumer's prefetch.
    pub prefetch: std::sync::atomic::AtomicU32,
}

/// A channel's unacknowledged deliveries, for listings.
pub struct UnackedSummary {
    /// Per queue: the queue, how many, and their body bytes.
    pub per_queue: Vec<(Arc<Queue>, u64, u64)>,
    /// basic.qos global=true.
    pub global_prefetch: u32,
}

impl ChannelShared {
    /// When its oldest unacknowledged delivery was made (`coarse_ms`) and its
    /// queue's own acknowledgement timeout, if any: delivery tags only grow, so
    /// it is the first in the map. As RabbitMQ 3.12, only the oldest is checked.
    pub fn oldest_unacked(&self) -> Option<(u64, Option<u64>)> {
        self.lock()
            .unacked
            .values()
            .next()
            .map(|u| (u.at, u.queue.args().consumer_timeout))
    }

    /// Its unacknowledged deliveries by queue (a snapshot under the channel's lock).
    pub fn unacked_summary(&self) -> UnackedSummary {
        let st = self.lock();
        let mut per_queue: Vec<(Arc<Queue>, u64, u64)> = Vec::new();
        for u in st.unacked.values() {
            let bytes = u.msg.msg.body.len() as u64;
            match per_queue
                .iter_mut()
                .find(|(q, _, _)| Arc::ptr_eq(q, &u.queue))
            {
                Some(e) => {
                    e.1 += 1;
                    e.2 += bytes;
                }
                None => per_queue.push((u.queue.clone(), 1, bytes)),
            }
        }
        UnackedSummary {
            per_queue,
            global_prefetch: st.prefetch,
        }
    }

    pub fn new(id: u16, generation: u64, conn: Arc<ConnShared>) -> ChannelShared {
        ChannelShared {
            id,
            generation,
            conn,
            open: AtomicBool::new(true),
            settled_persistent: AtomicBool::new(false),
            state: Mutex::new(DeliveryState::default()),
            listing: ChannelListing::default(),
            counts: Default::default(),
            rates: Default::default(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, DeliveryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// The channel is closing: queues stop delivering to it.
    /// Its counts pass to its connection's, which metrics keep reading.
    pub fn close(&self) {
        if self.open.swap(false, Ordering::AcqRel) {
            self.counts.add_to(&self.conn.closed_channels);
            MessageCounts::bump(&self.conn.channels_closed, 1);
        }
    }

    /// Whether a persisted message was settled since the last call.
    pub fn take_settled_persistent(&self) -> bool {
        self.settled_persistent.swap(false, Ordering::AcqRel)
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
        // Direct reply-to deliveries bypass RabbitMQ's delivery-tag counter: each
        // carries the next tag without taking it (they are never acked).
        let tag = if queue.name.starts_with(crate::model::vhost::REPLY_TO) {
            st.next_tag + 1
        } else {
            st.next_tag += 1;
            st.next_tag
        };
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
        let c = &self.counts;
        MessageCounts::bump(
            if consumer.no_ack {
                &c.delivered_consume_auto_ack
            } else {
                &c.delivered_consume_manual_ack
            },
            1,
        );
        if m.redelivered {
            MessageCounts::bump(&c.redelivered, 1);
        }
        if !consumer.no_ack {
            consumer.unacked.fetch_add(1, Ordering::AcqRel);
            st.unacked.insert(
                tag,
                Unacked {
                    tag,
                    queue: queue.clone(),
                    msg: m,
                    consumer: Some(consumer.clone()),
                    at: crate::model::queue::coarse_ms(),
                },
            );
        } else {
            queue.forget(&m);
        }
        Ok(())
    }

    fn owner(&self) -> (u64, u16) {
        (self.conn.id, self.id)
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
    pub(super) fn get_ok(
        &self,
        queue: &Arc<Queue>,
        m: QueuedMessage,
        remaining: u32,
        no_ack: bool,
    ) {
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
        self.counts.fetched(no_ack, m.redelivered);
        if !no_ack {
            st.unacked.insert(
                tag,
                Unacked {
                    tag,
                    queue: queue.clone(),
                    msg: m,
                    consumer: None,
                    at: crate::model::queue::coarse_ms(),
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
    pub(super) fn take(&self, tag: u64, multiple: bool) -> AmqpResult<Vec<Unacked>> {
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

    pub(super) fn take_all(&self) -> Vec<Unacked> {
        std::mem::take(&mut self.lock().unacked)
            .into_values()
            .collect()
    }
}

fn unknown_tag(tag: u64) -> AmqpError {
    AmqpError::precondition_failed(format!("unknown delivery tag {tag}"))
}

/// Gives credit back for settled deliveries, forgets them, and kicks each queue once.
pub(super) fn settle(done: Vec<Unacked>) {
    for u in &done {
        u.queue.forget(&u.msg);
    }
    release_counted(done, true);
}

/// Gives credit back for deliveries that were dealt with, and kicks each queue once.
pub(super) fn release(done: Vec<Unacked>) {
    release_counted(done, false);
}

/// As `release`; with `acked`, each queue also counts its deliveries acked.
fn release_counted(done: Vec<Unacked>, acked: bool) {
    let mut queues: Vec<(Arc<Queue>, u64)> = Vec::new();
    for u in &done {
        if let Some(c) = &u.consumer {
            c.release_credit();
        }
        match queues.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
            Some((_, n)) => *n += 1,
            None => queues.push((u.queue.clone(), 1)),
        }
    }
    drop(done);
    for (q, n) in queues {
        q.kick_acked(if acked { n } else { 0 });
    }
}

/// Requeues deliveries, or rejects them (dead-lettering where the queue says so).
pub(super) fn nack_taken(taken: Vec<Unacked>, requeue_it: bool) {
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
pub(super) fn requeue(done: Vec<Unacked>) {
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
