//! The store as a topology listener: durable exchanges, durable queues and the
//! bindings between two durable ends are written as the model changes, and the
//! reply to the client waits for the store's next sync.

use std::sync::Arc;

use super::change::{BindingEvent, Event, TopologyListener};
use super::exchange::Destination;
use crate::store::{Store, StoredBinding, StoredDestination, StoredExchange, StoredQueue};

pub struct StoreTopology(pub Arc<dyn Store>);

fn stored_binding(vhost: &str, b: &BindingEvent) -> StoredBinding {
    StoredBinding {
        vhost: vhost.to_string(),
        source: b.source.to_string(),
        destination: match &b.destination {
            Destination::Queue(q) => StoredDestination::Queue(q.to_string()),
            Destination::Exchange(x) => StoredDestination::Exchange(x.to_string()),
        },
        routing_key: b.routing_key.to_string(),
        arguments: b.arguments.clone(),
    }
}

impl TopologyListener for StoreTopology {
    fn changed(&self, vhost: &str, events: &[Event]) -> Result<bool, String> {
        let store = &self.0;
        let mut durable = false;
        for e in events {
            match e {
                Event::ExchangeDeclared(x) if x.is_stored() => {
                    store.put_exchange(
                        vhost,
                        &StoredExchange {
                            vhost: vhost.to_string(),
                            name: x.name.to_string(),
                            kind: x.kind.code,
                            auto_delete: x.auto_delete,
                            internal: x.internal,
                            arguments: x.arguments.clone(),
                            messages_id: x.messages_id,
                        },
                    );
                    durable = true;
                }
                Event::ExchangeDeleted(x) if x.is_stored() => {
                    store.delete_exchange(vhost, &x.name);
                    // Its waiting delayed messages go with it.
                    if let Some(id) = x.messages_id {
                        store.delete_messages(id);
                    }
                    durable = true;
                }
                Event::QueueDeclared(q) => {
                    if let Some((_, id)) = &q.store {
                        store.put_queue(&StoredQueue {
                            vhost: vhost.to_string(),
                            name: q.name.to_string(),
                            id: *id,
                            auto_delete: q.auto_delete,
                            arguments: q.arguments.clone(),
                        });
                        durable = true;
                    }
                }
                Event::QueueDeleted(q) => {
                    if let Some((_, id)) = &q.store {
                        store.delete_queue(vhost, &q.name, *id);
                        durable = true;
                    }
                }
                Event::Bound(b) if b.durable => {
                    store.put_binding(&stored_binding(vhost, b));
                    durable = true;
                }
                Event::Unbound(b) if b.durable => {
                    store.delete_binding(&stored_binding(vhost, b));
                    durable = true;
                }
                // The queue deleted the stored copies itself, as it does for acks.
                Event::Purged { queue, messages } => {
                    durable |= queue.store.is_some() && *messages > 0;
                }
                _ => {}
            }
        }
        Ok(durable)
    }
}
