//! The direct exchange: a message goes to the bindings whose key equals its
//! routing key. One hash lookup per publish, whatever the number of bindings.

use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::super::pmap::PMap;
use super::{any_arguments, Binding, Destination, ExchangeType, Router};

pub const TYPE: ExchangeType = ExchangeType {
    name: "direct",
    code: 1,
    empty: || Arc::new(Direct::default()),
    check_binding: any_arguments,
};

#[derive(Default, Clone)]
struct Direct {
    /// Destinations by binding key; one entry per binding, so a destination bound
    /// with one key and two argument tables is listed twice.
    by_key: PMap<Arc<str>, Arc<[Destination]>>,
}

impl Router for Direct {
    fn bind(&self, b: &Binding<'_>) -> Arc<dyn Router> {
        let mut next = self.clone();
        let mut dests: Vec<Destination> = self
            .by_key
            .get(b.routing_key)
            .map(|d| d.to_vec())
            .unwrap_or_default();
        dests.push(b.destination.clone());
        next.by_key.insert(b.routing_key.into(), dests.into());
        Arc::new(next)
    }

    fn unbind(&self, b: &Binding<'_>) -> Arc<dyn Router> {
        let mut next = self.clone();
        if let Some(d) = self.by_key.get(b.routing_key) {
            let mut dests = d.to_vec();
            if let Some(i) = dests.iter().position(|x| x == b.destination) {
                dests.remove(i);
            }
            if dests.is_empty() {
                next.by_key.remove(b.routing_key);
            } else {
                next.by_key.insert(b.routing_key.into(), dests.into());
            }
        }
        Arc::new(next)
    }

    fn route<'a>(&'a self, key: &str, _: Option<&FieldTable>, out: &mut Vec<&'a Destination>) {
        if let Some(d) = self.by_key.get(key) {
            out.extend(d.iter());
        }
    }
}
