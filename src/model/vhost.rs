//! A virtual host: its topology (exchanges, queues, bindings), the one place
//! where that topology changes, and the tasks that serve it (housekeeping,
//! direct reply-to).
//!
//! Publishers read the topology lock-free: it is an immutable [`Topology`] value
//! behind an atomic pointer, replaced whole by each change. Changes are
//! serialised by one mutex that no publisher takes; each builds the next value
//! from the current one at the cost of what it touches, persists what must
//! survive a restart and tells the listeners, all before the client is answered.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use amq_protocol::types::{AMQPValue, FieldTable};
use arc_swap::{ArcSwap, Guard};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::bindings::Bindings;
use super::change::{
    Actor, Applied, BindingEvent, BindingSpec, Cancellations, Change, Event, ExchangeSpec, Outcome,
    QueueSpec, TopologyListener,
};
use super::dead_letter::DeadLetter;
use super::delayed::{Delayed, Release, Waiting};
use super::exchange::{self, Destination, Exchange, ExchangeDef};
use super::housekeeper::{housekeeper, Keeper};
use super::message::{MemoryGauge, Message};
use super::persist::StoreTopology;
use super::pmap::PMap;
use super::policy::{self, Policy, Target};
use super::queue::{Housekeeping, Queue, QueueArgs};
use super::topology::{Delays, Routed, Topology};
use super::values::{display_value, string_value, type_name, value_eq};
use crate::error::{exchange_name, queue_name, AmqpError, AmqpResult};
use crate::store::Store;

/// The queue name RPC clients consume from and put in reply_to (direct reply-to).
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// How many entities clients may create here; None is unlimited (and 0 allows
/// none, as RabbitMQ's vhost limits). Recovery and the predeclared exchanges are
/// not held to them.
#[derive(Debug, Clone, Copy, Default)]
pub struct VhostLimits {
    pub queues: Option<usize>,
    pub exchanges: Option<usize>,
    /// Bindings whose source is one exchange.
    pub bindings: Option<usize>,
}

fn reached(limit: Option<usize>, count: usize) -> Option<usize> {
    limit.filter(|l| count >= *l)
}

pub struct Vhost {
    pub name: Arc<str>,
    topology: ArcSwap<Topology>,
    writer: Mutex<Writer>,
    pub(super) housekeeping: UnboundedSender<Housekeeping>,
    housekeeping_rx: Mutex<Option<UnboundedReceiver<Housekeeping>>>,
    /// Where durable entities and persistent messages go; None runs purely in memory.
    pub store: Option<Arc<dyn Store>>,
    pub(super) gauge: Arc<MemoryGauge>,
    pub(super) queue_memory_budget: usize,
    /// Direct reply-to: the pseudo-queue behind each `amq.rabbitmq.reply-to.*`
    /// name, read lock-free by replies. Only such names look here.
    reply_to: ArcSwap<PMap<Arc<str>, Weak<Queue>>>,
    limits: Mutex<VhostLimits>,
    /// Message counts of the connections to this vhost that have closed (the
    /// open ones keep their own), and the last rates of the vhost's total.
    pub closed_counts: super::stats::MessageCounts,
    pub rates: super::stats::Rates<11>,
    /// Messages waiting in this vhost's delayed-message exchanges.
    pub delayed: Arc<Delayed>,
}

impl Drop for Vhost {
    fn drop(&mut self) {
        self.delayed.close();
    }
}

/// What only the changing side needs, under the writer mutex.
#[derive(Default)]
pub(super) struct Writer {
    /// Exclusive queues by owning connection, to drop them when it closes.
    exclusive: HashMap<u64, Vec<Arc<str>>>,
    pub(super) bindings: Bindings,
    listeners: Vec<Arc<dyn TopologyListener>>,
    /// This vhost's policies; declarations made meanwhile wait for a change.
    policies: Vec<Policy>,
}

/// What a queue is, as policies' apply-to sees it.
fn policy_target(arguments: &FieldTable) -> Target {
    match arguments.inner().get("x-queue-type").and_then(string_value) {
        Some(t) if t == "quorum" => Target::QuorumQueue,
        _ => Target::ClassicQueue,
    }
}

/// One change being built: the next topology and what happened on the way.
/// Validation comes first in every change, so a change that fails has touched
/// neither the draft nor the writer's state.
struct Draft<'a> {
    vhost: &'a Vhost,
    t: Topology,
    events: Vec<Event>,
    w: &'a mut Writer,
}

fn default_exchange_refused() -> AmqpError {
    AmqpError::access_refused("operation not permitted on the default exchange".into())
}

/// The exchanges every vhost has.
const PREDECLARED: &[(&str, &str, bool)] = &[
    ("amq.direct", "direct", false),
    ("amq.fanout", "fanout", false),
    ("amq.topic", "topic", false),
    ("amq.headers", "headers", false),
    ("amq.match", "headers", false),
    ("amq.rabbitmq.trace", "topic", true),
];

impl Vhost {
    pub fn new(
        name: &str,
        store: Option<Arc<dyn Store>>,
        gauge: Arc<MemoryGauge>,
        queue_memory_budget: usize,
    ) -> Vhost {
        let (housekeeping, rx) = unbounded_channel();
        let mut t = Topology::default();
        for (name, kind, internal) in PREDECLARED {
            if let Some(kind) = exchange::by_name(kind) {
                let def =
                    ExchangeDef::new(name, kind, (true, false, *internal), FieldTable::default());
                t.exchanges
                    .insert((*name).into(), Arc::new(Exchange::new(def)));
            }
        }
        let listeners: Vec<Arc<dyn TopologyListener>> = match &store {
            Some(s) => vec![Arc::new(StoreTopology(s.clone()))],
            None => Vec::new(),
        };
        Vhost {
            name: name.into(),
            topology: ArcSwap::from_pointee(t),
            writer: Mutex::new(Writer {
                listeners,
                ..Writer::default()
            }),
            housekeeping,
            housekeeping_rx: Mutex::new(Some(rx)),
            store,
            gauge,
            queue_memory_budget,
            reply_to: ArcSwap::from_pointee(PMap::new()),
            limits: Mutex::new(VhostLimits::default()),
            closed_counts: Default::default(),
            rates: Default::default(),
            delayed: Default::default(),
        }
    }

    /// The current topology, without a lock. A publisher routes on the value it
    /// loaded; a change made meanwhile shows in the next load.
    pub fn topology(&self) -> Guard<Arc<Topology>> {
        self.topology.load()
    }

    /// At start-up and on reload.
    pub fn set_limits(&self, limits: VhostLimits) {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
    }

    fn limits(&self) -> VhostLimits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces this vhost's policies and applies them to every queue and exchange
    /// (start-up and reload); later declarations get them as they are made.
    pub fn set_policies(&self, policies: Vec<Policy>) {
        let mut w = self.lock_writer();
        w.policies = policies;
        let t = self.topology.load_full();
        for q in t.queues.values() {
            q.apply_policy(policy::matching(
                &w.policies,
                &q.name,
                policy_target(&q.arguments),
            ));
        }
        let mut changed = Vec::new();
        for (name, x) in t.exchanges.iter() {
            let wanted = exchange_alternate(&w.policies, &x.def);
            if wanted != x.def.alternate {
                changed.push((name.clone(), Arc::new(x.with_alternate(wanted))));
            }
        }
        if !changed.is_empty() {
            let mut next = (*t).clone();
            for (name, x) in changed {
                next.exchanges.insert(name, x);
            }
            self.topology.store(Arc::new(next));
        }
    }

    /// Replaces the topology as a whole: recovery, before any client.
    pub(super) fn replace(&self, t: Topology) {
        self.topology.store(Arc::new(t));
    }

    pub fn not_found_exchange(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no {}", exchange_name(name, &self.name)))
    }

    pub fn not_found_queue(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no {}", queue_name(name, &self.name)))
    }

    /// Applies one change: validates it against the current topology, swaps in the
    /// changed topology, persists it and tells the listeners. A change that fails
    /// validation changes nothing.
    pub fn apply(&self, change: Change, actor: Actor) -> AmqpResult<Applied> {
        let mut w = self.lock_writer();
        let mut d = self.draft(&mut w);
        let outcome = match change {
            Change::DeclareExchange(spec) => d.declare_exchange(spec)?,
            Change::DeleteExchange { name, if_unused } => d.delete_exchange(&name, if_unused)?,
            Change::DeclareQueue(spec) => d.declare_queue(spec, actor)?,
            Change::DeleteQueue {
                name,
                if_unused,
                if_empty,
            } => d.delete_queue(&name, if_unused, if_empty, actor)?,
            Change::Bind(spec) => d.bind(spec, actor)?,
            Change::Unbind(spec) => d.unbind(spec, actor)?,
            Change::Purge { queue } => d.purge(&queue, actor)?,
        };
        let (t, events) = (d.t, d.events);
        let durable = self.commit(t, events, &w)?;
        Ok(Applied { outcome, durable })
    }

    /// Deletes every queue (their messages with them, consumers told) and every
    /// exchange but the predeclared ones: the vhost is being deleted.
    pub fn delete_everything(&self) {
        let t = self.topology();
        let queues: Vec<Arc<str>> = t.queues.keys().cloned().collect();
        let exchanges: Vec<Arc<str>> = t
            .exchanges
            .keys()
            .filter(|n| !n.starts_with("amq."))
            .cloned()
            .collect();
        drop(t);
        for name in queues {
            let change = Change::DeleteQueue {
                name: name.to_string(),
                if_unused: false,
                if_empty: false,
            };
            if let Ok(Applied {
                outcome: Outcome::QueueDeleted { cancellations, .. },
                ..
            }) = self.apply(change, Actor::Operator)
            {
                cancellations.notify();
            }
        }
        for name in exchanges {
            let _ = self.apply(
                Change::DeleteExchange {
                    name: name.to_string(),
                    if_unused: false,
                },
                Actor::Operator,
            );
        }
    }

    /// Every binding in this vhost (a snapshot, for listings).
    pub fn bindings(&self) -> Vec<(Arc<str>, Destination, Arc<str>, FieldTable)> {
        self.lock_writer().bindings.all()
    }

    /// Whether the entity a declaration names exists already (so that applying it
    /// would create nothing). Other changes: false.
    pub fn declares_existing(&self, change: &Change) -> bool {
        match change {
            Change::DeclareExchange(x) => self.topology().exchanges.contains_key(x.name.as_str()),
            Change::DeclareQueue(q) => self.topology().queues.contains_key(q.name.as_str()),
            Change::Bind(b) => self.lock_writer().bindings.has(
                &b.source,
                &b.destination,
                &b.routing_key,
                &b.arguments,
            ),
            _ => false,
        }
    }

    /// A change starting from the current topology.
    fn draft<'a>(&'a self, w: &'a mut Writer) -> Draft<'a> {
        Draft {
            vhost: self,
            t: (**self.topology.load()).clone(),
            events: Vec::new(),
            w,
        }
    }

    /// Swaps in a draft's topology and tells the listeners what changed.
    fn commit(&self, t: Topology, events: Vec<Event>, w: &Writer) -> AmqpResult<bool> {
        if events.is_empty() {
            return Ok(false);
        }
        self.topology.store(Arc::new(t));
        for e in &events {
            if let Event::ExchangeDeleted(x) = e {
                if x.is_delayed() {
                    self.delayed.forget_exchange(&x.name);
                }
            }
        }
        let mut durable = false;
        for l in &w.listeners {
            durable |= l.changed(&self.name, &events).map_err(|e| {
                tracing::error!(vhost = %self.name, "a topology change was not persisted: {e}");
                AmqpError::internal_error(format!("store failure: {e}"))
            })?;
        }
        Ok(durable)
    }

    /// Applies a removal the broker decides on (exclusive owner gone, auto-delete,
    /// x-expires): nobody waits for it, so a store failure is only logged.
    fn remove_queue_now(&self, q: &Arc<Queue>) {
        let mut w = self.lock_writer();
        let mut d = self.draft(&mut w);
        if !d
            .t
            .queues
            .get(&q.name)
            .is_some_and(|cur| Arc::ptr_eq(cur, q))
        {
            return;
        }
        let (_, cancellations) = d.unlink_queue(q);
        let (t, events) = (d.t, d.events);
        let _ = self.commit(t, events, &w);
        drop(w);
        cancellations.notify();
    }

    /// Finds a queue the actor may use.
    pub fn queue(&self, name: &str, actor: Actor) -> AmqpResult<Arc<Queue>> {
        let t = self.topology();
        let q = t
            .queue(name)
            .cloned()
            .ok_or_else(|| self.not_found_queue(name))?;
        self.check_owner(&q, actor)?;
        Ok(q)
    }

    fn locked(&self, q: &Queue) -> AmqpError {
        AmqpError::resource_locked(format!(
            "cannot obtain exclusive access to locked {}. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
            queue_name(&q.name, &self.name)
        ))
    }

    fn check_owner(&self, q: &Queue, actor: Actor) -> AmqpResult<()> {
        match (q.exclusive_owner, actor) {
            (Some(owner), Actor::Connection(c)) if owner != c => Err(self.locked(q)),
            _ => Ok(()),
        }
    }

    /// Deletes a queue if it is still this one (auto-delete after its last
    /// consumer, x-expires).
    pub fn delete_queue_instance(&self, q: &Arc<Queue>) {
        self.remove_queue_now(q);
    }

    /// Exclusive queues go with the connection that declared them.
    pub fn connection_closed(&self, connection: u64) {
        let names = self
            .lock_writer()
            .exclusive
            .remove(&connection)
            .unwrap_or_default();
        for name in names {
            let q = self.topology().queue(&name).cloned();
            if let Some(q) = q.filter(|q| q.exclusive_owner == Some(connection)) {
                self.remove_queue_now(&q);
            }
        }
    }

    /// A pseudo-queue for a direct reply-to consumer, reachable only by its name.
    pub fn new_reply_queue(&self) -> Arc<Queue> {
        let name: Arc<str> = format!("{REPLY_TO}.{}", &generated_name()["amq.gen-".len()..]).into();
        let q = Queue::new(
            name.clone(),
            false,
            false,
            None,
            FieldTable::default(),
            QueueArgs::default(),
            self.housekeeping.clone(),
            None,
            (self.queue_memory_budget, self.gauge.clone()),
        );
        let weak = Arc::downgrade(&q);
        self.reply_to.rcu(|m| {
            let mut m = PMap::clone(m);
            m.insert(name.clone(), weak.clone());
            m
        });
        q
    }

    /// The reply pseudo-queue behind an `amq.rabbitmq.reply-to.*` routing key, if
    /// its consumer is still there.
    pub fn reply_queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.reply_to.load().get(name).and_then(|w| w.upgrade())
    }

    pub fn drop_reply_queue(&self, name: &str) {
        self.reply_to.rcu(|m| {
            let mut m = PMap::clone(m);
            m.remove(name);
            m
        });
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
            tokio::spawn(super::delayed::run(
                Arc::downgrade(self),
                self.delayed.clone(),
            ));
        }
    }

    /// Holds a routed message at the delayed exchanges its `x-delay` stops it at.
    /// Returns whether a copy went to the store (a confirm waits for the sync).
    pub fn delay(&self, delays: &Delays, msg: &Arc<Message>) -> bool {
        let mut stored = false;
        for x in &delays.exchanges {
            stored |= self
                .delayed
                .add(&x.def, delays.delay, msg.clone(), self.store.as_ref());
        }
        stored
    }
}

impl Release for Vhost {
    /// A delayed message's time is up: it is routed from the exchange that held
    /// it, its x-delay negated (so that it is not held again), and its stored
    /// copy goes once the queues it reaches have theirs.
    fn release(&self, w: Waiting) {
        let msg = match super::exchange::delayed::header_after_delay(&w.msg.header, w.delay)
            .and_then(|h| {
                let properties = crate::protocol::decode_stored_header(&h)?.properties;
                Some((h, properties))
            }) {
            Some((header, properties)) => {
                let mut m = w.msg.republish_with_header(
                    w.msg.exchange.clone(),
                    w.msg.routing_key.clone(),
                    header,
                    properties,
                );
                m.extra_keys = w.msg.extra_keys.clone();
                Arc::new(m)
            }
            None => w.msg.clone(),
        };
        let mut keys: Vec<&str> = vec![&msg.routing_key];
        keys.extend(msg.extra_keys.iter().map(|k| &**k));
        let headers = msg.properties.headers().as_ref();
        for q in self
            .topology()
            .route_from(&w.exchange, &keys, headers)
            .unwrap_or_default()
        {
            q.publish(msg.clone());
        }
        if let Some((store, id, seq)) = w.stored {
            store.delete_message(id, seq);
        }
    }
}

impl Keeper for Vhost {
    /// Routes a dead letter and hands it to the queues it reaches; then its
    /// source copy goes. The copy at the destination is stored before the
    /// source's is deleted, so a crash in between duplicates, never loses.
    fn dead_letter(&self, mut dl: DeadLetter) {
        let r = dl.republished();
        let keys: Vec<&str> = r.keys.iter().map(|k| &**k).collect();
        let headers = r.msg.properties.headers().as_ref();
        if let Routed::Queues(queues, delays) = self.topology().route(&dl.exchange, &keys, headers)
        {
            for q in queues {
                if r.may_enter(&q.name) {
                    q.publish(r.msg.clone());
                } else {
                    tracing::debug!(queue = %q.name, "dead letter dropped: it would cycle");
                }
            }
            // A dead letter with a positive x-delay waits too, as in RabbitMQ.
            self.delay(&delays, &r.msg);
        }
        dl.forget_source();
    }

    fn expired(&self, q: &Arc<Queue>) {
        self.remove_queue_now(q);
    }
}

impl Draft<'_> {
    fn declare_exchange(&mut self, d: ExchangeSpec) -> AmqpResult<Outcome> {
        let vhost = self.vhost;
        if d.passive {
            // RabbitMQ checks the default exchange before looking it up: 403.
            if d.name.is_empty() {
                return Err(default_exchange_refused());
            }
            if self.t.exchanges.contains_key(d.name.as_str()) {
                return Ok(Outcome::Done);
            }
            return Err(vhost.not_found_exchange(&d.name));
        }
        let Some(kind) = exchange::by_name(&d.kind) else {
            return Err(AmqpError::command_invalid(format!(
                "unknown exchange type '{}'",
                d.kind
            )));
        };
        if d.name.is_empty() {
            return Err(default_exchange_refused());
        }
        if let Some(x) = self.t.exchanges.get(d.name.as_str()) {
            let x = &x.def;
            let what = exchange_name(&d.name, &vhost.name);
            let check = |arg: &str, got: String, cur: String| -> AmqpResult<()> {
                if got != cur {
                    return Err(AmqpError::precondition_failed(format!(
                        "inequivalent arg '{arg}' for {what}: received '{got}' but current is '{cur}'"
                    )));
                }
                Ok(())
            };
            check("type", kind.name.into(), x.kind.name.into())?;
            check("durable", d.durable.to_string(), x.durable.to_string())?;
            check(
                "auto_delete",
                d.auto_delete.to_string(),
                x.auto_delete.to_string(),
            )?;
            check("internal", d.internal.to_string(), x.internal.to_string())?;
            check_arguments(&what, EXCHANGE_CHECKED, &d.arguments, &x.arguments)?;
            return Ok(Outcome::Done);
        }
        if d.name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                d.name
            )));
        }
        // rabbit_channel checks the alternate exchange's type for a new exchange.
        if let Some(v) = d.arguments.inner().get("alternate-exchange") {
            if super::values::string_value(v).is_none() {
                return Err(AmqpError::precondition_failed(format!(
                    "invalid type '{}' for arg 'alternate-exchange' in {}",
                    super::values::type_name(v),
                    exchange_name(&d.name, &vhost.name)
                )));
            }
        }
        if let Some(max) = reached(vhost.limits().exchanges, self.t.exchanges.len()) {
            return Err(AmqpError::precondition_failed(format!(
                "cannot declare exchange '{}': exchange limit in vhost '{}' ({max}) is reached",
                d.name, vhost.name
            )));
        }
        if kind == &exchange::delayed::TYPE {
            exchange::delayed::routes_as(&d.arguments)?;
        }
        let mut def = ExchangeDef::new(
            &d.name,
            kind,
            (d.durable, d.auto_delete, d.internal),
            d.arguments,
        );
        def.alternate = exchange_alternate(&self.w.policies, &def);
        if def.is_delayed() && def.is_stored() {
            // Its waiting messages are kept under an id of their own, as a queue's.
            if let Some(store) = &vhost.store {
                let id = store.new_queue_id().map_err(|e| {
                    tracing::error!("{e}");
                    AmqpError::internal_error(format!("store failure: {e}"))
                })?;
                def.messages_id = Some(id);
            }
        }
        let x = Exchange::new(def);
        self.events.push(Event::ExchangeDeclared(x.def.clone()));
        self.t.exchanges.insert(x.def.name.clone(), Arc::new(x));
        Ok(Outcome::Done)
    }

    fn delete_exchange(&mut self, name: &str, if_unused: bool) -> AmqpResult<Outcome> {
        let vhost = self.vhost;
        if name.is_empty() {
            return Err(default_exchange_refused());
        }
        if name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "deletion of system {} not allowed",
                exchange_name(name, &vhost.name)
            )));
        }
        if !self.t.exchanges.contains_key(name) {
            // Deleting an exchange that is not there succeeds, as in RabbitMQ 3.x.
            return Ok(Outcome::Done);
        }
        if if_unused && self.w.bindings.count(name) > 0 {
            return Err(AmqpError::precondition_failed(format!(
                "{} in use",
                exchange_name(name, &vhost.name)
            )));
        }
        self.remove_exchanges(vec![name.into()]);
        Ok(Outcome::Done)
    }

    /// Whether a destination survives a restart.
    fn stored(&self, dest: &Destination) -> bool {
        match dest {
            Destination::Queue(q) => self.t.queues.get(q).is_some_and(|q| q.store.is_some()),
            Destination::Exchange(x) => self.t.exchanges.get(x).is_some_and(|x| x.def.is_stored()),
        }
    }

    fn binding_event(
        &self,
        source: &Exchange,
        dest: &Destination,
        key: &Arc<str>,
        args: &FieldTable,
    ) -> BindingEvent {
        BindingEvent {
            source: source.def.name.clone(),
            destination: dest.clone(),
            routing_key: key.clone(),
            arguments: args.clone(),
            durable: self.vhost.store.is_some() && source.def.is_stored() && self.stored(dest),
        }
    }

    /// Removes exchanges, their bindings both ways, and the auto-delete exchanges
    /// that lose their last binding on the way: a worklist, not recursion, so a
    /// long chain of exchanges costs no stack.
    fn remove_exchanges(&mut self, mut pending: Vec<Arc<str>>) {
        while let Some(name) = pending.pop() {
            if !self.t.exchanges.contains_key(&name) {
                continue;
            }
            // Bindings to it first, while it still counts as their durable end.
            pending.extend(self.remove_bindings_to(&Destination::Exchange(name.clone())));
            let Some(x) = self.t.exchanges.get(&name).cloned() else {
                continue;
            };
            for (dest, (key, args)) in self.w.bindings.remove_from(&name) {
                let e = self.binding_event(&x, &dest, &key, &args);
                self.events.push(Event::Unbound(e));
            }
            self.t.exchanges.remove(&name);
            self.events.push(Event::ExchangeDeleted(x.def.clone()));
        }
    }

    /// Removes every binding to `dest`; returns the auto-delete exchanges that
    /// lost their last binding, for the caller to remove.
    fn remove_bindings_to(&mut self, dest: &Destination) -> Vec<Arc<str>> {
        let mut emptied = Vec::new();
        for source in self.w.bindings.sources_of(dest) {
            let Some(x) = self.t.exchanges.get(&source).cloned() else {
                continue;
            };
            let mut next = (*x).clone();
            for (key, args) in self.w.bindings.remove_to(&source, dest) {
                let e = self.binding_event(&x, dest, &key, &args);
                self.events.push(Event::Unbound(e));
                next = next.unbind(dest, &key, &args);
            }
            if next.def.auto_delete && self.w.bindings.count(&source) == 0 {
                emptied.push(source.clone());
            }
            self.t.exchanges.insert(source, Arc::new(next));
        }
        emptied
    }

    fn declare_queue(&mut self, d: QueueSpec, actor: Actor) -> AmqpResult<Outcome> {
        let vhost = self.vhost;
        if let Some(q) = self.t.queues.get(d.name.as_str()).cloned() {
            vhost.check_owner(&q, actor)?;
            if d.exclusive && !d.passive && q.exclusive_owner.is_none() {
                // RabbitMQ refuses exclusive access to a shared queue as a lock, not a mismatch.
                return Err(vhost.locked(&q));
            }
            if !d.passive {
                let what = queue_name(&d.name, &vhost.name);
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
                check_arguments(&what, QUEUE_CHECKED, &d.arguments, &q.arguments)?;
            }
            q.touch();
            let (messages, consumers) = q.counts();
            return Ok(Outcome::Queue {
                queue: q,
                messages,
                consumers,
            });
        }
        if d.passive {
            return Err(vhost.not_found_queue(&d.name));
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
                if !self.t.queues.contains_key(n.as_str()) {
                    break n.into();
                }
            }
        } else {
            d.name.as_str().into()
        };
        if let Some(max) = reached(vhost.limits().queues, self.t.queues.len()) {
            return Err(AmqpError::precondition_failed(format!(
                "cannot declare queue '{name}': queue limit in vhost '{}' ({max}) is reached",
                vhost.name
            )));
        }
        let args = QueueArgs::parse(&d.arguments, &name, &vhost.name)?;
        let quorum = d
            .arguments
            .inner()
            .get("x-queue-type")
            .and_then(string_value)
            .is_some_and(|t| t == "quorum");
        if quorum && (!d.durable || d.exclusive || d.auto_delete) {
            // rabbit_quorum_queue's checks, in their order and with their words.
            let prop = if d.auto_delete {
                "auto-delete"
            } else if d.exclusive {
                "exclusive-owner"
            } else {
                "non-durable"
            };
            return Err(AmqpError::precondition_failed(format!(
                "invalid property '{prop}' for {}",
                queue_name(&name, &vhost.name)
            )));
        }
        let owner = match (d.exclusive, actor) {
            (true, Actor::Connection(c)) => Some(c),
            _ => None,
        };
        // Exclusive and auto-delete queues are gone after a restart, so they are never stored.
        let store = match &vhost.store {
            Some(store) if d.durable && !d.exclusive && !d.auto_delete => {
                let id = store.new_queue_id().map_err(|e| {
                    tracing::error!("{e}");
                    AmqpError::internal_error(format!("store failure: {e}"))
                })?;
                Some((store.clone(), id))
            }
            _ => None,
        };
        let q = Queue::new(
            name.clone(),
            d.durable,
            d.auto_delete,
            owner,
            d.arguments,
            args,
            vhost.housekeeping.clone(),
            store,
            (vhost.queue_memory_budget, vhost.gauge.clone()),
        );
        q.apply_policy(policy::matching(
            &self.w.policies,
            &name,
            policy_target(&q.arguments),
        ));
        if let Some(c) = owner {
            self.w.exclusive.entry(c).or_default().push(name.clone());
        }
        self.t.queues.insert(name, q.clone());
        self.events.push(Event::QueueDeclared(q.clone()));
        Ok(Outcome::Queue {
            queue: q,
            messages: 0,
            consumers: 0,
        })
    }

    fn delete_queue(
        &mut self,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        actor: Actor,
    ) -> AmqpResult<Outcome> {
        let vhost = self.vhost;
        let Some(q) = self.t.queues.get(name).cloned() else {
            // Deleting a queue that is not there succeeds, as in RabbitMQ 3.x.
            return Ok(Outcome::QueueDeleted {
                messages: 0,
                cancellations: Cancellations::none(),
            });
        };
        vhost.check_owner(&q, actor)?;
        let (messages, consumers) = q.counts();
        if if_unused && consumers > 0 {
            return Err(AmqpError::precondition_failed(format!(
                "{} in use",
                queue_name(name, &vhost.name)
            )));
        }
        if if_empty && messages > 0 {
            return Err(AmqpError::precondition_failed(format!(
                "{} not empty",
                queue_name(name, &vhost.name)
            )));
        }
        let (messages, cancellations) = self.unlink_queue(&q);
        Ok(Outcome::QueueDeleted {
            messages,
            cancellations,
        })
    }

    /// Takes a queue out of the topology with its bindings; it is marked deleted
    /// and its consumers are returned, to be told.
    fn unlink_queue(&mut self, q: &Arc<Queue>) -> (u32, Cancellations) {
        let dest = Destination::Queue(q.name.clone());
        let emptied = self.remove_bindings_to(&dest);
        self.t.queues.remove(&q.name);
        self.events.push(Event::QueueDeleted(q.clone()));
        self.remove_exchanges(emptied);
        if let Some(owner) = q.exclusive_owner {
            if let Some(names) = self.w.exclusive.get_mut(&owner) {
                names.retain(|n| *n != q.name);
            }
        }
        let (count, consumers) = q.delete();
        (count, Cancellations(consumers))
    }

    /// The checks RabbitMQ makes before binding or unbinding, in its order.
    fn check_binding(
        &self,
        source: &str,
        destination: &Destination,
        actor: Actor,
    ) -> AmqpResult<()> {
        let vhost = self.vhost;
        // RabbitMQ's order: the default exchange at either end, then the source,
        // then the destination (so with both missing the source is named), and
        // only then who owns the queue.
        if matches!(destination, Destination::Exchange(x) if x.is_empty()) || source.is_empty() {
            return Err(default_exchange_refused());
        }
        if !self.t.exchanges.contains_key(source) {
            return Err(vhost.not_found_exchange(source));
        }
        match destination {
            Destination::Queue(q) => {
                let queue = self
                    .t
                    .queues
                    .get(q)
                    .ok_or_else(|| vhost.not_found_queue(q))?;
                vhost.check_owner(queue, actor)?;
            }
            Destination::Exchange(x) => {
                if !self.t.exchanges.contains_key(x) {
                    return Err(vhost.not_found_exchange(x));
                }
            }
        }
        Ok(())
    }

    fn bind(&mut self, b: BindingSpec, actor: Actor) -> AmqpResult<Outcome> {
        self.check_binding(&b.source, &b.destination, actor)?;
        let Some(x) = self.t.exchanges.get(b.source.as_str()).cloned() else {
            return Err(self.vhost.not_found_exchange(&b.source));
        };
        (x.def.routes_as.check_binding)(&b.arguments)?;
        let bindings = &self.w.bindings;
        if bindings.has(&b.source, &b.destination, &b.routing_key, &b.arguments) {
            return Ok(Outcome::Done);
        }
        if let Some(max) = reached(self.vhost.limits().bindings, bindings.count(&b.source)) {
            return Err(AmqpError::precondition_failed(format!(
                "cannot bind to {}: binding limit ({max}) is reached",
                exchange_name(&b.source, &self.vhost.name)
            )));
        }
        let key: Arc<str> = b.routing_key.as_str().into();
        let e = self.binding_event(&x, &b.destination, &key, &b.arguments);
        self.w
            .bindings
            .add(x.name(), &b.destination, &b.routing_key, &b.arguments);
        let next = x.bind(&b.destination, &b.routing_key, &b.arguments);
        self.t.exchanges.insert(x.name().clone(), Arc::new(next));
        self.events.push(Event::Bound(e));
        Ok(Outcome::Done)
    }

    fn unbind(&mut self, b: BindingSpec, actor: Actor) -> AmqpResult<Outcome> {
        // RabbitMQ 3.10 (rabbit_binding:remove): the default exchange is refused at
        // either end, but a missing source or destination, or a binding that is not
        // there, is simply nothing to remove; exclusive access is checked only when
        // there is a binding to remove. Teardown code (aio-pika's RPC among it)
        // unbinds what may already be gone.
        if matches!(&b.destination, Destination::Exchange(x) if x.is_empty()) || b.source.is_empty()
        {
            return Err(default_exchange_refused());
        }
        let dest_exists = match &b.destination {
            Destination::Queue(q) => self.t.queues.contains_key(q),
            Destination::Exchange(x) => self.t.exchanges.contains_key(x),
        };
        let Some(x) = self.t.exchanges.get(b.source.as_str()).cloned() else {
            return Ok(Outcome::Done);
        };
        let bound = self
            .w
            .bindings
            .has(&b.source, &b.destination, &b.routing_key, &b.arguments);
        if !dest_exists || !bound {
            return Ok(Outcome::Done);
        }
        self.check_binding(&b.source, &b.destination, actor)?;
        let key: Arc<str> = b.routing_key.as_str().into();
        let e = self.binding_event(&x, &b.destination, &key, &b.arguments);
        self.w
            .bindings
            .remove(&b.source, &b.destination, &b.routing_key, &b.arguments);
        let next = x.unbind(&b.destination, &b.routing_key, &b.arguments);
        let emptied = next.def.auto_delete && self.w.bindings.count(&b.source) == 0;
        self.t.exchanges.insert(x.name().clone(), Arc::new(next));
        self.events.push(Event::Unbound(e));
        if emptied {
            self.remove_exchanges(vec![x.name().clone()]);
        }
        Ok(Outcome::Done)
    }

    fn purge(&mut self, name: &str, actor: Actor) -> AmqpResult<Outcome> {
        let q = self
            .t
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| self.vhost.not_found_queue(name))?;
        self.vhost.check_owner(&q, actor)?;
        let messages = q.purge();
        self.events.push(Event::Purged { queue: q, messages });
        Ok(Outcome::Purged { messages })
    }
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
                string_value(x).as_deref() == Some("classic")
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

/// `amq.gen-` and 22 URL-safe base64 characters, like RabbitMQ's server-named queues.
/// An exchange's alternate: its own argument's, else its policy's.
fn exchange_alternate(policies: &[Policy], def: &ExchangeDef) -> Option<Arc<str>> {
    def.declared_alternate().or_else(|| {
        policy::matching(policies, &def.name, Target::Exchange)
            .and_then(|p| p.definition.alternate_exchange.clone())
    })
}

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
