//! The topology the configuration file declares, applied at start-up through the
//! vhosts' one change path (`Vhost::apply`), exactly as a client's declarations are:
//! after the stored state is read back and before anything listens. Declaring what
//! exists with the same properties changes nothing, so every start applies the file
//! again; an entity stored with other properties stops start-up at the file's line,
//! unless `on_conflict = "keep-stored"`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{field_table, Config, ConfigError, OnConflict};
use crate::model::change::{Actor, BindingSpec, Change, ExchangeSpec, QueueSpec};
use crate::model::exchange::Destination;
use crate::model::vhost::Vhost;

/// Declares the file's exchanges, then queues, then bindings; returns how many
/// entries were applied.
pub fn apply(config: &Config, vhosts: &HashMap<String, Arc<Vhost>>) -> Result<usize, ConfigError> {
    let mut applied = 0;
    let vhost = |array: &'static str, i: usize, name: &str| {
        vhosts
            .get(name)
            .ok_or_else(|| config.entry_error(array, i, format!("{array}: unknown vhost '{name}'")))
    };
    let args = |array: &'static str, i: usize, t: &toml::Table| {
        field_table(t)
            .map_err(|why| config.entry_error(array, i, format!("{array}: arguments: {why}")))
    };
    // Refused declarations: a conflict with what is stored may be kept (with a
    // warning); anything else stops start-up at the entry's line.
    let refused = |array: &'static str, i: usize, what: String, e: crate::error::AmqpError| {
        let conflict = e.code == 406 && e.text.contains("inequivalent arg");
        if conflict && config.on_conflict == OnConflict::KeepStored {
            tracing::warn!(
                "{what} in the configuration differs from the stored one, which is kept: {e}"
            );
            return Ok(());
        }
        let hint = if conflict {
            "; change the file to match what is stored, delete the stored entity, or set on_conflict = \"keep-stored\""
        } else {
            ""
        };
        Err(config.entry_error(array, i, format!("{what}: {e}{hint}")))
    };
    for (i, x) in config.exchanges.iter().enumerate() {
        let change = Change::DeclareExchange(ExchangeSpec {
            name: x.name.clone(),
            kind: x.kind.clone(),
            passive: false,
            durable: x.durable,
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments: args("exchanges", i, &x.arguments)?,
        });
        match vhost("exchanges", i, &x.vhost)?.apply(change, Actor::Operator) {
            Ok(_) => applied += 1,
            Err(e) => refused(
                "exchanges",
                i,
                format!("exchange '{}' in vhost '{}'", x.name, x.vhost),
                e,
            )?,
        }
    }
    for (i, q) in config.queues.iter().enumerate() {
        let change = Change::DeclareQueue(QueueSpec {
            name: q.name.clone(),
            passive: false,
            durable: q.durable,
            exclusive: false,
            auto_delete: q.auto_delete,
            arguments: args("queues", i, &q.arguments)?,
        });
        match vhost("queues", i, &q.vhost)?.apply(change, Actor::Operator) {
            Ok(_) => applied += 1,
            Err(e) => refused(
                "queues",
                i,
                format!("queue '{}' in vhost '{}'", q.name, q.vhost),
                e,
            )?,
        }
    }
    for (i, b) in config.bindings.iter().enumerate() {
        let destination = match b.destination_type.as_str() {
            "exchange" => Destination::Exchange(b.destination.as_str().into()),
            _ => Destination::Queue(b.destination.as_str().into()),
        };
        let change = Change::Bind(BindingSpec {
            source: b.source.clone(),
            destination,
            routing_key: b.routing_key.clone(),
            arguments: args("bindings", i, &b.arguments)?,
        });
        let what = format!(
            "binding of {} '{}' to exchange '{}' in vhost '{}'",
            b.destination_type, b.destination, b.source, b.vhost
        );
        match vhost("bindings", i, &b.vhost)?.apply(change, Actor::Operator) {
            Ok(_) => applied += 1,
            Err(e) => refused("bindings", i, what, e)?,
        }
    }
    Ok(applied)
}

/// What `warrenmq check-config` reports of a file that passed.
pub struct Summary {
    pub listeners: Vec<std::net::SocketAddr>,
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
    apply(config, &vhosts)?;
    Ok(Summary {
        listeners: config.listen.clone(),
        vhosts: config.vhosts.iter().map(|v| v.name.clone()).collect(),
        users: config.users.len(),
        exchanges: config.exchanges.len(),
        queues: config.queues.len(),
        bindings: config.bindings.len(),
    })
}
