//! A virtual host's model: exchanges, queues and the bindings between them.
//!
//! Declarations change it under one mutex; publishers never take that mutex on the
//! hot path. Instead each channel keeps an `Arc<Routing>`, an immutable compiled
//! snapshot, and only fetches a new one when the vhost's version number moved.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use amq_protocol::types::{AMQPValue, FieldTable};

use crate::error::{exchange_name, queue_name, AmqpError, AmqpResult};
use crate::exchange::{Binding, Destination, ExchangeDef, ExchangeKind, Router};
use crate::message::ttl_of;
use crate::message::MemoryGauge;
use crate::queue::{at_instant, Consumer, DeadLetter, Housekeeping, Queue, QueueArgs, Restored};
use crate::store::{Store, StoreError, StoredBinding, StoredExchange, StoredQueue};
use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{FieldArray, LongString, ShortString};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Weak;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// What [`Vhost::recover`] brought back.
#[derive(Default)]
pub struct Recovered {
    pub queues: usize,
    pub messages: usize,
    /// Message records that could not be read and were left out.
    pub skipped: usize,
}

pub struct Vhost {
    pub name: Arc<str>,
    topology: Mutex<Topology>,
    version: AtomicU64,
    housekeeping: UnboundedSender<Housekeeping>,
    housekeeping_rx: Mutex<Option<UnboundedReceiver<Housekeeping>>>,
    /// Where durable entities and persistent messages go; None runs purely in memory.
    pub store: Option<Arc<Store>>,
    gauge: Arc<MemoryGauge>,
    queue_memory_budget: usize,
    /// Direct reply-to: the pseudo-queue behind each `amq.rabbitmq.reply-to.*` name.
    /// Only replies to such names look here, never ordinary publishes.
    reply_to: Mutex<HashMap<Arc<str>, Weak<Queue>>>,
    limits: std::sync::OnceLock<VhostLimits>,
}

/// How many entities clients may create here; 0 is unlimited. Recovery and
/// the predeclared exchanges are not held to them.
#[derive(Debug, Clone, Copy, Default)]
pub struct VhostLimits {
    pub queues: usize,
    pub exchanges: usize,
    /// Bindings whose source is one exchange.
    pub bindings: usize,
}

fn reached(limit: usize, count: usize) -> bool {
    limit != 0 && count >= limit
}

/// The queue name RPC clients consume from and put in reply_to (direct reply-to).
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

struct Topology {
    exchanges: HashMap<Arc<str>, ExchangeDef>,
    queues: HashMap<Arc<str>, Arc<Queue>>,
    /// The current snapshot; None once a change made it stale.
    snapshot: Option<Arc<Routing>>,
}

/// What a publisher needs to route, compiled and immutable.
pub struct Routing {
    pub version: u64,
    exchanges: HashMap<Arc<str>, Router>,
    queues: HashMap<Arc<str>, Arc<Queue>>,
}

pub enum Routed {
    NoExchange,
    Internal,
    Queues(Vec<Arc<Queue>>),
}

impl Routing {
    /// Whether an exchange is internal; None when there is no such exchange.
    pub fn internal(&self, exchange: &str) -> Option<bool> {
        self.exchanges.get(exchange).map(|r| r.internal)
    }

    /// Where a message published to `exchange` with these routing keys goes: the
    /// publish's own key, then any CC and BCC keys (sender-selected distribution).
    pub fn route(&self, exchange: &str, keys: &[&str], headers: Option<&FieldTable>) -> Routed {
        let mut queues: Vec<Arc<Queue>> = Vec::new();
        if exchange.is_empty() {
            for key in keys {
                if let Some(q) = self.queues.get(*key) {
                    if !queues.iter().any(|x| Arc::ptr_eq(x, q)) {
                        queues.push(q.clone());
                    }
                }
            }
            return Routed::Queues(queues);
        }
        let Some(first) = self.exchanges.get(exchange) else {
            return Routed::NoExchange;
        };
        if first.internal {
            return Routed::Internal;
        }
        let mut visited: Vec<&str> = Vec::new();
        let mut pending: Vec<&Router> = vec![first];
        let mut dests = Vec::new();
        while let Some(router) = pending.pop() {
            if visited.contains(&&*router.name) {
                continue;
            }
            visited.push(&router.name);
            dests.clear();
            for key in keys {
                router.route(key, headers, &mut dests);
            }
            if dests.is_empty() {
                // Unroutable here: the exchange's alternate-exchange gets it.
                if let Some(ae) = router
                    .alternate
                    .as_ref()
                    .and_then(|a| self.exchanges.get(a))
                {
                    pending.push(ae);
                }
            }
            for d in dests.drain(..) {
                match d {
                    Destination::Queue(name) => {
                        if let Some(q) = self.queues.get(&name) {
                            if !queues.iter().any(|x| Arc::ptr_eq(x, q)) {
                                queues.push(q.clone());
                            }
                        }
                    }
                    Destination::Exchange(name) => {
                        if let Some(r) = self.exchanges.get(&name) {
                            pending.push(r);
                        }
                    }
                }
            }
        }
        Routed::Queues(queues)
    }
}

pub struct ExchangeDeclare<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: &'a FieldTable,
}

pub struct QueueDeclare<'a> {
    pub name: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: &'a FieldTable,
    pub connection: u64,
}

fn default_exchange_refused() -> AmqpError {
    AmqpError::access_refused("operation not permitted on the default exchange".into())
}

impl Vhost {
    pub fn new(
        name: &str,
        store: Option<Arc<Store>>,
        gauge: Arc<MemoryGauge>,
        queue_memory_budget: usize,
    ) -> Vhost {
        let (housekeeping, rx) = unbounded_channel();
        let vhost = Vhost {
            store,
            gauge,
            queue_memory_budget,
            reply_to: Mutex::new(HashMap::new()),
            limits: std::sync::OnceLock::new(),
            housekeeping,
            housekeeping_rx: Mutex::new(Some(rx)),
            name: name.into(),
            topology: Mutex::new(Topology {
                exchanges: HashMap::new(),
                queues: HashMap::new(),
                snapshot: None,
            }),
            version: AtomicU64::new(1),
        };
        {
            let mut t = vhost.lock();
            for (name, kind, internal) in [
                ("amq.direct", ExchangeKind::Direct, false),
                ("amq.fanout", ExchangeKind::Fanout, false),
                ("amq.topic", ExchangeKind::Topic, false),
                ("amq.headers", ExchangeKind::Headers, false),
                ("amq.match", ExchangeKind::Headers, false),
                ("amq.rabbitmq.trace", ExchangeKind::Topic, true),
            ] {
                t.exchanges.insert(
                    name.into(),
                    ExchangeDef {
                        name: name.into(),
                        kind,
                        durable: true,
                        auto_delete: false,
                        internal,
                        arguments: FieldTable::default(),
                        bindings: Vec::new(),
                    },
                );
            }
        }
        vhost
    }

    /// Rebuilds this vhost's durable entities and messages from the store.
    /// Returns how many queues and messages came back, and how many message records
    /// were left out as unreadable.
    pub fn recover(
        &self,
        exchanges: &[StoredExchange],
        queues: &[StoredQueue],
        bindings: &[StoredBinding],
        gauge: &Arc<crate::message::MemoryGauge>,
    ) -> Result<Recovered, StoreError> {
        let Some(store) = self.store.clone() else {
            return Ok(Recovered::default());
        };
        let mine = |v: &str| v == &*self.name;
        let mut t = self.lock();
        for x in exchanges.iter().filter(|x| mine(&x.vhost)) {
            t.exchanges.insert(
                x.name.as_str().into(),
                ExchangeDef {
                    name: x.name.as_str().into(),
                    kind: x.kind,
                    durable: true,
                    auto_delete: x.auto_delete,
                    internal: x.internal,
                    arguments: x.arguments.clone(),
                    bindings: Vec::new(),
                },
            );
        }
        let (mut nq, mut nm, mut skipped) = (0, 0, 0);
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
            let mut resident = 0usize;
            let now_wall = crate::store::wall_ms();
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
            for m in store.messages(sq.id) {
                let m = match m? {
                    Ok(m) => m,
                    Err(bad) => {
                        unreadable(bad.seq, &bad.why);
                        continue;
                    }
                };
                let (size, seq, stored_at) = (m.body.len(), m.seq, m.stored_at);
                // Only the head of a long backlog is loaded; the rest stays on disk.
                // For that rest, the property flags say whether priority or expiration
                // need decoding at all.
                let (msg, priority, ttl) = if q.has_budget_for(resident, size) {
                    let msg = match m.into_message(gauge) {
                        Ok(msg) => msg,
                        Err(why) => {
                            unreadable(Some(seq), &why);
                            continue;
                        }
                    };
                    resident += size;
                    let (priority, ttl) = (msg.properties.priority().unwrap_or(0), msg.ttl);
                    (Some(Arc::new(msg)), priority, ttl)
                } else {
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
                        (None, 0, None)
                    } else {
                        let properties = match crate::protocol::decode_stored_header(&m.header) {
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
                        )
                    }
                };
                msgs.push(Restored {
                    age_ms: now_wall.saturating_sub(stored_at),
                    seq,
                    priority,
                    ttl,
                    size,
                    msg,
                });
            }
            nm += msgs.len();
            nq += 1;
            q.restore(msgs);
            t.queues.insert(q.name.clone(), q);
        }
        for b in bindings.iter().filter(|b| mine(&b.vhost)) {
            let dest_exists = match &b.destination {
                Destination::Queue(q) => t.queues.contains_key(q),
                Destination::Exchange(x) => t.exchanges.contains_key(x),
            };
            if let (true, Some(x)) = (dest_exists, t.exchanges.get_mut(b.source.as_str())) {
                x.bindings.push(Binding {
                    destination: b.destination.clone(),
                    routing_key: b.routing_key.clone(),
                    arguments: b.arguments.clone(),
                });
            }
        }
        self.changed(&mut t);
        Ok(Recovered {
            queues: nq,
            messages: nm,
            skipped,
        })
    }

    pub fn set_limits(&self, limits: VhostLimits) {
        let _ = self.limits.set(limits);
    }

    fn limits(&self) -> VhostLimits {
        self.limits.get().copied().unwrap_or_default()
    }

    /// A pseudo-queue for a direct reply-to consumer, reachable only by its name.
    pub fn new_reply_queue(&self) -> Arc<Queue> {
        let name: Arc<str> = format!("{REPLY_TO}.{}", &generated_name()["amq.gen-".len()..]).into();
        let args = QueueArgs::parse(&FieldTable::default(), &name, &self.name)
            .expect("empty arguments are valid");
        let q = Queue::new(
            name.clone(),
            false,
            false,
            None,
            FieldTable::default(),
            args,
            self.housekeeping.clone(),
            None,
            (self.queue_memory_budget, self.gauge.clone()),
        );
        self.reply_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, Arc::downgrade(&q));
        q
    }

    /// The reply pseudo-queue behind an `amq.rabbitmq.reply-to.*` routing key, if its consumer is still there.
    pub fn reply_queue(&self, name: &str) -> Option<Arc<Queue>> {
        let map = self.reply_to.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).and_then(|w| w.upgrade())
    }

    pub fn drop_reply_queue(&self, name: &str) {
        self.reply_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Starts the task that routes dead letters and runs TTL and x-expires timers.
    pub fn start_housekeeping(self: &Arc<Self>) {
        let rx = self
            .housekeeping_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rx) = rx {
            tokio::spawn(housekeeper(Arc::downgrade(self), rx));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Topology> {
        self.topology.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self, t: &mut Topology) {
        t.snapshot = None;
        self.version.fetch_add(1, Ordering::Release);
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The current routing snapshot, compiled on first use after a change.
    pub fn routing(&self) -> Arc<Routing> {
        let mut t = self.lock();
        if let Some(s) = &t.snapshot {
            return s.clone();
        }
        let snap = Arc::new(Routing {
            version: self.version(),
            exchanges: t
                .exchanges
                .iter()
                .map(|(k, v)| (k.clone(), Router::compile(v)))
                .collect(),
            queues: t.queues.clone(),
        });
        t.snapshot = Some(snap.clone());
        snap
    }

    pub fn not_found_exchange(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no {}", exchange_name(name, &self.name)))
    }

    pub fn not_found_queue(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no {}", queue_name(name, &self.name)))
    }

    /// Declares an exchange; true when a durable one was created (the reply waits for a sync).
    pub fn declare_exchange(&self, d: ExchangeDeclare<'_>) -> AmqpResult<bool> {
        let mut t = self.lock();
        if d.passive {
            // RabbitMQ checks the default exchange before looking it up: 403.
            if d.name.is_empty() {
                return Err(default_exchange_refused());
            }
            if t.exchanges.contains_key(d.name) {
                return Ok(false);
            }
            return Err(self.not_found_exchange(d.name));
        }
        let Some(kind) = ExchangeKind::parse(d.kind) else {
            return Err(AmqpError::command_invalid(format!(
                "unknown exchange type '{}'",
                d.kind
            )));
        };
        if d.name.is_empty() {
            return Err(default_exchange_refused());
        }
        if let Some(x) = t.exchanges.get(d.name) {
            let vh = &self.name;
            let what = exchange_name(d.name, vh);
            let check = |arg: &str, got: String, cur: String| -> AmqpResult<()> {
                if got != cur {
                    return Err(AmqpError::precondition_failed(format!(
                        "inequivalent arg '{arg}' for {what}: received '{got}' but current is '{cur}'"
                    )));
                }
                Ok(())
            };
            check("type", kind.as_str().into(), x.kind.as_str().into())?;
            check("durable", d.durable.to_string(), x.durable.to_string())?;
            check(
                "auto_delete",
                d.auto_delete.to_string(),
                x.auto_delete.to_string(),
            )?;
            check("internal", d.internal.to_string(), x.internal.to_string())?;
            check_arguments(&what, EXCHANGE_CHECKED, d.arguments, &x.arguments)?;
            return Ok(false);
        }
        if d.name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                d.name
            )));
        }
        let max = self.limits().exchanges;
        if reached(max, t.exchanges.len()) {
            return Err(AmqpError::precondition_failed(format!(
                "cannot declare exchange '{}': exchange limit in vhost '{}' ({max}) is reached",
                d.name, self.name
            )));
        }
        t.exchanges.insert(
            d.name.into(),
            ExchangeDef {
                name: d.name.into(),
                kind,
                durable: d.durable,
                auto_delete: d.auto_delete,
                internal: d.internal,
                arguments: d.arguments.clone(),
                bindings: Vec::new(),
            },
        );
        self.changed(&mut t);
        let mut durable = false;
        if let (Some(store), true) = (&self.store, d.durable && !d.auto_delete) {
            store
                .put_exchange(
                    &self.name,
                    &StoredExchange {
                        vhost: self.name.to_string(),
                        name: d.name.to_string(),
                        kind,
                        auto_delete: d.auto_delete,
                        internal: d.internal,
                        arguments: d.arguments.clone(),
                    },
                )
                .map_err(internal)?;
            durable = true;
        }
        Ok(durable)
    }

    /// Deletes an exchange; true when it was durable.
    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> AmqpResult<bool> {
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        if name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "deletion of system {} not allowed",
                exchange_name(name, &self.name)
            )));
        }
        let mut t = self.lock();
        let Some(x) = t.exchanges.get(name) else {
            // Deleting an exchange that is not there succeeds, as in RabbitMQ 3.x.
            return Ok(false);
        };
        let durable = x.durable && !x.auto_delete && self.store.is_some();
        if if_unused && !x.bindings.is_empty() {
            return Err(AmqpError::precondition_failed(format!(
                "{} in use",
                exchange_name(name, &self.name)
            )));
        }
        self.remove_exchange(&mut t, name);
        self.changed(&mut t);
        Ok(durable)
    }

    /// Removes an exchange and every binding it is the destination of.
    fn remove_exchange(&self, t: &mut Topology, name: &str) {
        if let Some(x) = t.exchanges.remove(name) {
            if let Some(store) = &self.store {
                if let Err(e) = store.delete_exchange(&self.name, name) {
                    tracing::error!("cannot delete exchange '{name}' from the store: {e}");
                }
                for b in &x.bindings {
                    self.unstore_binding(name, b);
                }
            }
        }
        let dest = Destination::Exchange(name.into());
        self.remove_bindings_to(t, &dest);
    }

    /// Removes bindings to a destination; auto-delete exchanges left without bindings go too.
    fn remove_bindings_to(&self, t: &mut Topology, dest: &Destination) {
        let mut emptied = Vec::new();
        for x in t.exchanges.values_mut() {
            let before = x.bindings.len();
            if self.store.is_some() {
                for b in x.bindings.iter().filter(|b| &b.destination == dest) {
                    self.unstore_binding(&x.name, b);
                }
            }
            x.bindings.retain(|b| &b.destination != dest);
            if x.auto_delete && before > 0 && x.bindings.is_empty() {
                emptied.push(x.name.clone());
            }
        }
        for name in emptied {
            self.remove_exchange(t, &name);
        }
    }

    fn stored_binding(&self, source: &str, b: &Binding) -> StoredBinding {
        StoredBinding {
            vhost: self.name.to_string(),
            source: source.to_string(),
            destination: b.destination.clone(),
            routing_key: b.routing_key.clone(),
            arguments: b.arguments.clone(),
        }
    }

    /// Forgets a binding on disk; a binding that was never stored costs one lookup.
    fn unstore_binding(&self, source: &str, b: &Binding) {
        if let Some(store) = &self.store {
            if let Err(e) = store.delete_binding(&self.stored_binding(source, b)) {
                tracing::error!("cannot delete a binding from the store: {e}");
            }
        }
    }

    /// A binding survives a restart when both its ends do.
    fn binding_is_durable(&self, t: &Topology, source: &str, dest: &Destination) -> bool {
        let stored = |x: &ExchangeDef| x.durable && !x.auto_delete;
        let source_durable = t.exchanges.get(source).is_some_and(stored);
        let dest_durable = match dest {
            Destination::Queue(q) => t.queues.get(q).is_some_and(|q| q.store.is_some()),
            Destination::Exchange(x) => t.exchanges.get(x).is_some_and(stored),
        };
        self.store.is_some() && source_durable && dest_durable
    }

    fn locked(&self, q: &Queue) -> AmqpError {
        AmqpError::resource_locked(format!(
            "cannot obtain exclusive access to locked {}. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
            queue_name(&q.name, &self.name)
        ))
    }

    fn check_owner(&self, q: &Queue, connection: u64) -> AmqpResult<()> {
        match q.exclusive_owner {
            Some(owner) if owner != connection => Err(self.locked(q)),
            _ => Ok(()),
        }
    }

    /// Finds a queue the connection may use.
    pub fn queue(&self, name: &str, connection: u64) -> AmqpResult<Arc<Queue>> {
        let t = self.lock();
        let q = t
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| self.not_found_queue(name))?;
        self.check_owner(&q, connection)?;
        Ok(q)
    }

    /// Declares a queue; returns it with its message and consumer counts.
    /// Declares a queue: the queue, its message and consumer counts, and whether a
    /// durable queue was created (the reply then waits for a sync).
    pub fn declare_queue(&self, d: QueueDeclare<'_>) -> AmqpResult<(Arc<Queue>, u32, u32, bool)> {
        let mut t = self.lock();
        if let Some(q) = t.queues.get(d.name).cloned() {
            self.check_owner(&q, d.connection)?;
            if d.exclusive && !d.passive && q.exclusive_owner.is_none() {
                // RabbitMQ refuses exclusive access to a shared queue as a lock, not a mismatch.
                return Err(self.locked(&q));
            }
            if !d.passive {
                let what = queue_name(d.name, &self.name);
                for (arg, got, cur) in [
                    ("durable", d.durable, q.durable),
                    ("exclusive", d.exclusive, q.exclusive_owner.is_some()),
                    ("auto_delete", d.auto_delete, q.auto_delete),
                ] {
                    if got != cur {
                        return Err(AmqpError::precondition_failed(format!(
                            "inequivalent arg '{arg}' for {what}: received '{got}' but current is '{cur}'"
                        )));
                    }
                }
                check_queue_arguments(&what, d.arguments, &q.arguments)?;
            }
            q.touch();
            let (m, c) = q.counts();
            return Ok((q, m, c, false));
        }
        if d.passive {
            return Err(self.not_found_queue(d.name));
        }
        if d.name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "queue name '{}' contains reserved prefix 'amq.*'",
                d.name
            )));
        }
        let name: Arc<str> = if d.name.is_empty() {
            loop {
                let n = generated_name();
                if !t.queues.contains_key(n.as_str()) {
                    break n.into();
                }
            }
        } else {
            d.name.into()
        };
        let max = self.limits().queues;
        if reached(max, t.queues.len()) {
            return Err(AmqpError::precondition_failed(format!(
                "cannot declare queue '{name}': queue limit in vhost '{}' ({max}) is reached",
                self.name
            )));
        }
        let args = QueueArgs::parse(d.arguments, &name, &self.name)?;
        let quorum = d
            .arguments
            .inner()
            .get("x-queue-type")
            .and_then(crate::exchange::string_value)
            .is_some_and(|t| t == "quorum");
        if quorum && (!d.durable || d.exclusive || d.auto_delete) {
            let prop = if !d.durable {
                "non-durable"
            } else if d.exclusive {
                "exclusive"
            } else {
                "auto-delete"
            };
            return Err(AmqpError::precondition_failed(format!(
                "invalid property '{prop}' for {}",
                queue_name(&name, &self.name)
            )));
        }
        // Exclusive and auto-delete queues are gone after a restart, so they are never stored.
        let store = match &self.store {
            Some(store) if d.durable && !d.exclusive && !d.auto_delete => {
                let id = store.new_queue_id().map_err(internal)?;
                store
                    .put_queue(&StoredQueue {
                        vhost: self.name.to_string(),
                        name: name.to_string(),
                        id,
                        auto_delete: d.auto_delete,
                        arguments: d.arguments.clone(),
                    })
                    .map_err(internal)?;
                Some((store.clone(), id))
            }
            _ => None,
        };
        let durable = store.is_some();
        let q = Queue::new(
            name.clone(),
            d.durable,
            d.auto_delete,
            d.exclusive.then_some(d.connection),
            d.arguments.clone(),
            args,
            self.housekeeping.clone(),
            store,
            (self.queue_memory_budget, self.gauge.clone()),
        );
        t.queues.insert(name, q.clone());
        self.changed(&mut t);
        Ok((q, 0, 0, durable))
    }

    /// Deletes a queue. Its consumers are told through the returned `Cancellations`,
    /// which the caller fires after delete-ok, the order RabbitMQ's clients see.
    pub fn delete_queue(
        &self,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        connection: u64,
    ) -> AmqpResult<(u32, Cancellations, bool)> {
        let mut t = self.lock();
        let Some(q) = t.queues.get(name).cloned() else {
            // Deleting a queue that is not there succeeds, as in RabbitMQ 3.x.
            return Ok((0, Cancellations(Vec::new()), false));
        };
        self.check_owner(&q, connection)?;
        let (messages, consumers) = q.counts();
        if if_unused && consumers > 0 {
            return Err(AmqpError::precondition_failed(format!(
                "{} in use",
                queue_name(name, &self.name)
            )));
        }
        if if_empty && messages > 0 {
            return Err(AmqpError::precondition_failed(format!(
                "{} not empty",
                queue_name(name, &self.name)
            )));
        }
        let (count, consumers) = self.unlink_queue(&mut t, &q);
        Ok((count, Cancellations(consumers), q.store.is_some()))
    }

    fn remove_queue(&self, t: &mut Topology, q: &Arc<Queue>) -> u32 {
        let (count, consumers) = self.unlink_queue(t, q);
        notify_cancelled(consumers);
        count
    }

    fn unlink_queue(&self, t: &mut Topology, q: &Arc<Queue>) -> (u32, Vec<Arc<Consumer>>) {
        t.queues.remove(&q.name);
        if let Some((store, id)) = &q.store {
            if let Err(e) = store.delete_queue(&self.name, &q.name, *id) {
                tracing::error!(queue = %q.name, "cannot delete the queue from the store: {e}");
            }
        }
        self.remove_bindings_to(t, &Destination::Queue(q.name.clone()));
        self.changed(t);
        q.delete()
    }

    /// Deletes a queue if it is still this one (auto-delete after its last consumer).
    pub fn delete_queue_instance(&self, q: &Arc<Queue>) {
        let mut t = self.lock();
        if t.queues.get(&q.name).is_some_and(|cur| Arc::ptr_eq(cur, q)) {
            self.remove_queue(&mut t, q);
        }
    }

    /// Exclusive queues go with the connection that declared them.
    pub fn connection_closed(&self, connection: u64) {
        let mut t = self.lock();
        let owned: Vec<Arc<Queue>> = t
            .queues
            .values()
            .filter(|q| q.exclusive_owner == Some(connection))
            .cloned()
            .collect();
        for q in owned {
            self.remove_queue(&mut t, &q);
        }
    }

    pub fn bind(
        &self,
        source: &str,
        destination: Destination,
        routing_key: &str,
        arguments: &FieldTable,
        connection: u64,
    ) -> AmqpResult<bool> {
        let mut t = self.lock();
        self.check_binding(&t, source, &destination, connection)?;
        if t.exchanges
            .get(source)
            .is_some_and(|x| x.kind == ExchangeKind::Headers)
        {
            check_x_match(arguments)?;
        }
        let durable = self.binding_is_durable(&t, source, &destination);
        let binding = Binding {
            destination,
            routing_key: routing_key.to_string(),
            arguments: arguments.clone(),
        };
        let Some(x) = t.exchanges.get_mut(source) else {
            return Err(self.not_found_exchange(source));
        };
        if x.bindings.contains(&binding) {
            return Ok(false);
        }
        let max = self.limits().bindings;
        if reached(max, x.bindings.len()) {
            return Err(AmqpError::precondition_failed(format!(
                "cannot bind to {}: binding limit ({max}) is reached",
                exchange_name(source, &self.name)
            )));
        }
        if let (true, Some(store)) = (durable, &self.store) {
            store
                .put_binding(&self.stored_binding(source, &binding))
                .map_err(internal)?;
        }
        x.bindings.push(binding);
        self.changed(&mut t);
        Ok(durable)
    }

    pub fn unbind(
        &self,
        source: &str,
        destination: Destination,
        routing_key: &str,
        arguments: &FieldTable,
        connection: u64,
    ) -> AmqpResult<bool> {
        // RabbitMQ 3.10 (rabbit_binding:remove): the default exchange is refused at
        // either end, but a missing source or destination, or a binding that is not
        // there, is simply nothing to remove; exclusive access is checked only when
        // there is a binding to remove. Teardown code (aio-pika's RPC among it)
        // unbinds what may already be gone.
        if matches!(&destination, Destination::Exchange(x) if x.is_empty()) || source.is_empty() {
            return Err(default_exchange_refused());
        }
        let mut t = self.lock();
        let matches = |b: &Binding| {
            b.destination == destination
                && b.routing_key == routing_key
                && &b.arguments == arguments
        };
        let dest_exists = match &destination {
            Destination::Queue(q) => t.queues.contains_key(q),
            Destination::Exchange(x) => t.exchanges.contains_key(x),
        };
        let bound = dest_exists
            && t.exchanges
                .get(source)
                .is_some_and(|x| x.bindings.iter().any(&matches));
        if !bound {
            return Ok(false);
        }
        self.check_binding(&t, source, &destination, connection)?;
        let durable = self.binding_is_durable(&t, source, &destination);
        let Some(x) = t.exchanges.get_mut(source) else {
            return Ok(false);
        };
        let before = x.bindings.len();
        if let Some(b) = x.bindings.iter().find(|b| matches(b)) {
            if let Some(store) = &self.store {
                store
                    .delete_binding(&self.stored_binding(source, b))
                    .map_err(internal)?;
            }
        }
        x.bindings.retain(|b| !matches(b));
        let removed = x.bindings.len() != before;
        if removed {
            if x.auto_delete && x.bindings.is_empty() {
                let name = x.name.clone();
                self.remove_exchange(&mut t, &name);
            }
            self.changed(&mut t);
        }
        Ok(removed && durable)
    }

    fn check_binding(
        &self,
        t: &Topology,
        source: &str,
        destination: &Destination,
        connection: u64,
    ) -> AmqpResult<()> {
        match destination {
            Destination::Queue(q) => {
                let queue = t.queues.get(q).ok_or_else(|| self.not_found_queue(q))?;
                self.check_owner(queue, connection)?;
            }
            Destination::Exchange(x) => {
                if x.is_empty() {
                    return Err(default_exchange_refused());
                }
                if !t.exchanges.contains_key(x) {
                    return Err(self.not_found_exchange(x));
                }
            }
        }
        if source.is_empty() {
            return Err(default_exchange_refused());
        }
        if !t.exchanges.contains_key(source) {
            return Err(self.not_found_exchange(source));
        }
        Ok(())
    }
}

/// A headers binding's x-match must be one RabbitMQ knows.
fn check_x_match(arguments: &FieldTable) -> AmqpResult<()> {
    let Some(v) = arguments.inner().get("x-match") else {
        return Ok(());
    };
    let text = crate::exchange::string_value(v);
    match text.as_deref() {
        Some("all" | "any" | "all-with-x" | "any-with-x") => Ok(()),
        _ => Err(AmqpError::precondition_failed(format!(
            "Invalid x-match field value <<\"{}\">>; expected all, any, all-with-x, or any-with-x",
            text.unwrap_or_default()
        ))),
    }
}

fn internal(e: crate::store::StoreError) -> AmqpError {
    tracing::error!("{e}");
    AmqpError::internal_error(format!("store failure: {e}"))
}

/// Consumers of a deleted queue, to be told once the deleting channel has replied.
pub struct Cancellations(Vec<Arc<Consumer>>);

impl Cancellations {
    pub fn notify(self) {
        notify_cancelled(self.0);
    }
}

/// Tells each consumer's channel that its queue is gone (consumer cancel notify).
fn notify_cancelled(consumers: Vec<Arc<Consumer>>) {
    for c in consumers {
        c.channel.consumer_cancelled(&c.tag);
    }
}

/// The queue arguments RabbitMQ checks for equivalence on redeclare.
fn check_queue_arguments(what: &str, got: &FieldTable, cur: &FieldTable) -> AmqpResult<()> {
    check_arguments(what, QUEUE_CHECKED, got, cur)
}

/// The queue arguments RabbitMQ compares on redeclare.
const QUEUE_CHECKED: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
];

/// The exchange arguments RabbitMQ compares on redeclare.
const EXCHANGE_CHECKED: &[&str] = &["alternate-exchange"];

fn check_arguments(
    what: &str,
    keys: &[&str],
    got: &FieldTable,
    cur: &FieldTable,
) -> AmqpResult<()> {
    for key in keys {
        let a = got.inner().get(*key);
        let b = cur.inner().get(*key);
        let same = match (a, b) {
            (None, None) => true,
            (Some(x), Some(y)) => value_eq(x, y),
            // RabbitMQ treats an absent x-queue-type as the default, classic.
            (Some(x), None) | (None, Some(x)) if *key == "x-queue-type" => {
                crate::exchange::string_value(x).as_deref() == Some("classic")
            }
            _ => false,
        };
        if !same {
            // RabbitMQ's form: `'20'` when both sides have a value, otherwise
            // `the value '20' of type 'signedint'` against `none`.
            let both = a.is_some() && b.is_some();
            let show = |v: Option<&AMQPValue>| match v {
                None => "none".to_string(),
                Some(v) if both => format!("'{}'", display_value(v)),
                Some(v) => format!(
                    "the value '{}' of type '{}'",
                    display_value(v),
                    type_name(v)
                ),
            };
            return Err(AmqpError::precondition_failed(format!(
                "inequivalent arg '{key}' for {what}: received {} but current is {}",
                show(a),
                show(b)
            )));
        }
    }
    Ok(())
}

/// RabbitMQ's names for field table value types.
pub(crate) fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

fn value_eq(a: &AMQPValue, b: &AMQPValue) -> bool {
    use crate::exchange::{int_value, string_value};
    match (int_value(a), int_value(b)) {
        (Some(x), Some(y)) => x == y,
        _ => match (string_value(a), string_value(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

fn display_value(v: &AMQPValue) -> String {
    use crate::exchange::{int_value, string_value};
    if let Some(n) = int_value(v) {
        return n.to_string();
    }
    if let Some(s) = string_value(v) {
        return s;
    }
    format!("{v:?}")
}

/// `amq.gen-` and 22 URL-safe base64 characters, like RabbitMQ's server-named queues.
fn generated_name() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let state = RandomState::new();
    let a = state.hash_one(n);
    let b = state.hash_one(!n);
    let mut bits = ((a as u128) << 64) | b as u128;
    let mut s = String::from("amq.gen-");
    for _ in 0..22 {
        s.push(ALPHABET[(bits & 63) as usize] as char);
        bits >>= 6;
    }
    s
}

/// Dead letters and timers for one vhost, off every publisher's and queue's path.
async fn housekeeper(vhost: Weak<Vhost>, mut rx: UnboundedReceiver<Housekeeping>) {
    // One wake-up per queue (its earliest); the heap may hold superseded entries,
    // which are skipped when they come up and dropped whenever they outnumber the
    // live ones, so that queues deleted with far-off timers cost nothing.
    let mut timers: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut waiting: HashMap<usize, (u64, Weak<Queue>)> = HashMap::new();
    loop {
        if timers.len() > 1024 && timers.len() > 2 * waiting.len() {
            waiting.retain(|_, (_, q)| q.strong_count() > 0);
            timers = waiting
                .iter()
                .map(|(key, (at, _))| Reverse((*at, *key)))
                .collect();
        }
        let next = timers.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            msg = rx.recv() => match msg {
                None => return,
                Some(Housekeeping::DeadLetter(dl)) => {
                    let Some(v) = vhost.upgrade() else { return };
                    v.route_dead_letter(dl);
                }
                Some(Housekeeping::Wake(q, at)) => {
                    let key = Weak::as_ptr(&q) as usize;
                    waiting.insert(key, (at, q));
                    timers.push(Reverse((at, key)));
                }
            },
            _ = tokio::time::sleep_until(at_instant(next.unwrap_or(0)).into()), if next.is_some() => {
                let now = crate::queue::now_ms();
                while let Some(Reverse((at, key))) = timers.peek().copied() {
                    if at > now {
                        break;
                    }
                    timers.pop();
                    if waiting.get(&key).is_none_or(|(due, _)| *due != at) {
                        continue;
                    }
                    let Some(q) = waiting.remove(&key).and_then(|(_, w)| w.upgrade()) else { continue };
                    if q.on_wake(at) {
                        let Some(v) = vhost.upgrade() else { return };
                        v.delete_queue_instance(&q);
                    }
                }
            }
        }
    }
}

impl Vhost {
    fn route_dead_letter(&self, mut dl: DeadLetter) {
        self.publish_dead_letter(&dl);
        dl.forget_source();
    }

    fn publish_dead_letter(&self, dl: &DeadLetter) {
        // As rabbit_dead_letter:make_msg: with x-dead-letter-routing-key the dead
        // letter goes by that key alone (and loses its CC header); without, by every
        // key the message was published with, CC and BCC ones included.
        let routing_key: Arc<str> = dl
            .routing_key
            .clone()
            .unwrap_or_else(|| dl.msg.routing_key.clone());
        let mut keys: Vec<&str> = vec![&routing_key];
        if dl.routing_key.is_none() {
            keys.extend(dl.msg.extra_keys.iter().map(|k| &**k));
        }
        let properties = with_x_death(dl);
        let deaths = x_deaths(&properties);
        let msg = Arc::new(
            dl.msg
                .republish(dl.exchange.clone(), routing_key.clone(), properties),
        );
        let Routed::Queues(queues) =
            self.routing()
                .route(&dl.exchange, &keys, msg.properties.headers().as_ref())
        else {
            return;
        };
        for q in queues {
            if dl.reason != "rejected" && is_cycle(&q.name, &deaths) {
                tracing::debug!(queue = %q.name, "dead letter dropped: it would cycle");
                continue;
            }
            q.publish(msg.clone());
        }
    }
}

/// RabbitMQ's rule (rabbit_dead_letter:is_cycle): walk the x-death entries, newest
/// first, up to the first one for `queue`; that stretch is a cycle unless some entry
/// in it is a rejection or is not a table the broker wrote. Entries further back,
/// whatever a client put there, do not matter: the broker's own entries always go in
/// front, so a forged header cannot hide a cycle the broker itself made.
fn is_cycle(queue: &str, deaths: &[Option<(String, String)>]) -> bool {
    let Some(end) = deaths
        .iter()
        .position(|d| d.as_ref().is_some_and(|(q, _)| q == queue))
    else {
        return false;
    };
    deaths[..=end]
        .iter()
        .all(|d| d.as_ref().is_some_and(|(_, reason)| reason != "rejected"))
}

/// (queue, reason) of each x-death entry, None for an entry that is not a table of those.
fn x_deaths(p: &BasicProperties) -> Vec<Option<(String, String)>> {
    let Some(headers) = p.headers() else {
        return Vec::new();
    };
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return Vec::new();
    };
    deaths
        .as_slice()
        .iter()
        .map(|d| match d {
            AMQPValue::FieldTable(t) => {
                let field = |k: &str| match t.inner().get(k) {
                    Some(AMQPValue::LongString(s)) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                };
                // No queue can be named "": a missing field matches no queue.
                Some((
                    field("queue").unwrap_or_default(),
                    field("reason").unwrap_or_default(),
                ))
            }
            _ => None,
        })
        .collect()
}

/// The message's properties with RabbitMQ's x-death bookkeeping updated.
fn with_x_death(dl: &DeadLetter) -> BasicProperties {
    let old = &dl.msg.properties;
    let mut headers = old.headers().clone().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |v: &AMQPValue| match v {
        AMQPValue::FieldTable(t) => {
            t.inner()
                .get("queue")
                .and_then(crate::exchange::string_value)
                .as_deref()
                == Some(&*dl.queue)
                && t.inner()
                    .get("reason")
                    .and_then(crate::exchange::string_value)
                    .as_deref()
                    == Some(dl.reason)
        }
        _ => false,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let entry = match deaths.iter().position(same) {
        Some(i) => {
            let mut t = match deaths.remove(i) {
                AMQPValue::FieldTable(t) => t,
                _ => FieldTable::default(),
            };
            // A client may have put any count there: it saturates, never wraps.
            let count = t
                .inner()
                .get("count")
                .and_then(crate::exchange::int_value)
                .unwrap_or(0)
                .clamp(0, i64::MAX as i128) as i64;
            t.insert(
                ShortString::from("count"),
                AMQPValue::LongLongInt(count.saturating_add(1)),
            );
            t.insert(ShortString::from("time"), AMQPValue::Timestamp(now));
            t
        }
        None => {
            let mut t = FieldTable::default();
            t.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
            t.insert(ShortString::from("reason"), text(dl.reason));
            t.insert(ShortString::from("queue"), text(&dl.queue));
            t.insert(ShortString::from("time"), AMQPValue::Timestamp(now));
            t.insert(ShortString::from("exchange"), text(&dl.msg.exchange));
            // The publish's key, then the CC keys (BCC ones were never kept).
            let mut keys = FieldArray::default();
            keys.push(text(&dl.msg.routing_key));
            if let Ok(cc) = crate::message::header_routes(old.headers().as_ref(), &["CC"]) {
                for k in cc {
                    keys.push(text(&k));
                }
            }
            t.insert(
                ShortString::from("routing-keys"),
                AMQPValue::FieldArray(keys),
            );
            if let Some(e) = old.expiration() {
                t.insert(ShortString::from("original-expiration"), text(e.as_str()));
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    let mut array = FieldArray::default();
    for d in deaths {
        array.push(d);
    }
    headers.insert(ShortString::from("x-death"), AMQPValue::FieldArray(array));
    if dl.routing_key.is_some() {
        headers = crate::channel::without(&headers, "CC");
    }
    for (key, value) in [
        ("x-first-death-reason", dl.reason),
        ("x-first-death-queue", &*dl.queue),
        ("x-first-death-exchange", &*dl.msg.exchange),
    ] {
        if !headers.contains_key(key) {
            headers.insert(ShortString::from(key), text(value));
        }
    }
    // The expiration goes: a dead letter must not expire again for the same reason.
    let mut p = BasicProperties::default();
    if let Some(v) = old.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = old.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    p = p.with_headers(headers);
    if let Some(v) = old.delivery_mode() {
        p = p.with_delivery_mode(*v);
    }
    if let Some(v) = old.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = old.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = old.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = old.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = old.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = old.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = old.user_id() {
        p = p.with_user_id(v.clone());
    }
    if let Some(v) = old.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = old.cluster_id() {
        p = p.with_cluster_id(v.clone());
    }
    p
}
