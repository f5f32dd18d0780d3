//! Start-up: a vhost's durable exchanges, queues, bindings and messages read back
//! from the store into its topology, before any client connects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::exchange::{self, Destination, Exchange, ExchangeDef};
use super::message::{ttl_of, MemoryGauge, Message};
use super::queue::{Queue, QueueArgs, Restored};
use super::vhost::Vhost;
use crate::store::{
    wall_ms, StoreError, StoredBinding, StoredDestination, StoredExchange, StoredQueue,
};

/// How far start-up has read, over every vhost: logged every two seconds, so an
/// operator waiting on a large backlog sees it move (listeners open only after).
pub struct Progress {
    last: Instant,
    queues_total: usize,
    queues: usize,
    messages: usize,
    started: Instant,
}

const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Bodies read back at start-up, at most, for all of a vhost's queues together
/// (and each within its own budget): enough for the first deliveries; the rest
/// of a backlog is read as consumers reach it, so a restart's memory grows
/// neither with the budget nor with the number of queues (1,000 queues sharing
/// a fanout's bodies each read their own copy: 1.7 GB for 1M entries).
const RECOVERED_HEAD: usize = 8 << 20;

/// Messages handed to a queue at a time: a queue keeps a long backlog encoded
/// (a few bytes a message), so start-up never holds it all as it was read.
const RESTORE_BATCH: usize = 4096;

impl Progress {
    pub fn new(queues_total: usize) -> Progress {
        let now = Instant::now();
        Progress {
            last: now,
            queues_total,
            queues: 0,
            messages: 0,
            started: now,
        }
    }

    fn message(&mut self) {
        self.messages += 1;
        // The clock only every few thousand messages: reading it costs more than a count.
        if self.messages.is_multiple_of(4096) {
            self.maybe_log();
        }
    }

    fn queue_done(&mut self) {
        self.queues += 1;
        self.maybe_log();
    }

    fn maybe_log(&mut self) {
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            tracing::info!(
                "recovering: {} of {} durable queues, {} messages read in {:.1}s",
                self.queues,
                self.queues_total,
                self.messages,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

impl Vhost {
    /// A delayed exchange's waiting messages, back in due order; those whose
    /// time passed while the broker was down are released as soon as it serves.
    fn restore_delayed(
        &self,
        exchange: &Arc<str>,
        id: u64,
        gauge: &Arc<MemoryGauge>,
    ) -> Result<(), StoreError> {
        let Some(store) = self.store.clone() else {
            return Ok(());
        };
        let mut n = 0usize;
        for m in store.messages(id) {
            let m = match m? {
                Ok(m) => m,
                Err(bad) => {
                    tracing::error!(vhost = %self.name, %exchange, seq = ?bad.seq,
                        "skipping an unreadable delayed message: {}; its record stays on disk", bad.why);
                    continue;
                }
            };
            let (seq, stored_at) = (m.seq, m.stored_at);
            let msg = match Message::from_stored(m, gauge) {
                Ok(msg) => msg,
                Err(why) => {
                    tracing::error!(vhost = %self.name, %exchange, seq,
                        "skipping an unreadable delayed message: {why}; its record stays on disk");
                    continue;
                }
            };
            let delay = exchange::delayed::delay_of(msg.properties.headers().as_ref()).unwrap_or(0);
            self.delayed.restore(
                exchange,
                (store.clone(), id, seq),
                stored_at,
                delay,
                Arc::new(msg),
            );
            n += 1;
        }
        if n > 0 {
            tracing::info!(vhost = %self.name, %exchange, "{n} delayed messages recovered");
        }
        Ok(())
    }
}

/// What [`Vhost::recover`] brought back.
#[derive(Default)]
pub struct Recovered {
    pub queues: usize,
    pub messages: usize,
    /// Message records that could not be read and were left out.
    pub skipped: usize,
}

impl Vhost {
    /// Rebuilds this vhost's durable entities and messages from the store.
    pub fn recover(
        &self,
        exchanges: &[StoredExchange],
        queues: &[StoredQueue],
        bindings: &[StoredBinding],
        gauge: &Arc<MemoryGauge>,
        progress: &mut Progress,
    ) -> Result<Recovered, StoreError> {
        let Some(store) = self.store.clone() else {
            return Ok(Recovered::default());
        };
        let mine = |v: &str| v == &*self.name;
        let mut t = (**self.topology()).clone();
        for x in exchanges.iter().filter(|x| mine(&x.vhost)) {
            let kind = exchange::by_code(x.kind).ok_or_else(|| StoreError::Corrupt {
                dir: store.dir().to_path_buf(),
                key: format!("exchange '{}'", x.name),
                why: format!("unknown exchange type code {}", x.kind),
            })?;
            let mut def = ExchangeDef::new(
                &x.name,
                kind,
                (true, x.auto_delete, x.internal),
                x.arguments.clone(),
            );
            def.messages_id = x.messages_id.filter(|_| def.is_delayed());
            if let Some(id) = def.messages_id {
                self.restore_delayed(&def.name, id, gauge)?;
            }
            t.exchanges
                .insert(x.name.as_str().into(), Arc::new(Exchange::new(def)));
        }
        let (mut nq, mut nm, mut skipped) = (0, 0, 0);
        let resident_total = std::cell::Cell::new(0usize);
        for sq in queues.iter().filter(|q| mine(&q.vhost)) {
            let args = QueueArgs::parse(&sq.arguments, &sq.name, &self.name).map_err(|e| {
                StoreError::Corrupt {
                    dir: store.dir().to_path_buf(),
                    key: format!("queue '{}'", sq.name),
                    why: e.text,
                }
            })?;
            let q = Queue::new(
                sq.name.as_str().into(),
                true,
                sq.auto_delete,
                None,
                sq.arguments.clone(),
                args,
                self.housekeeping.clone(),
                Some((store.clone(), sq.id)),
                (self.queue_memory_budget, self.gauge.clone()),
            );
            let mut msgs = Vec::new();
            // Bodies held in memory so far: the head of a backlog is loaded within
            // the queue's budget, the rest left on disk unread.
            let resident = std::cell::Cell::new(0usize);
            let now_wall = wall_ms();
            // One unreadable record costs that message, not the broker: it is logged,
            // counted and left on disk for inspection; a failing scan stays fatal.
            let mut unreadable = |seq: Option<u64>, why: &str| {
                tracing::error!(
                    vhost = %self.name,
                    queue = %sq.name,
                    seq = ?seq,
                    "skipping an unreadable stored message: {why}; its record stays on disk"
                );
                skipped += 1;
            };
            let load = Box::new(|size: usize| {
                resident_total.get() + size <= RECOVERED_HEAD
                    && q.has_budget_for(resident.get(), size)
            });
            for e in store.entries(sq.id, load) {
                let e = match e? {
                    Ok(e) => e,
                    Err(bad) => {
                        unreadable(bad.seq, &bad.why);
                        continue;
                    }
                };
                progress.message();
                let (seq, stored_at) = (e.seq, e.stored_at);
                let (msg, priority, ttl, size) = match (e.message, e.meta) {
                    // Only the entry was read: what it keeps orders and expires it.
                    (None, Some(meta)) => (None, meta.priority, meta.ttl, meta.size),
                    (Some(m), meta) => {
                        let size = m.body.len();
                        if meta.is_some() || q.has_budget_for(resident.get(), size) {
                            let msg = match Message::from_stored(m, gauge) {
                                Ok(msg) => msg,
                                Err(why) => {
                                    unreadable(Some(seq), &why);
                                    continue;
                                }
                            };
                            resident.set(resident.get() + size);
                            resident_total.set(resident_total.get() + size);
                            let (priority, ttl) = (msg.properties.priority().unwrap_or(0), msg.ttl);
                            (Some(Arc::new(msg)), priority, ttl, size)
                        } else {
                            // An entry of the inline format past the budget: its
                            // property flags say whether priority or expiration need
                            // decoding at all.
                            const PRIORITY: u16 = 1 << 11;
                            const EXPIRATION: u16 = 1 << 8;
                            let flags = match m.header.get(12..14) {
                                Some(f) => u16::from_be_bytes([f[0], f[1]]),
                                None => {
                                    unreadable(Some(seq), "content header is truncated");
                                    continue;
                                }
                            };
                            if flags & (PRIORITY | EXPIRATION) == 0 {
                                (None, 0, None, size)
                            } else {
                                let properties =
                                    match crate::protocol::decode_stored_header(&m.header) {
                                        Some(h) => h.properties,
                                        None => {
                                            unreadable(Some(seq), "unreadable content header");
                                            continue;
                                        }
                                    };
                                (
                                    None,
                                    properties.priority().unwrap_or(0),
                                    ttl_of(&properties),
                                    size,
                                )
                            }
                        }
                    }
                    (None, None) => continue,
                };
                msgs.push(Restored {
                    age_ms: now_wall.saturating_sub(stored_at),
                    seq,
                    priority,
                    ttl,
                    size,
                    msg,
                });
                if msgs.len() == RESTORE_BATCH {
                    nm += msgs.len();
                    q.restore(std::mem::replace(
                        &mut msgs,
                        Vec::with_capacity(RESTORE_BATCH),
                    ));
                }
            }
            nm += msgs.len();
            nq += 1;
            progress.queue_done();
            q.restore(msgs);
            t.queues.insert(q.name.clone(), q);
        }
        let mut w = self.lock_writer();
        for b in bindings.iter().filter(|b| mine(&b.vhost)) {
            let dest = match &b.destination {
                StoredDestination::Queue(q) => Destination::Queue(q.as_str().into()),
                StoredDestination::Exchange(x) => Destination::Exchange(x.as_str().into()),
            };
            let dest_exists = match &dest {
                Destination::Queue(q) => t.queues.contains_key(q),
                Destination::Exchange(x) => t.exchanges.contains_key(x),
            };
            let Some(x) = t.exchanges.get(b.source.as_str()).cloned() else {
                continue;
            };
            if !dest_exists {
                continue;
            }
            if w.bindings
                .add(x.name(), &dest, &b.routing_key, &b.arguments)
            {
                let next = x.bind(&dest, &b.routing_key, &b.arguments);
                t.exchanges.insert(x.name().clone(), Arc::new(next));
            }
        }
        drop(w);
        self.replace(t);
        Ok(Recovered {
            queues: nq,
            messages: nm,
            skipped,
        })
    }
}
