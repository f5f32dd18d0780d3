//! Exchanges: what a publisher addresses, and the bindings through which each type
//! routes. One file per exchange type, each a persistent routing table behind the
//! [`Router`] trait: binding or unbinding returns a new table that shares all but
//! the changed part with the old one, so a change costs a handful of allocations
//! whatever the exchange holds, and publishers keep routing on the table they
//! loaded without taking a lock. Adding a type is a file and a line in [`TYPES`].

pub mod delayed;
mod direct;
mod fanout;
mod headers;
mod topic;

use std::sync::Arc;

use amq_protocol::types::FieldTable;

use crate::error::AmqpResult;
use crate::model::values::string_value;

pub use topic::topic_match;

/// Where a binding leads: a queue or another exchange (exchange-to-exchange bindings).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Queue(Arc<str>),
    Exchange(Arc<str>),
}

/// One binding as a router sees it.
pub struct Binding<'a> {
    pub destination: &'a Destination,
    pub routing_key: &'a str,
    pub arguments: &'a FieldTable,
}

/// One exchange type's routing table. Tables are values: `bind` and `unbind` leave
/// `self` as it was and return the changed table. The model calls `bind` only for
/// a binding the exchange does not have yet and `unbind` only for one it has.
pub trait Router: Send + Sync {
    fn bind(&self, b: &Binding<'_>) -> Arc<dyn Router>;
    fn unbind(&self, b: &Binding<'_>) -> Arc<dyn Router>;
    /// Appends the destinations a message with this key and these headers goes to.
    /// A destination may appear more than once; the caller removes repeats.
    fn route<'a>(
        &'a self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<&'a Destination>,
    );
}

/// An exchange type: its name in `exchange.declare`, its code in the store, its
/// empty table and what it requires of binding arguments.
pub struct ExchangeType {
    pub name: &'static str,
    /// The byte the store writes for this type; never reuse one.
    pub code: u8,
    pub empty: fn() -> Arc<dyn Router>,
    pub check_binding: fn(&FieldTable) -> AmqpResult<()>,
}

impl PartialEq for ExchangeType {
    fn eq(&self, other: &Self) -> bool {
        self.code == other.code
    }
}

impl std::fmt::Debug for ExchangeType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every exchange type this broker knows.
pub static TYPES: &[ExchangeType] = &[
    direct::TYPE,
    fanout::TYPE,
    topic::TYPE,
    headers::TYPE,
    delayed::TYPE,
];

pub fn by_name(name: &str) -> Option<&'static ExchangeType> {
    TYPES.iter().find(|t| t.name == name)
}

pub fn by_code(code: u8) -> Option<&'static ExchangeType> {
    TYPES.iter().find(|t| t.code == code)
}

/// Binding arguments that every type accepts.
fn any_arguments(_: &FieldTable) -> AmqpResult<()> {
    Ok(())
}

/// What an exchange is, as declared. Immutable: a redeclare with other properties
/// is refused, so only its bindings ever change (and its alternate, with a policy).
#[derive(Debug, Clone)]
pub struct ExchangeDef {
    pub name: Arc<str>,
    pub kind: &'static ExchangeType,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// Where messages it cannot route go: its `alternate-exchange` argument, else
    /// its policy's.
    pub alternate: Option<Arc<str>>,
    /// The type whose routing table it has: its own, or for a delayed-message
    /// exchange the one its `x-delayed-type` names.
    pub routes_as: &'static ExchangeType,
    /// A stored delayed-message exchange: the store's id under which its waiting
    /// messages are kept (allocated as a queue's is).
    pub messages_id: Option<u64>,
}

impl ExchangeDef {
    pub fn new(
        name: &str,
        kind: &'static ExchangeType,
        (durable, auto_delete, internal): (bool, bool, bool),
        arguments: FieldTable,
    ) -> ExchangeDef {
        let routes_as = if kind == &delayed::TYPE {
            delayed::routes_as_checked(&arguments)
        } else {
            kind
        };
        ExchangeDef {
            name: name.into(),
            kind,
            durable,
            auto_delete,
            internal,
            alternate: declared_alternate(&arguments),
            arguments,
            routes_as,
            messages_id: None,
        }
    }

    /// Whether messages with an `x-delay` header wait here before routing.
    pub fn is_delayed(&self) -> bool {
        self.kind == &delayed::TYPE
    }

    /// The `alternate-exchange` its arguments name (a policy's applies only
    /// where they name none).
    pub fn declared_alternate(&self) -> Option<Arc<str>> {
        declared_alternate(&self.arguments)
    }

    /// Whether it survives a restart.
    pub fn is_stored(&self) -> bool {
        self.durable && !self.auto_delete
    }
}

/// An exchange as publishers see it: what it is and its routing table, one
/// immutable value. Which bindings it has is the vhost's writer's business
/// (`model::bindings`); this only routes.
#[derive(Clone)]
pub struct Exchange {
    pub def: Arc<ExchangeDef>,
    router: Arc<dyn Router>,
}

fn declared_alternate(arguments: &FieldTable) -> Option<Arc<str>> {
    arguments
        .inner()
        .get("alternate-exchange")
        .and_then(string_value)
        .map(Arc::from)
}

impl Exchange {
    /// The same exchange, routing table included, with another alternate exchange
    /// (a policy's changed).
    pub fn with_alternate(&self, alternate: Option<Arc<str>>) -> Exchange {
        Exchange {
            def: Arc::new(ExchangeDef {
                alternate,
                ..(*self.def).clone()
            }),
            router: self.router.clone(),
        }
    }

    pub fn new(def: ExchangeDef) -> Exchange {
        Exchange {
            router: (def.routes_as.empty)(),
            def: Arc::new(def),
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.def.name
    }

    /// This exchange routing one more binding. The caller makes sure it is new.
    pub fn bind(&self, dest: &Destination, key: &str, args: &FieldTable) -> Exchange {
        Exchange {
            def: self.def.clone(),
            router: self.router.bind(&Binding {
                destination: dest,
                routing_key: key,
                arguments: args,
            }),
        }
    }

    /// This exchange routing one binding less. The caller makes sure it has it.
    pub fn unbind(&self, dest: &Destination, key: &str, args: &FieldTable) -> Exchange {
        Exchange {
            def: self.def.clone(),
            router: self.router.unbind(&Binding {
                destination: dest,
                routing_key: key,
                arguments: args,
            }),
        }
    }

    pub fn route<'a>(
        &'a self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<&'a Destination>,
    ) {
        self.router.route(routing_key, headers, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str) -> Destination {
        Destination::Queue(name.into())
    }

    fn def(kind: &str) -> ExchangeDef {
        ExchangeDef::new(
            "x",
            by_name(kind).expect("known type"),
            (false, false, false),
            FieldTable::default(),
        )
    }

    fn routed(x: &Exchange, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        x.route(key, None, &mut out);
        let mut names: Vec<String> = out
            .into_iter()
            .map(|d| match d {
                Destination::Queue(n) | Destination::Exchange(n) => n.to_string(),
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn bindings_are_values_old_tables_route_as_before() {
        for kind in ["direct", "fanout", "topic"] {
            let none = FieldTable::default();
            let empty = Exchange::new(def(kind));
            let one = empty.bind(&q("a"), "k", &none);
            let two = one.bind(&q("b"), "k", &none);
            assert!(routed(&empty, "k").is_empty(), "{kind}");
            assert_eq!(routed(&one, "k"), ["a"], "{kind}");
            assert_eq!(routed(&two, "k"), ["a", "b"], "{kind}");
            let less = two.unbind(&q("a"), "k", &none);
            assert_eq!(routed(&less, "k"), ["b"], "{kind}");
            assert_eq!(
                routed(&two, "k"),
                ["a", "b"],
                "{kind}: the old value is untouched"
            );
        }
    }

    #[test]
    fn a_destination_bound_twice_stays_until_both_go() {
        let none = FieldTable::default();
        for kind in ["direct", "fanout", "topic"] {
            let x = Exchange::new(def(kind))
                .bind(&q("a"), "k", &none)
                .bind(&q("a"), "k.#", &none)
                .bind(&q("a"), "#", &none);
            let x = x.unbind(&q("a"), "k.#", &none);
            assert!(!routed(&x, "k").is_empty(), "{kind}");
            let x = x.unbind(&q("a"), "k", &none).unbind(&q("a"), "#", &none);
            assert!(routed(&x, "k").is_empty(), "{kind}");
        }
    }
}
