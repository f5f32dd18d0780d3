//! A queue: its ready messages in order and its consumers. All of a queue's state
//! sits behind its own mutex, so publishers and acks on different queues never
//! contend, and nothing awaits while holding it. Delivery happens right where a
//! message or credit arrives (publish, ack, new consumer, drained socket): the
//! queue picks the next consumer round-robin that has prefetch room and whose
//! connection can take more, and writes the frames into that connection's outbox.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use amq_protocol::types::FieldTable;

use crate::channel::ChannelShared;
use crate::message::Message;

#[derive(Clone)]
pub struct QueuedMessage {
    pub msg: Arc<Message>,
    /// Position in the queue: requeued messages go back to where they were.
    pub seq: u64,
    pub redelivered: bool,
}

pub struct Consumer {
    pub tag: Arc<str>,
    pub channel: Arc<ChannelShared>,
    pub no_ack: bool,
    pub exclusive: bool,
    /// Per-consumer prefetch (basic.qos global=false) in force when it started; 0 is unlimited.
    pub prefetch: u32,
    pub unacked: AtomicU32,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        self.channel.can_deliver()
            && (self.no_ack
                || self.prefetch == 0
                || self.unacked.load(Ordering::Acquire) < self.prefetch)
    }
}

pub struct Queue {
    pub name: Arc<str>,
    pub durable: bool,
    pub auto_delete: bool,
    /// Connection id of the owner of an exclusive queue.
    pub exclusive_owner: Option<u64>,
    pub arguments: FieldTable,
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<QueuedMessage>,
    next_seq: u64,
    consumers: Vec<Arc<Consumer>>,
    next_consumer: usize,
    had_consumer: bool,
    deleted: bool,
}

/// Why a consumer could not be added.
pub enum ConsumeRefused {
    ExclusiveInUse,
    Deleted,
}

impl Queue {
    pub fn new(
        name: Arc<str>,
        durable: bool,
        auto_delete: bool,
        exclusive_owner: Option<u64>,
        arguments: FieldTable,
    ) -> Queue {
        Queue {
            name,
            durable,
            auto_delete,
            exclusive_owner,
            arguments,
            state: Mutex::new(QueueState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a routed message and delivers what can be delivered. False if the queue is gone.
    pub fn publish(self: &Arc<Self>, msg: Arc<Message>) -> bool {
        let mut st = self.lock();
        if st.deleted {
            return false;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.ready.push_back(QueuedMessage {
            msg,
            seq,
            redelivered: false,
        });
        self.drain(&mut st);
        true
    }

    /// Puts messages back at their original positions, marked redelivered.
    pub fn requeue(self: &Arc<Self>, mut msgs: Vec<QueuedMessage>) {
        let mut st = self.lock();
        if st.deleted {
            return;
        }
        msgs.sort_by_key(|m| m.seq);
        for mut m in msgs.into_iter().rev() {
            m.redelivered = true;
            let pos = st.ready.partition_point(|r| r.seq < m.seq);
            st.ready.insert(pos, m);
        }
        self.drain(&mut st);
    }

    /// A consumer settled a delivery: give it credit and deliver more.
    pub fn settled(self: &Arc<Self>, consumer: Option<&Arc<Consumer>>) {
        if let Some(c) = consumer {
            let _ = c
                .unacked
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
        self.kick();
    }

    /// Tries to deliver again (after an ack, a qos change, a flow change or a drained socket).
    pub fn kick(self: &Arc<Self>) {
        let mut st = self.lock();
        if !st.ready.is_empty() && !st.consumers.is_empty() {
            self.drain(&mut st);
        }
    }

    fn drain(self: &Arc<Self>, st: &mut QueueState) {
        while !st.ready.is_empty() && !st.consumers.is_empty() {
            let n = st.consumers.len();
            let mut delivered = false;
            for i in 0..n {
                let idx = (st.next_consumer + i) % n;
                let consumer = st.consumers[idx].clone();
                if !consumer.has_credit() {
                    continue;
                }
                let Some(m) = st.ready.pop_front() else {
                    return;
                };
                let remaining = st.ready.len() as u32;
                match consumer.channel.deliver(self, &consumer, m, remaining) {
                    Ok(()) => {
                        st.next_consumer = (idx + 1) % n;
                        delivered = true;
                        break;
                    }
                    Err(m) => st.ready.push_front(m),
                }
            }
            if !delivered {
                return;
            }
        }
    }

    /// basic.get: the next ready message, if any, with the count left behind it.
    pub fn get(&self) -> Option<(QueuedMessage, u32)> {
        let mut st = self.lock();
        let m = st.ready.pop_front()?;
        Some((m, st.ready.len() as u32))
    }

    /// Adds a consumer; `on_added` runs before the first delivery (it sends consume-ok).
    pub fn add_consumer(
        self: &Arc<Self>,
        consumer: Arc<Consumer>,
        on_added: impl FnOnce(),
    ) -> Result<(), ConsumeRefused> {
        let mut st = self.lock();
        if st.deleted {
            return Err(ConsumeRefused::Deleted);
        }
        if st.consumers.iter().any(|c| c.exclusive)
            || (consumer.exclusive && !st.consumers.is_empty())
        {
            return Err(ConsumeRefused::ExclusiveInUse);
        }
        on_added();
        st.consumers.push(consumer);
        st.had_consumer = true;
        self.drain(&mut st);
        Ok(())
    }

    /// Removes a consumer; true when an auto-delete queue has just lost its last one.
    pub fn remove_consumer(&self, channel: &Arc<ChannelShared>, tag: &str) -> bool {
        let mut st = self.lock();
        st.consumers
            .retain(|c| !(Arc::ptr_eq(&c.channel, channel) && &*c.tag == tag));
        if st.next_consumer >= st.consumers.len() {
            st.next_consumer = 0;
        }
        self.auto_delete && st.had_consumer && st.consumers.is_empty() && !st.deleted
    }

    pub fn message_count(&self) -> u32 {
        self.lock().ready.len() as u32
    }

    pub fn consumer_count(&self) -> u32 {
        self.lock().consumers.len() as u32
    }

    pub fn counts(&self) -> (u32, u32) {
        let st = self.lock();
        (st.ready.len() as u32, st.consumers.len() as u32)
    }

    /// Drops the ready messages; unacked ones are untouched, as in RabbitMQ.
    pub fn purge(&self) -> u32 {
        let mut st = self.lock();
        let n = st.ready.len() as u32;
        st.ready.clear();
        n
    }

    /// Marks the queue deleted; returns its ready count and its consumers, to be told.
    pub fn delete(&self) -> (u32, Vec<Arc<Consumer>>) {
        let mut st = self.lock();
        st.deleted = true;
        let n = st.ready.len() as u32;
        st.ready.clear();
        (n, std::mem::take(&mut st.consumers))
    }

    pub fn is_deleted(&self) -> bool {
        self.lock().deleted
    }
}
