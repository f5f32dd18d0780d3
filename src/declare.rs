//! The topology the configuration file declares, applied at start-up through the
//! vhosts' one change path (`Vhost::apply`), exactly as a client's declarations are:
//! after the stored state is read back and before anything listens. Declaring what
//! exists with the same properties changes nothing, so every start applies the file
//! again; an entity stored with other properties stops start-up at the file's line,
//! unless `on_conflict = "keep-stored"`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::config::{field_table, Config, ConfigError, OnConflict};
use crate::model::change::{Actor, BindingSpec, Change, ExchangeSpec, QueueSpec};
use crate::model::exchange::Destination;
use crate::model::policy::Policy;
use crate::model::vhost::Vhost;

/// Declares the file's exchanges, then queues, then bindings; returns how many
/// entries were applied. The first refusal stops it.
pub fn apply(
    config: &Config,
    vhosts: &HashMap<String, Arc<Vhost>>,
    created: &mut Created,
) -> Result<usize, ConfigError> {
    apply_with(config, vhosts, &mut Err, created)
}

/// The same on a running broker (SIGHUP): a refused entry is logged and the rest
/// applied. Returns how many entries were applied and how many refused.
pub fn apply_live(
    config: &Config,
    vhosts: &HashMap<String, Arc<Vhost>>,
    created: &mut Created,
) -> (usize, usize) {
    let mut refused = 0;
    let applied = apply_with(
        config,
        vhosts,
        &mut |e| {
            tracing::error!("configuration reload: {e}; left as it is");
            refused += 1;
            Ok(())
        },
        created,
    )
    .unwrap_or(0);
    (applied, refused)
}

/// Declares `config`'s exchanges, queues and bindings for an import (the
/// management API's POST /api/definitions): every entry is tried; the refusals
/// come back as text. Nothing is recorded as the configuration file's.
pub fn apply_collecting(config: &Config, vhosts: &HashMap<String, Arc<Vhost>>) -> Vec<String> {
    let mut refused = Vec::new();
    let _ = apply_with(
        config,
        vhosts,
        &mut |e| {
            refused.push(e.to_string());
            Ok(())
        },
        &mut Created::default(),
    );
    refused
}

/// What the configuration file created, as opposed to found: `prune = true` removes
/// only these once the file no longer lists them. Kept in the store, so that it
/// survives restarts (a file edited while the broker was down is pruned at start).
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Created {
    entries: BTreeSet<Made>,
}

/// One entity the file created, by identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Made {
    Exchange {
        vhost: String,
        name: String,
    },
    Queue {
        vhost: String,
        name: String,
    },
    Binding {
        vhost: String,
        source: String,
        destination: String,
        destination_type: String,
        routing_key: String,
        /// The binding's arguments as JSON (part of a binding's identity).
        arguments: String,
    },
}

/// The store's name for the record.
const CREATED_NOTE: &str = "config-created";

impl Created {
    /// The record kept in the store; an unreadable one is logged and started afresh
    /// (which only means pruning forgets what it had created before).
    pub fn load(store: &dyn crate::store::Store) -> Created {
        match store.note(CREATED_NOTE) {
            Ok(None) => Created::default(),
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("the record of what the configuration created is unreadable ({e}); starting a new one");
                Created::default()
            }),
            Err(e) => {
                tracing::warn!("the record of what the configuration created cannot be read ({e}); starting a new one");
                Created::default()
            }
        }
    }

    pub fn save(&self, store: &dyn crate::store::Store) {
        match serde_json::to_vec(self) {
            Ok(bytes) => store.put_note(CREATED_NOTE, bytes),
            Err(e) => tracing::error!("cannot record what the configuration created: {e}"),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// With `prune = true`: removes what the file created and no longer lists, bindings
/// first, then queues, then exchanges. A queue holding messages is kept (and
/// stays recorded, to be tried again at the next start or reload). Returns how
/// many entities were removed.
pub fn prune(
    config: &Config,
    vhosts: &HashMap<String, Arc<Vhost>>,
    created: &mut Created,
) -> usize {
    let listed: BTreeSet<Made> = entries(config).into_iter().filter_map(|e| e.made).collect();
    let stale: Vec<Made> = created.entries.difference(&listed).cloned().collect();
    let order = |m: &Made| match m {
        Made::Binding { .. } => 0,
        Made::Queue { .. } => 1,
        Made::Exchange { .. } => 2,
    };
    let mut stale = stale;
    stale.sort_by_key(order);
    let mut removed = 0;
    for m in stale {
        let (vhost, change, what) = match &m {
            Made::Exchange { vhost, name } => (
                vhost,
                Some(Change::DeleteExchange {
                    name: name.clone(),
                    if_unused: false,
                }),
                format!("exchange '{name}' in vhost '{vhost}'"),
            ),
            Made::Queue { vhost, name } => (
                vhost,
                Some(Change::DeleteQueue {
                    name: name.clone(),
                    if_unused: false,
                    if_empty: true,
                }),
                format!("queue '{name}' in vhost '{vhost}'"),
            ),
            Made::Binding {
                vhost,
                source,
                destination,
                destination_type,
                routing_key,
                arguments,
            } => {
                let arguments = serde_json::from_str::<toml::Table>(arguments)
                    .ok()
                    .and_then(|t| field_table(&t).ok());
                let destination = match destination_type.as_str() {
                    "exchange" => Destination::Exchange(destination.as_str().into()),
                    _ => Destination::Queue(destination.as_str().into()),
                };
                (
                    vhost,
                    arguments.map(|arguments| {
                        Change::Unbind(BindingSpec {
                            source: source.clone(),
                            destination,
                            routing_key: routing_key.clone(),
                            arguments,
                        })
                    }),
                    format!("binding from exchange '{source}' with key '{routing_key}' in vhost '{vhost}'"),
                )
            }
        };
        let (Some(v), Some(change)) = (vhosts.get(vhost), change) else {
            created.entries.remove(&m);
            continue;
        };
        match v.apply(change, Actor::Operator) {
            Ok(applied) => {
                // Its consumers are told, as a client's queue.delete tells them.
                if let crate::model::change::Outcome::QueueDeleted { cancellations, .. } =
                    applied.outcome
                {
                    cancellations.notify();
                }
                tracing::info!("pruned {what}: the configuration created it and lists it no more");
                created.entries.remove(&m);
                removed += 1;
            }
            // Gone already (a client deleted it, or a cascade did).
            Err(e) if e.code == 404 => {
                created.entries.remove(&m);
            }
            Err(e) => tracing::warn!("not pruning {what}: {e}"),
        }
    }
    removed
}

/// Gives every vhost its policies from the configuration (none for a vhost the
/// file gives none, so a reload can remove them), applied to what exists now.
/// Keys that have no effect here are named in a warning.
pub fn apply_policies(config: &Config, vhosts: &HashMap<String, Arc<Vhost>>) {
    let mut per_vhost: HashMap<&str, Vec<Policy>> = HashMap::new();
    for p in &config.policies {
        // Checked when the configuration was loaded.
        let Ok((policy, ignored)) = Policy::from_config(p) else {
            continue;
        };
        if !ignored.is_empty() {
            tracing::warn!(
                "policy '{}' in vhost '{}': {} not supported here, ignored",
                p.name,
                p.vhost,
                ignored.join(", ")
            );
        }
        per_vhost.entry(&p.vhost).or_default().push(policy);
    }
    for (name, vhost) in vhosts {
        vhost.set_policies(per_vhost.remove(name.as_str()).unwrap_or_default());
    }
}

/// One declaration of the file: where it is and what it asks.
struct Entry {
    array: &'static str,
    index: usize,
    vhost: String,
    what: String,
    change: Result<Change, String>,
    /// Its identity for the record of what the file created.
    made: Option<Made>,
}

fn entries(config: &Config) -> Vec<Entry> {
    let args = |t: &toml::Table, array: &str| {
        field_table(t).map_err(|why| format!("{array}: arguments: {why}"))
    };
    let mut out = Vec::new();
    for (index, x) in config.exchanges.iter().enumerate() {
        out.push(Entry {
            array: "exchanges",
            index,
            vhost: x.vhost.clone(),
            what: format!("exchange '{}' in vhost '{}'", x.name, x.vhost),
            made: Some(Made::Exchange {
                vhost: x.vhost.clone(),
                name: x.name.clone(),
            }),
            change: args(&x.arguments, "exchanges").map(|arguments| {
                Change::DeclareExchange(ExchangeSpec {
                    name: x.name.clone(),
                    kind: x.kind.clone(),
                    passive: false,
                    durable: x.durable,
                    auto_delete: x.auto_delete,
                    internal: x.internal,
                    arguments,
                })
            }),
        });
    }
    for (index, q) in config.queues.iter().enumerate() {
        out.push(Entry {
            array: "queues",
            index,
            vhost: q.vhost.clone(),
            what: format!("queue '{}' in vhost '{}'", q.name, q.vhost),
            made: Some(Made::Queue {
                vhost: q.vhost.clone(),
                name: q.name.clone(),
            }),
            change: args(&q.arguments, "queues").map(|arguments| {
                Change::DeclareQueue(QueueSpec {
                    name: q.name.clone(),
                    passive: false,
                    durable: q.durable,
                    exclusive: false,
                    auto_delete: q.auto_delete,
                    arguments,
                })
            }),
        });
    }
    for (index, b) in config.bindings.iter().enumerate() {
        let destination = match b.destination_type.as_str() {
            "exchange" => Destination::Exchange(b.destination.as_str().into()),
            _ => Destination::Queue(b.destination.as_str().into()),
        };
        out.push(Entry {
            array: "bindings",
            index,
            vhost: b.vhost.clone(),
            what: format!(
                "binding of {} '{}' to exchange '{}' in vhost '{}'",
                b.destination_type, b.destination, b.source, b.vhost
            ),
            made: serde_json::to_string(&b.arguments)
                .ok()
                .map(|arguments| Made::Binding {
                    vhost: b.vhost.clone(),
                    source: b.source.clone(),
                    destination: b.destination.clone(),
                    destination_type: b.destination_type.clone(),
                    routing_key: b.routing_key.clone(),
                    arguments,
                }),
            change: args(&b.arguments, "bindings").map(|arguments| {
                Change::Bind(BindingSpec {
                    source: b.source.clone(),
                    destination,
                    routing_key: b.routing_key.clone(),
                    arguments,
                })
            }),
        });
    }
    out
}

/// Applies every entry in order; `on_error` decides whether a refusal stops the rest.
fn apply_with(
    config: &Config,
    vhosts: &HashMap<String, Arc<Vhost>>,
    on_error: &mut dyn FnMut(ConfigError) -> Result<(), ConfigError>,
    created: &mut Created,
) -> Result<usize, ConfigError> {
    let mut applied = 0;
    for e in entries(config) {
        let at = |reason: String| config.entry_error(e.array, e.index, reason);
        let Some(vhost) = vhosts.get(&e.vhost) else {
            on_error(at(format!("{}: unknown vhost '{}'", e.array, e.vhost)))?;
            continue;
        };
        let change = match e.change {
            Ok(c) => c,
            Err(why) => {
                on_error(at(why))?;
                continue;
            }
        };
        let existed = vhost.declares_existing(&change);
        let refusal = match vhost.apply(change, Actor::Operator) {
            Ok(_) => {
                applied += 1;
                if let (false, Some(made)) = (existed, e.made) {
                    created.entries.insert(made);
                }
                continue;
            }
            Err(refusal) => refusal,
        };
        // A conflict with what is stored may be kept (with a warning); anything
        // else is reported at the entry's line.
        let conflict = refusal.code == 406 && refusal.text.contains("inequivalent arg");
        if conflict && config.on_conflict == OnConflict::KeepStored {
            tracing::warn!(
                "{} in the configuration differs from the stored one, which is kept: {refusal}",
                e.what
            );
            continue;
        }
        let hint = if conflict {
            "; change the file to match what is stored, delete the stored entity, or set on_conflict = \"keep-stored\""
        } else {
            ""
        };
        on_error(at(format!("{}: {refusal}{hint}", e.what)))?;
    }
    Ok(applied)
}

/// What `warrenmq check-config` reports of a file that passed.
pub struct Summary {
    pub listeners: Vec<std::net::SocketAddr>,
    /// `amqps` listeners (certificate files already read and matched).
    pub tls_listeners: Vec<std::net::SocketAddr>,
    pub vhosts: Vec<String>,
    pub users: usize,
    pub exchanges: usize,
    pub queues: usize,
    pub bindings: usize,
}

/// Checks a parsed configuration as start-up would, short of the data directory:
/// its topology is applied to empty in-memory vhosts, so an unknown exchange type,
/// a queue argument RabbitMQ would refuse or a binding to nothing is found at its
/// line without starting a broker.
pub fn check(config: &Config) -> Result<Summary, ConfigError> {
    let gauge = Arc::new(crate::model::message::MemoryGauge::new(
        config.limits.memory_high_watermark as usize,
    ));
    let vhosts: HashMap<String, Arc<Vhost>> = config
        .vhosts
        .iter()
        .map(|v| {
            let vhost = Vhost::new(
                &v.name,
                None,
                gauge.clone(),
                config.limits.queue_memory_budget as usize,
            );
            (v.name.clone(), Arc::new(vhost))
        })
        .collect();
    apply(config, &vhosts, &mut Created::default())?;
    Ok(Summary {
        listeners: config.listen.clone(),
        tls_listeners: config
            .tls
            .as_ref()
            .map(|t| t.listen.clone())
            .unwrap_or_default(),
        vhosts: config.vhosts.iter().map(|v| v.name.clone()).collect(),
        users: config.users.len(),
        exchanges: config.exchanges.len(),
        queues: config.queues.len(),
        bindings: config.bindings.len(),
    })
}
