//! The fanout exchange: every bound destination gets every message.

use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::super::pmap::PMap;
use super::{any_arguments, Binding, Destination, ExchangeType, Router};

pub const TYPE: ExchangeType = ExchangeType {
    name: "fanout",
    code: 2,
    empty: || Arc::new(Fanout::default()),
    check_binding: any_arguments,
};

#[derive(Default, Clone)]
struct Fanout {
    /// Each destination once, with the number of bindings that lead to it, so a
    /// publish walks distinct destinations and never needs to remove repeats.
    bound: PMap<Destination, u32>,
}

impl Router for Fanout {
    fn bind(&self, b: &Binding<'_>) -> Arc<dyn Router> {
        let mut next = self.clone();
        let n = self.bound.get(b.destination).copied().unwrap_or(0);
        next.bound.insert(b.destination.clone(), n + 1);
        Arc::new(next)
    }

    fn unbind(&self, b: &Binding<'_>) -> Arc<dyn Router> {
        let mut next = self.clone();
        match self.bound.get(b.destination) {
            Some(1) | None => {
                next.bound.remove(b.destination);
            }
            Some(n) => {
                next.bound.insert(b.destination.clone(), n - 1);
            }
        }
        Arc::new(next)
    }

    fn route<'a>(&'a self, _: &str, _: Option<&FieldTable>, out: &mut Vec<&'a Destination>) {
        out.extend(self.bound.keys());
    }
}
