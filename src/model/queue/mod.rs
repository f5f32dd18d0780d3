//! A queue: its ready messages in order and its consumers. All of a queue's state
//! sits behind its own mutex, so publishers and acks on different queues never
//! contend, and nothing awaits while holding it. Delivery happens right where a
//! message or credit arrives (publish, ack, new consumer, drained socket): the
//! queue picks the next consumer round-robin that has prefetch room and whose
//! connection can take more, and writes the frames into that connection's outbox.
//!
//! The RabbitMQ queue arguments live here too: message TTL, priorities, length
//! limits and dead-lettering. Dead letters and timers are handed to the vhost's
//! housekeeping task, never routed under this queue's lock.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Instant;

use amq_protocol::types::{AMQPValue, FieldTable};
use tokio::sync::mpsc::UnboundedSender;

use super::dead_letter::DeadLetter;
use super::message::{MemoryGauge, Message};
use super::values::{integer_arg, string_value, type_name};
use crate::error::{queue_name, AmqpError, AmqpResult};
use crate::store::Store;
use crate::store::{ReadBack, StoredMessage};
use tokio::sync::oneshot;

mod ready;
use ready::{Entry, Ready, NEVER, PERSISTED, REDELIVERED};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// At most this many paged-out messages are read back at a time.
const PAGE_IN_MAX: usize = 256;

/// Stored messages dropped together (a purge, a lowered length limit, a
/// backlog whose TTL ran out while the broker was down) that one request asks
/// the store to delete.
const FORGET_BATCH: usize = 4096;

/// Ready messages beyond which a queue with consumers counts as backlogged.
const BACKLOG: usize = 1024;

/// Milliseconds on a monotonic clock shared by the whole process.
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// `now_ms()` as last refreshed: a relaxed load, for stamps that need only be
/// about right (when a delivery was made, for the consumer timeout) on paths
/// where reading the clock for every message would cost more than the stamp is
/// worth. Connections and the memory watcher refresh it at least every second.
pub fn coarse_ms() -> u64 {
    match COARSE_MS.load(Ordering::Relaxed) {
        0 => refresh_coarse(),
        ms => ms,
    }
}

/// Reads the clock into `coarse_ms()`; returns the new value.
pub fn refresh_coarse() -> u64 {
    let now = now_ms().max(1);
    COARSE_MS.store(now, Ordering::Relaxed);
    now
}

static COARSE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The instant a `now_ms()` value stands for.
pub fn at_instant(ms: u64) -> Instant {
    // Far-off times (a saturated deadline) become "in about a century", not a panic.
    epoch()
        .checked_add(std::time::Duration::from_millis(ms))
        .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(100 * 365 * 86_400))
}

#[derive(Clone)]
pub struct QueuedMessage {
    pub msg: Arc<Message>,
    /// Position in the queue: requeued messages go back to where they were.
    pub seq: u64,
    pub redelivered: bool,
    /// Times it came back to the queue unacknowledged (a quorum queue's
    /// delivery count, for x-delivery-limit and the x-delivery-count header).
    pub returns: u32,
    level: u8,
    /// `now_ms()` after which the message is dead.
    expires: Option<u64>,
    /// Written to the store: it must be deleted there when it leaves the queue.
    persisted: bool,
}

impl QueuedMessage {
    pub fn is_persisted(&self) -> bool {
        self.persisted
    }
}

/// What a queue delivers to: the channel a consumer sits on. The queue knows
/// nothing else of channels or connections. Called under the queue's lock, so
/// implementations take only their own, smaller locks (queue, then channel).
pub trait Deliver: Send + Sync {
    /// Whether the channel can take a delivery now (open, its connection not backed up).
    fn can_deliver(&self) -> bool;
    /// Assigns a delivery tag and sends the message to the consumer; hands the
    /// message back when the channel-wide prefetch is full.
    fn deliver(
        &self,
        queue: &Arc<Queue>,
        consumer: &Arc<Consumer>,
        m: QueuedMessage,
    ) -> Result<(), QueuedMessage>;
    /// The consumer's queue was deleted (consumer cancel notify).
    fn cancelled(&self, tag: &Arc<str>);
    /// The connection id and channel number, for listings.
    fn owner(&self) -> (u64, u16);
}

pub struct Consumer {
    pub tag: Arc<str>,
    pub channel: Arc<dyn Deliver>,
    pub no_ack: bool,
    pub exclusive: bool,
    /// Per-consumer prefetch (basic.qos global=false) in force when it started; 0 is unlimited.
    pub prefetch: u32,
    pub unacked: AtomicU32,
    /// The x-priority consume argument: higher-priority consumers with room get messages first.
    pub priority: i64,
}

impl Consumer {
    /// A delivery to this consumer was acked, rejected or requeued: one more may go.
    pub fn release_credit(&self) {
        let _ = self
            .unacked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    fn has_credit(&self) -> bool {
        self.channel.can_deliver()
            && (self.no_ack
                || self.prefetch == 0
                || self.unacked.load(Ordering::Acquire) < self.prefetch)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// The x-arguments a queue acts on, checked when it is declared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueArgs {
    pub message_ttl: Option<u64>,
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    /// Whether x-overflow was given (a policy's overflow applies only if not).
    pub overflow_declared: bool,
    pub max_priority: Option<u8>,
    pub dead_letter_exchange: Option<Arc<str>>,
    pub dead_letter_routing_key: Option<Arc<str>>,
    pub single_active_consumer: bool,
    /// x-queue-type quorum (run as a classic queue, with its delivery limit).
    pub quorum: bool,
    /// x-delivery-limit: a quorum queue dead-letters (reason delivery_limit) a
    /// message that came back more often than this.
    pub delivery_limit: Option<u64>,
    /// x-consumer-timeout (ms): how long a delivery from this queue may stay
    /// unacknowledged before its channel is closed, instead of the broker's
    /// `consumer_timeout` (RabbitMQ 3.12's argument; a value that is no
    /// non-negative integer is ignored, as RabbitMQ 3.10 ignores the argument).
    pub consumer_timeout: Option<u64>,
    /// The policy that contributed to these settings, if any.
    pub policy: Option<Arc<str>>,
}

impl QueueArgs {
    pub fn parse(args: &FieldTable, queue: &str, vhost: &str) -> AmqpResult<QueueArgs> {
        let get = |k: &str| args.inner().get(k);
        let bad = |k: &str, why: String| {
            AmqpError::precondition_failed(format!(
                "invalid arg '{k}' for {}: {why}",
                queue_name(queue, vhost)
            ))
        };
        // rabbit_channel checks the dead-letter exchange's type before the queue's
        // own argument checks, with a text of its own.
        if let Some(v) = get("x-dead-letter-exchange") {
            if string_value(v).is_none() {
                return Err(AmqpError::precondition_failed(format!(
                    "invalid type '{}' for arg 'x-dead-letter-exchange' in {}",
                    type_name(v),
                    queue_name(queue, vhost)
                )));
            }
        }
        let non_negative = |k: &str| -> AmqpResult<Option<u64>> {
            match get(k) {
                None => Ok(None),
                Some(v) => match integer_arg(v) {
                    Ok(n) if n >= 0 => Ok(Some(n.min(u64::MAX as i128) as u64)),
                    Ok(n) => Err(bad(k, format!("{{value_negative,{n}}}"))),
                    Err(why) => Err(bad(k, why)),
                },
            }
        };
        let text = |k: &str| -> AmqpResult<Option<Arc<str>>> {
            match get(k) {
                None => Ok(None),
                Some(v) => string_value(v)
                    .map(|s| Some(s.into()))
                    .ok_or_else(|| bad(k, format!("{{unacceptable_type,{}}}", type_name(v)))),
            }
        };
        // RabbitMQ's check_expiry: at most ten years.
        let expiry = |k: &str| -> AmqpResult<Option<u64>> {
            match non_negative(k)? {
                Some(n) if n > super::message::MAX_EXPIRY => {
                    Err(bad(k, format!("{{value_too_large,{n}}}")))
                }
                other => Ok(other),
            }
        };
        let expires = expiry("x-expires")?;
        if expires == Some(0) {
            return Err(bad("x-expires", "{value_zero,0}".into()));
        }
        let max_priority = match non_negative("x-max-priority")? {
            None => None,
            Some(n) if n <= 255 => Some(n as u8),
            Some(n) => return Err(bad("x-max-priority", format!("{{max_value_exceeded,{n}}}"))),
        };
        let overflow = match text("x-overflow")?.as_deref() {
            None | Some("drop-head") => Overflow::DropHead,
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            Some(_) => return Err(bad("x-overflow", "invalid_overflow".into())),
        };
        let dead_letter_exchange = text("x-dead-letter-exchange")?;
        let dead_letter_routing_key = text("x-dead-letter-routing-key")?;
        if dead_letter_routing_key.is_some() && dead_letter_exchange.is_none() {
            return Err(bad(
                "x-dead-letter-routing-key",
                "routing_key_but_no_dlx_defined".into(),
            ));
        }
        let single_active_consumer = match get("x-single-active-consumer") {
            None => false,
            Some(AMQPValue::Boolean(b)) => *b,
            Some(v) => {
                return Err(bad(
                    "x-single-active-consumer",
                    format!("{{unacceptable_type,{}}}", type_name(v)),
                ))
            }
        };
        let quorum = text("x-queue-type")?.as_deref() == Some("quorum");
        if !quorum && get("x-delivery-limit").is_some() {
            // rabbit_amqqueue:check_arguments_key, for a classic queue.
            return Err(AmqpError::precondition_failed(format!(
                "invalid arg 'x-delivery-limit' for {} of queue type rabbit_classic_queue",
                queue_name(queue, vhost)
            )));
        }
        match text("x-queue-type")?.as_deref() {
            None | Some("classic") | Some("quorum") => {}
            Some(other) => {
                return Err(bad(
                    "x-queue-type",
                    format!("\"unsupported queue type '{other}'\""),
                ))
            }
        }
        match text("x-queue-mode")?.as_deref() {
            None | Some("default") | Some("lazy") => {}
            Some(other) => {
                return Err(bad(
                    "x-queue-mode",
                    format!("\"unsupported queue mode '{other}'\""),
                ))
            }
        }
        Ok(QueueArgs {
            message_ttl: expiry("x-message-ttl")?,
            expires,
            max_length: non_negative("x-max-length")?,
            max_length_bytes: non_negative("x-max-length-bytes")?,
            overflow,
            overflow_declared: get("x-overflow").is_some(),
            max_priority,
            dead_letter_exchange,
            dead_letter_routing_key,
            single_active_consumer,
            quorum,
            delivery_limit: non_negative("x-delivery-limit")?,
            consumer_timeout: get("x-consumer-timeout")
                .and_then(crate::model::values::int_value)
                .and_then(|n| u64::try_from(n).ok()),
            policy: None,
        })
    }
}

/// Work for the vhost's housekeeping task.
pub enum Housekeeping {
    /// Read this paged-out message back, then dead-letter it.
    PagedOut(PagedOut),
    /// Route this message to the queue's dead-letter exchange.
    DeadLetter(DeadLetter),
    /// Look at this queue again at `now_ms()` = the given time (TTL and x-expires).
    Wake(Weak<Queue>, u64),
}

/// A paged-out message to dead-letter once read back from the store.
pub struct PagedOut {
    pub store: Arc<dyn Store>,
    pub queue: u64,
    pub seq: u64,
    pub make: Box<dyn FnOnce(StoredMessage) -> Option<DeadLetter> + Send>,
}

pub struct Queue {
    pub name: Arc<str>,
    pub durable: bool,
    pub auto_delete: bool,
    /// Connection id of the owner of an exclusive queue.
    pub exclusive_owner: Option<u64>,
    pub arguments: FieldTable,
    /// What the declaration's x-arguments ask for.
    pub declared: QueueArgs,
    /// What applies now: `declared` with the matching policy, replaced whole when
    /// the policies change.
    args: arc_swap::ArcSwap<QueueArgs>,
    housekeeping: UnboundedSender<Housekeeping>,
    me: Weak<Queue>,
    /// For durable queues: the store and this queue's id in it.
    pub store: Option<(Arc<dyn Store>, u64)>,
    /// Bytes of persisted bodies kept in memory; beyond, they stay on disk only.
    memory_budget: usize,
    /// Consumers are attached but ready messages pile up: publishers should let
    /// other tasks (the consumers' acks) run before reading more.
    backlogged: std::sync::atomic::AtomicBool,
    gauge: Arc<MemoryGauge>,
    state: Mutex<QueueState>,
    /// The last rates of `stats()`'s counts (the management API's sampler sets them).
    pub rates: super::stats::Rates<11>,
}

/// A message read back from the store at start-up.
pub struct Restored {
    pub seq: u64,
    pub priority: u8,
    pub ttl: Option<u64>,
    /// How long ago it was stored: its TTL has been running since.
    pub age_ms: u64,
    pub size: usize,
    /// None: leave it on disk until it is needed.
    pub msg: Option<Arc<Message>>,
}

impl Entry {
    fn resident(m: QueuedMessage) -> Entry {
        let flags =
            if m.redelivered { REDELIVERED } else { 0 } | if m.persisted { PERSISTED } else { 0 };
        Entry {
            seq: m.seq,
            expires_at: m.expires.unwrap_or(NEVER),
            size: size_u32(m.msg.body.len()),
            msg: Some(m.msg),
            returns: m.returns.min(u32::from(u16::MAX)) as u16,
            level: m.level,
            flags,
        }
    }

    /// A message recovered from the store: persisted, and marked redelivered.
    fn restored(r: Restored, level: u8, expires: Option<u64>) -> Entry {
        Entry {
            seq: r.seq,
            expires_at: expires.unwrap_or(NEVER),
            size: size_u32(r.size),
            msg: r.msg,
            returns: 0,
            level,
            flags: REDELIVERED | PERSISTED,
        }
    }
}

fn size_u32(n: usize) -> u32 {
    n.min(u32::MAX as usize) as u32
}

struct QueueState {
    /// Kept under the lock that every publish, delivery and ack takes anyway, so
    /// counting costs no shared cache line of its own.
    counts: QueueCounts,
    ready: Ready,
    next_seq: u64,
    consumers: Vec<Arc<Consumer>>,
    /// How many consumers have each x-priority.
    priorities: std::collections::BTreeMap<i64, usize>,
    next_consumer: usize,
    had_consumer: bool,
    deleted: bool,
    /// Earliest wake-up already asked of the housekeeper.
    wake_at: Option<u64>,
    last_used: u64,
    /// A page-in request is with the store.
    paging: bool,
    /// basic.get callers waiting for that page-in.
    page_waiters: Vec<oneshot::Sender<()>>,
}

/// What went in and out of a queue, under the management API's names.
#[derive(Default, Clone, Copy)]
struct QueueCounts {
    publish: u64,
    deliver: u64,
    deliver_no_ack: u64,
    get: u64,
    get_no_ack: u64,
    get_empty: u64,
    redeliver: u64,
    ack: u64,
}

/// A queue as listings show it.
pub struct QueueStats {
    pub ready: u64,
    /// Body bytes of the ready messages.
    pub ready_bytes: u64,
    /// Of those, the bytes held in memory (the rest is paged out to the store).
    pub ready_resident_bytes: u64,
    pub consumers: Vec<ConsumerInfo>,
    /// Monotonic milliseconds (`now_ms`) since it was last used, when it has no consumer.
    pub idle_since: Option<u64>,
}

/// A consumer as listings show it.
pub struct ConsumerInfo {
    pub tag: Arc<str>,
    /// The connection id and channel number it consumes on.
    pub channel: (u64, u16),
    pub no_ack: bool,
    pub exclusive: bool,
    pub prefetch: u32,
    pub priority: i64,
}

/// What basic.get finds.
pub enum Got {
    Message(QueuedMessage, u32),
    Empty,
    /// The head is on disk only: ask again once this resolves.
    PagingIn(oneshot::Receiver<()>),
}

/// Why a consumer could not be added.
pub enum ConsumeRefused {
    ExclusiveInUse,
    Deleted,
}

/// What became of a message offered to a queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    Accepted,
    /// x-overflow=reject-publish and the queue is full, or the store failed: the publisher gets a nack.
    Rejected,
    /// Accepted and written to the store: its confirm waits for the next flush.
    Persisted,
    /// The queue was deleted meanwhile.
    Gone,
}

impl Queue {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: Arc<str>,
        durable: bool,
        auto_delete: bool,
        exclusive_owner: Option<u64>,
        arguments: FieldTable,
        args: QueueArgs,
        housekeeping: UnboundedSender<Housekeeping>,
        store: Option<(Arc<dyn Store>, u64)>,
        memory: (usize, Arc<MemoryGauge>),
    ) -> Arc<Queue> {
        let levels = args.max_priority.map(|p| p as usize + 1).unwrap_or(1);
        let q = Arc::new_cyclic(|me| Queue {
            name,
            durable,
            auto_delete,
            exclusive_owner,
            arguments,
            args: arc_swap::ArcSwap::from_pointee(args.clone()),
            declared: args,
            housekeeping,
            me: me.clone(),
            store,
            memory_budget: memory.0,
            backlogged: std::sync::atomic::AtomicBool::new(false),
            gauge: memory.1,
            state: Mutex::new(QueueState {
                counts: QueueCounts::default(),
                ready: Ready::new(levels),
                next_seq: 0,
                consumers: Vec::new(),
                priorities: Default::default(),
                next_consumer: 0,
                had_consumer: false,
                deleted: false,
                wake_at: None,
                last_used: now_ms(),
                paging: false,
                page_waiters: Vec::new(),
            }),
            rates: Default::default(),
        });
        if let Some(ms) = q.args().expires {
            let mut st = q.lock();
            q.wake(&mut st, now_ms().saturating_add(ms));
        }
        q
    }

    /// The settings in force (declared arguments and policy).
    pub fn args(&self) -> arc_swap::Guard<Arc<QueueArgs>> {
        self.args.load()
    }

    /// Applies a policy (or its removal): the effective settings are recomputed
    /// from the declared ones. A lower length limit drops (or dead-letters) the
    /// oldest messages now, as RabbitMQ does; a shorter x-expires counts from the
    /// queue's last use.
    pub fn apply_policy(&self, policy: Option<&super::policy::Policy>) {
        let mut next = super::policy::effective(&self.declared, policy.map(|p| &p.definition));
        next.policy = policy.map(|p| p.name.clone());
        let current = self.args.load();
        if **current == next {
            return;
        }
        let expires = next.expires;
        self.args.store(Arc::new(next));
        let mut st = self.lock();
        if st.deleted {
            return;
        }
        if self.args().overflow == Overflow::DropHead {
            self.enforce_length(&mut st);
        }
        if let (Some(ms), true) = (expires, st.consumers.is_empty()) {
            let at = st.last_used.saturating_add(ms);
            self.wake(&mut st, at);
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the housekeeper to look at this queue again at `at`, unless it already will sooner.
    fn wake(&self, st: &mut QueueState, at: u64) {
        if st.wake_at.is_some_and(|w| w <= at) {
            return;
        }
        st.wake_at = Some(at);
        let _ = self
            .housekeeping
            .send(Housekeeping::Wake(self.me.clone(), at));
    }

    /// A ready message leaves without delivery: forgotten, and dead-lettered if
    /// configured. A paged-out message is read back by the housekeeper first.
    fn drop_entry(&self, e: Entry, reason: &'static str, forget: &mut Forget<'_>) {
        let (seq, persisted) = (e.seq, e.persisted());
        let Some(exchange) = self.args().dead_letter_exchange.clone() else {
            forget.add(seq, persisted);
            return;
        };
        if let Some(m) = self.resolve(e) {
            self.dead_letter(m, reason);
            return;
        }
        let Some((store, id)) = self.store.clone() else {
            return;
        };
        let self_store = store.clone();
        let (queue, routing_key, gauge) = (
            self.name.clone(),
            self.args().dead_letter_routing_key.clone(),
            self.gauge.clone(),
        );
        let make = Box::new(move |stored: StoredMessage| {
            let msg = Message::from_stored(stored, &gauge).ok()?;
            Some(DeadLetter {
                msg: Arc::new(msg),
                queue,
                reason,
                exchange,
                routing_key,
                source: Some((store, id, seq)),
            })
        });
        let _ = self.housekeeping.send(Housekeeping::PagedOut(PagedOut {
            store: self_store,
            queue: id,
            seq,
            make,
        }));
    }

    /// Hands a message to the dead-letter exchange. Its stored copy here is deleted
    /// only after the housekeeper has routed (and so stored) the dead letter: a crash
    /// in between leaves the message in both places, never in neither.
    fn dead_letter(&self, m: QueuedMessage, reason: &'static str) {
        let Some(exchange) = &self.args().dead_letter_exchange else {
            self.forget(&m);
            return;
        };
        let source = match (&self.store, m.persisted) {
            (Some((store, id)), true) => Some((store.clone(), *id, m.seq)),
            _ => None,
        };
        let _ = self.housekeeping.send(Housekeeping::DeadLetter(DeadLetter {
            msg: m.msg,
            queue: self.name.clone(),
            reason,
            exchange: exchange.clone(),
            routing_key: self.args().dead_letter_routing_key.clone(),
            source,
        }));
    }

    /// Drops (or dead-letters) expired messages at the head; schedules the next expiry.
    fn expire_head(&self, st: &mut QueueState, now: u64) {
        let mut forget = Forget::new(self);
        while let Some(head) = st.ready.front() {
            if !head.expired(now) {
                if let Some(t) = head.expires() {
                    self.wake(st, t.saturating_add(1));
                }
                return;
            }
            if let Some(e) = st.ready.pop_front() {
                self.drop_entry(e, "expired", &mut forget);
            }
        }
    }

    /// Adds a routed message and delivers what can be delivered.
    pub fn publish(self: &Arc<Self>, msg: Arc<Message>) -> Enqueued {
        let mut st = self.lock();
        if st.deleted {
            return Enqueued::Gone;
        }
        let size = msg.body.len() as u64;
        let args = self.args();
        let full = args
            .max_length
            .is_some_and(|max| st.ready.len as u64 >= max)
            || args
                .max_length_bytes
                .is_some_and(|max| st.ready.bytes as u64 + size > max);
        if full && args.overflow != Overflow::DropHead {
            if args.overflow == Overflow::RejectPublishDlx {
                let m = self.queued(&mut st, msg);
                self.dead_letter(m, "maxlen");
            }
            return Enqueued::Rejected;
        }
        let mut m = self.queued(&mut st, msg);
        st.counts.publish += 1;
        if let Some((store, id)) = &self.store {
            if m.msg.persistent() {
                // A request to the store's thread: no disk work under this lock.
                store.put_message(*id, m.seq, m.msg.record());
                m.persisted = true;
            }
        }
        let persisted = m.persisted;
        let had_expiry = m.expires.is_some();
        let (seq, level) = (m.seq, m.level);
        let expires_now = self.effective_ttl(m.msg.ttl) == Some(0);
        let mut e = Entry::resident(m);
        if expires_now {
            // Not subject to the clock during this delivery attempt; removed after it.
            e.expires_at = NEVER;
        }
        if persisted && st.ready.resident + e.size() > self.memory_budget {
            // Over budget: the stored copy is the only one this queue keeps.
            e.msg = None;
        }
        st.ready.push_back(e);
        // A waiting consumer gets the message before the length limit is applied,
        // as RabbitMQ attempts delivery first (x-max-length 0 still feeds consumers).
        self.drain(&mut st);
        self.enforce_length(&mut st);
        if expires_now {
            // TTL 0: delivered right away to a waiting consumer, or gone.
            if let Some(e) = st.ready.pop_back_if(level, seq) {
                self.drop_entry(e, "expired", &mut Forget::new(self));
            }
        }
        if had_expiry {
            self.expire_head(&mut st, now_ms());
        }
        self.backlogged.store(
            st.ready.len > BACKLOG && !st.consumers.is_empty(),
            Ordering::Relaxed,
        );
        if persisted {
            Enqueued::Persisted
        } else {
            Enqueued::Accepted
        }
    }

    /// Whether consumers are falling behind this queue's publishers.
    pub fn backlogged(&self) -> bool {
        self.backlogged.load(Ordering::Relaxed)
    }

    /// A message has left the queue for good (acked, dropped, dead-lettered):
    /// its stored copy goes too, in the next group commit.
    pub fn forget(&self, m: &QueuedMessage) {
        self.forget_stored(m.seq, m.persisted);
    }

    fn forget_stored(&self, seq: u64, persisted: bool) {
        if !persisted {
            return;
        }
        if let Some((store, id)) = &self.store {
            store.delete_message(*id, seq);
        }
    }

    /// Puts back messages recovered from the store, in their order, marked redelivered:
    /// whether they had been delivered before the restart is not recorded. A message
    /// given without its `Message` stays paged out until it is about to be delivered.
    pub fn restore(&self, msgs: Vec<Restored>) {
        let mut st = self.lock();
        let now = now_ms();
        for r in msgs {
            let level = self.level_of(r.priority);
            let ttl = self.effective_ttl(r.ttl);
            st.next_seq = st.next_seq.max(r.seq + 1);
            let expires = ttl.map(|t| now.saturating_add(t.saturating_sub(r.age_ms)));
            st.ready.push_back(Entry::restored(r, level, expires));
        }
        // Messages whose time ran out while the broker was down go now; the next
        // expiry gets its timer.
        self.expire_head(&mut st, now);
    }

    /// Whether a recovered queue can keep another `size` bytes of bodies in memory.
    pub fn has_budget_for(&self, resident: usize, size: usize) -> bool {
        resident + size <= self.memory_budget
    }

    /// The message of a resident entry; None when it is paged out.
    fn resolve(&self, e: Entry) -> Option<QueuedMessage> {
        let (redelivered, expires, persisted) = (e.redelivered(), e.expires(), e.persisted());
        Some(QueuedMessage {
            msg: e.msg?,
            seq: e.seq,
            redelivered,
            returns: u32::from(e.returns),
            level: e.level,
            expires,
            persisted,
        })
    }

    /// Asks the store for the paged-out messages at the head of the queue (up to a
    /// quarter of the memory budget); delivery resumes when they are back. The read
    /// runs on the store's thread, never under this lock.
    fn page_in(self: &Arc<Self>, st: &mut QueueState) {
        if st.paging {
            return;
        }
        let Some((store, id)) = &self.store else {
            return;
        };
        let (mut seqs, mut bytes) = (Vec::new(), 0usize);
        let enough = |n: usize, b: usize| n >= PAGE_IN_MAX || b >= self.memory_budget / 4;
        for e in st.ready.heads(PAGE_IN_MAX) {
            if e.msg.is_none() {
                seqs.push(e.seq);
                bytes += e.size();
            }
            if enough(seqs.len(), bytes) {
                break;
            }
        }
        if seqs.is_empty() {
            return;
        }
        st.paging = true;
        let me = self.clone();
        store.read_messages(*id, seqs, Box::new(move |read| me.paged_in(read)));
    }

    /// Messages read back from the store: attached to their entries, then delivered.
    fn paged_in(self: &Arc<Self>, read: ReadBack) {
        let mut st = self.lock();
        st.paging = false;
        for (seq, got) in read {
            let msg = match got.and_then(|m| match m {
                Some(m) => Message::from_stored(m, &self.gauge).map(Some),
                None => Ok(None),
            }) {
                Ok(Some(m)) => Arc::new(m),
                Ok(None) => {
                    tracing::error!(queue = %self.name, seq, "a paged-out message is missing from the store");
                    st.ready.remove_seq(seq);
                    continue;
                }
                Err(err) => {
                    tracing::error!(queue = %self.name, seq, "cannot read a paged-out message: {err}");
                    st.ready.remove_seq(seq);
                    continue;
                }
            };
            st.ready.attach(seq, msg, PAGE_IN_MAX * 2);
        }
        for w in std::mem::take(&mut st.page_waiters) {
            let _ = w.send(());
        }
        if !st.deleted {
            self.drain(&mut st);
        }
    }

    /// A message's effective TTL here: the lower of the queue's and its own.
    fn effective_ttl(&self, message_ttl: Option<u64>) -> Option<u64> {
        match (self.args().message_ttl, message_ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The priority level a message's priority maps to (0 without x-max-priority).
    fn level_of(&self, priority: u8) -> u8 {
        self.args().max_priority.map_or(0, |max| priority.min(max))
    }

    fn queued(&self, st: &mut QueueState, msg: Arc<Message>) -> QueuedMessage {
        let seq = st.next_seq;
        st.next_seq += 1;
        let ttl = self.effective_ttl(msg.ttl);
        let level = self.level_of(msg.properties.priority().unwrap_or(0));
        QueuedMessage {
            msg,
            seq,
            redelivered: false,
            returns: 0,
            level,
            expires: ttl.map(|t| now_ms().saturating_add(t)),
            persisted: false,
        }
    }

    /// x-max-length and x-max-length-bytes with drop-head: the oldest go first.
    fn enforce_length(&self, st: &mut QueueState) {
        let args = self.args();
        let mut forget = Forget::new(self);
        loop {
            let over = args.max_length.is_some_and(|max| st.ready.len as u64 > max)
                || args
                    .max_length_bytes
                    .is_some_and(|max| st.ready.bytes as u64 > max);
            if !over {
                return;
            }
            match st.ready.pop_front() {
                Some(e) => self.drop_entry(e, "maxlen", &mut forget),
                None => return,
            }
        }
    }

    /// Puts messages back at their original positions, marked redelivered.
    pub fn requeue(self: &Arc<Self>, msgs: Vec<QueuedMessage>) {
        let mut st = self.lock();
        if st.deleted {
            return;
        }
        let args = self.args();
        for mut m in msgs {
            m.redelivered = true;
            if args.quorum {
                m.returns = m.returns.saturating_add(1);
                if args
                    .delivery_limit
                    .is_some_and(|limit| m.returns as u64 > limit)
                {
                    // rabbit_fifo: past the limit, dead-lettered (or dropped).
                    self.dead_letter(m, "delivery_limit");
                    continue;
                }
            }
            st.ready.insert_by_seq(Entry::resident(m));
        }
        // With drop-head, messages put back count against the limit as RabbitMQ
        // counts them: the oldest (often those just requeued) go first.
        if self.args().overflow == Overflow::DropHead {
            self.enforce_length(&mut st);
        }
        self.drain(&mut st);
    }

    /// A message rejected without requeue: dead-lettered if the queue says so,
    /// and forgotten (now, or once its dead letter is routed).
    pub fn rejected(&self, m: QueuedMessage) {
        self.dead_letter(m, "rejected");
    }

    /// Tries to deliver again (after an ack, a qos change, a flow change or a drained socket).
    pub fn kick(self: &Arc<Self>) {
        self.kick_acked(0);
    }

    /// As `kick`, after `acked` of this queue's deliveries were acked (counted
    /// under the lock the kick takes anyway).
    pub fn kick_acked(self: &Arc<Self>, acked: u64) {
        let mut st = self.lock();
        st.counts.ack += acked;
        if st.ready.len > 0 && !st.consumers.is_empty() {
            self.drain(&mut st);
        }
    }

    fn drain(self: &Arc<Self>, st: &mut QueueState) {
        let now = now_ms();
        // Consumers whose channel refused a delivery (channel-wide prefetch) in this pass.
        let mut refused: Vec<usize> = Vec::new();
        while st.ready.len > 0 && !st.consumers.is_empty() {
            let n = st.consumers.len();
            // With x-single-active-consumer only the oldest consumer gets messages.
            let candidates = if self.args().single_active_consumer {
                1
            } else {
                n
            };
            // With one priority among the consumers (the usual case) the first with
            // room in round-robin order is the one: a delivery then costs O(1)
            // however many consumers there are, not a scan of all of them.
            let uniform = st.priorities.len() <= 1;
            let mut best: Option<(i64, usize)> = None;
            for i in 0..candidates {
                let idx = (st.next_consumer + i) % candidates;
                let c = &st.consumers[idx];
                if refused.contains(&idx) || !c.has_credit() {
                    continue;
                }
                // Highest priority wins; among equals, the next in round-robin order.
                if best.is_none_or(|(p, _)| c.priority > p) {
                    best = Some((c.priority, idx));
                    if uniform {
                        break;
                    }
                }
            }
            let Some((_, idx)) = best else {
                return;
            };
            let consumer = st.consumers[idx].clone();
            self.expire_head(st, now);
            if st.ready.front().is_some_and(|e| e.msg.is_none()) {
                self.page_in(st);
                return;
            }
            let Some(e) = st.ready.pop_front() else {
                return;
            };
            let Some(mut m) = self.resolve(e) else {
                continue;
            };
            if m.returns > 0 && self.args().quorum {
                m.msg = with_delivery_count(&m.msg, m.returns);
            }
            let redelivered = m.redelivered;
            match consumer.channel.deliver(self, &consumer, m) {
                Ok(()) => {
                    st.next_consumer = (idx + 1) % n;
                    let c = &mut st.counts;
                    if consumer.no_ack {
                        c.deliver_no_ack += 1;
                    } else {
                        c.deliver += 1;
                    }
                    c.redeliver += redelivered as u64;
                }
                Err(m) => {
                    st.ready.push_front(Entry::resident(m));
                    refused.push(idx);
                }
            }
        }
    }

    /// basic.get: the next ready message, if any, with the count left behind it.
    pub fn get(self: &Arc<Self>, no_ack: bool) -> Got {
        let mut st = self.lock();
        st.last_used = now_ms();
        self.expire_head(&mut st, now_ms());
        if st.ready.front().is_some_and(|e| e.msg.is_none()) {
            let (tx, rx) = oneshot::channel();
            st.page_waiters.push(tx);
            self.page_in(&mut st);
            return Got::PagingIn(rx);
        }
        match st.ready.pop_front().and_then(|e| self.resolve(e)) {
            Some(mut m) => {
                // A quorum queue's basic.get carries the count even at 0.
                if self.args().quorum {
                    m.msg = with_delivery_count(&m.msg, m.returns);
                }
                let c = &mut st.counts;
                if no_ack {
                    c.get_no_ack += 1;
                } else {
                    c.get += 1;
                }
                c.redeliver += m.redelivered as u64;
                // As RabbitMQ: expired messages now at the head are dropped before
                // the count that get-ok reports.
                self.expire_head(&mut st, now_ms());
                Got::Message(m, st.ready.len as u32)
            }
            None => {
                st.counts.get_empty += 1;
                Got::Empty
            }
        }
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
        *st.priorities.entry(consumer.priority).or_insert(0) += 1;
        st.consumers.push(consumer);
        st.had_consumer = true;
        self.drain(&mut st);
        Ok(())
    }

    /// Removes a consumer; true when an auto-delete queue has just lost its last one.
    pub fn remove_consumer(&self, consumer: &Arc<Consumer>) -> bool {
        let mut st = self.lock();
        let before = st.consumers.len();
        st.consumers.retain(|c| !Arc::ptr_eq(c, consumer));
        if st.consumers.len() < before {
            if let Some(n) = st.priorities.get_mut(&consumer.priority) {
                *n -= 1;
                if *n == 0 {
                    st.priorities.remove(&consumer.priority);
                }
            }
        }
        if st.next_consumer >= st.consumers.len() {
            st.next_consumer = 0;
        }
        if st.consumers.is_empty() {
            st.last_used = now_ms();
            if let Some(ms) = self.args().expires {
                let at = st.last_used.saturating_add(ms);
                self.wake(&mut st, at);
            }
        }
        self.auto_delete && st.had_consumer && st.consumers.is_empty() && !st.deleted
    }

    /// What listings show of the queue now.
    pub fn stats(&self) -> QueueStats {
        let st = self.lock();
        QueueStats {
            ready: st.ready.len as u64,
            ready_bytes: st.ready.bytes as u64,
            ready_resident_bytes: st.ready.resident as u64,
            consumers: st
                .consumers
                .iter()
                .map(|c| ConsumerInfo {
                    tag: c.tag.clone(),
                    channel: c.channel.owner(),
                    no_ack: c.no_ack,
                    exclusive: c.exclusive,
                    prefetch: c.prefetch,
                    priority: c.priority,
                })
                .collect(),
            idle_since: st.consumers.is_empty().then_some(st.last_used),
        }
    }

    /// The message counts under [`super::stats::STAT_NAMES`] (confirms and
    /// unroutable messages are no queue's: 0).
    pub fn stats_counts(&self) -> [u64; 11] {
        let c = self.lock().counts;
        [
            c.publish,
            0,
            0,
            0,
            c.deliver,
            c.deliver_no_ack,
            c.get,
            c.get_no_ack,
            c.get_empty,
            c.redeliver,
            c.ack,
        ]
    }

    /// Ready and consumer counts, as declare-ok reports them.
    pub fn counts(&self) -> (u32, u32) {
        let mut st = self.lock();
        self.expire_head(&mut st, now_ms());
        (st.ready.len as u32, st.consumers.len() as u32)
    }

    /// A redeclare or passive declare counts as use for x-expires.
    pub fn touch(&self) {
        self.lock().last_used = now_ms();
    }

    /// The housekeeper's wake-up: expire messages; true if x-expires says the queue should go.
    pub fn on_wake(&self, at: u64) -> bool {
        let mut st = self.lock();
        if st.wake_at == Some(at) {
            st.wake_at = None;
        }
        if st.deleted {
            return false;
        }
        let now = now_ms();
        self.expire_head(&mut st, now);
        if let Some(ms) = self.args().expires {
            if st.consumers.is_empty() {
                if now >= st.last_used.saturating_add(ms) {
                    return true;
                }
                let at = st.last_used.saturating_add(ms);
                self.wake(&mut st, at);
            }
        }
        false
    }

    /// Drops the ready messages; unacked ones are untouched, as in RabbitMQ.
    pub fn purge(&self) -> u32 {
        let mut st = self.lock();
        let mut forget = Forget::new(self);
        st.ready.clear(|e| forget.add(e.seq, e.persisted())) as u32
    }

    /// Marks the queue deleted; returns its ready count and its consumers, to be told.
    pub fn delete(&self) -> (u32, Vec<Arc<Consumer>>) {
        let mut st = self.lock();
        st.deleted = true;
        let n = st.ready.clear(drop) as u32;
        st.priorities.clear();
        (n, std::mem::take(&mut st.consumers))
    }
}

/// Stored copies of messages dropped under the queue's lock, deleted FORGET_BATCH
/// to a store request (on drop for the rest): a million dropped at once are a
/// few hundred requests, not a million queued for the store's thread.
struct Forget<'a> {
    queue: &'a Queue,
    seqs: Vec<u64>,
}

impl<'a> Forget<'a> {
    fn new(queue: &'a Queue) -> Forget<'a> {
        Forget {
            queue,
            seqs: Vec::new(),
        }
    }

    fn add(&mut self, seq: u64, persisted: bool) {
        if !persisted || self.queue.store.is_none() {
            return;
        }
        self.seqs.push(seq);
        if self.seqs.len() == FORGET_BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if let (Some((store, id)), false) = (&self.queue.store, self.seqs.is_empty()) {
            match self.seqs.len() {
                1 => store.delete_message(*id, self.seqs[0]),
                _ => store.delete_message_seqs(*id, std::mem::take(&mut self.seqs)),
            }
            self.seqs.clear();
        }
    }
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The message with an `x-delivery-count` header, as a quorum queue delivers a
/// message that came back (edited on the header's bytes; the body is shared).
fn with_delivery_count(msg: &Arc<Message>, count: u32) -> Arc<Message> {
    use crate::protocol::ordered::{long, RawHeader};
    let Some(mut header) = RawHeader::parse(&msg.header) else {
        return msg.clone();
    };
    let Some(mut headers) = header.headers() else {
        return msg.clone();
    };
    headers.set("x-delivery-count", long(count as i64));
    header.set_headers(&headers);
    let mut counted = msg.republish_with_header(
        msg.exchange.clone(),
        msg.routing_key.clone(),
        header.encode(),
        msg.properties.clone(),
    );
    counted.extra_keys = msg.extra_keys.clone();
    Arc::new(counted)
}
