//! The headers exchange: bindings match on the message's header table rather than
//! its routing key, with `x-match` saying whether all or any of the binding's
//! arguments must be there (and whether `x-` arguments count). Bindings are
//! indexed by header key, so a publish looks only at the bindings that name a key
//! the message carries, not at every binding.

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};

use super::super::pmap::PMap;
use super::{Binding, Destination, ExchangeType, Router};
use crate::error::{AmqpError, AmqpResult};
use crate::model::values::{int_value, string_value};

pub const TYPE: ExchangeType = ExchangeType {
    name: "headers",
    code: 4,
    empty: || Arc::new(Headers::default()),
    check_binding: check_x_match,
};

/// A headers binding's x-match must be one RabbitMQ knows.
fn check_x_match(arguments: &FieldTable) -> AmqpResult<()> {
    let Some(v) = arguments.inner().get("x-match") else {
        return Ok(());
    };
    let Some(text) = string_value(v) else {
        // RabbitMQ's text for a value that is no string at all.
        return Err(AmqpError::precondition_failed(format!(
            "Invalid x-match field type {} (value {}); expected longstr",
            crate::model::values::type_name(v),
            crate::model::values::display_value(v)
        )));
    };
    match text.as_str() {
        "all" | "any" | "all-with-x" | "any-with-x" => Ok(()),
        _ => Err(AmqpError::precondition_failed(format!(
            "Invalid x-match field value <<\"{text}\">>; expected all, any, all-with-x, or any-with-x"
        ))),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum XMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

struct Rule {
    destination: Destination,
    /// The binding's arguments as given, to find it again when unbinding.
    arguments: FieldTable,
    mode: XMatch,
    args: Vec<(Arc<str>, AMQPValue)>,
}

impl Rule {
    fn new(destination: &Destination, arguments: &FieldTable) -> Rule {
        let mode = match arguments.inner().get("x-match") {
            Some(v) => match string_value(v).as_deref() {
                Some("any") => XMatch::Any,
                Some("all-with-x") => XMatch::AllWithX,
                Some("any-with-x") => XMatch::AnyWithX,
                _ => XMatch::All,
            },
            None => XMatch::All,
        };
        let with_x = matches!(mode, XMatch::AllWithX | XMatch::AnyWithX);
        let args = arguments
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != "x-match")
            .filter(|(k, _)| with_x || !k.as_str().starts_with("x-"))
            .map(|(k, v)| (Arc::from(k.as_str()), v.clone()))
            .collect();
        Rule {
            destination: destination.clone(),
            arguments: arguments.clone(),
            mode,
            args,
        }
    }

    fn any(&self) -> bool {
        matches!(self.mode, XMatch::Any | XMatch::AnyWithX)
    }

    /// The keys under which this binding is indexed: a message can only match
    /// `all` if it has the first key, and `any` if it has one of them.
    fn index_keys(&self) -> impl Iterator<Item = &Arc<str>> {
        let n = if self.any() { self.args.len() } else { 1 };
        self.args.iter().take(n).map(|(k, _)| k)
    }

    fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let one = |(k, v): &(Arc<str>, AMQPValue)| match headers.and_then(|h| h.inner().get(&**k)) {
            None => false,
            Some(actual) => matches!(v, AMQPValue::Void) || values_equal(v, actual),
        };
        if self.any() {
            self.args.iter().any(one)
        } else {
            self.args.iter().all(one)
        }
    }
}

/// Equality as RabbitMQ compares header values (Erlang's `==` on the decoded
/// values): numbers by value whatever their width or kind (1 equals 1.0, a
/// timestamp equals a long), strings and byte arrays by their bytes; booleans,
/// decimals, arrays and tables only with their own kind.
fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    if let (Some(x), Some(y)) = (int_value(a), int_value(b)) {
        return x == y;
    }
    let float = |v: &AMQPValue| match v {
        AMQPValue::Float(f) => Some(*f as f64),
        AMQPValue::Double(d) => Some(*d),
        other => int_value(other).map(|n| n as f64),
    };
    if matches!(a, AMQPValue::Float(_) | AMQPValue::Double(_))
        || matches!(b, AMQPValue::Float(_) | AMQPValue::Double(_))
    {
        return match (float(a), float(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        };
    }
    let bytes = |v: &AMQPValue| -> Option<Vec<u8>> {
        match v {
            AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
            AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
            AMQPValue::ByteArray(b) => Some(b.as_slice().to_vec()),
            _ => None,
        }
    };
    if let (Some(x), Some(y)) = (bytes(a), bytes(b)) {
        return x == y;
    }
    a == b
}

type Rules = PMap<u64, Arc<Rule>>;

#[derive(Default, Clone)]
struct Headers {
    next_id: u64,
    /// Every binding by id.
    rules: Rules,
    /// Each binding's id by destination, to find it when unbinding.
    ids: PMap<Destination, Arc<[u64]>>,
    /// Bindings by the header keys that can make them match.
    by_key: PMap<Arc<str>, Rules>,
    /// `all` bindings without keys: every message matches them.
    always: Rules,
}

impl Router for Headers {
    fn bind(&self, b: &Binding<'_>) -> Arc<dyn Router> {
        let mut next = self.clone();
        let id = self.next_id;
        next.next_id += 1;
        let rule = Arc::new(Rule::new(b.destination, b.arguments));
        let mut ids: Vec<u64> = self
            .ids
            .get(b.destination)
            .map(|v| v.to_vec())
            .unwrap_or_default();
        ids.push(id);
        next.ids.insert(b.destination.clone(), ids.into());
        next.rules.insert(id, rule.clone());
        if rule.args.is_empty() {
            if !rule.any() {
                next.always.insert(id, rule);
            }
        } else {
            for key in rule.index_keys() {
                let mut rules = next.by_key.get(key).cloned().unwrap_or_default();
                rules.insert(id, rule.clone());
                next.by_key.insert(key.clone(), rules);
            }
        }
        Arc::new(next)
    }

    fn unbind(&self, b: &Binding<'_>) -> Arc<dyn Router> {
        let mut next = self.clone();
        let Some(ids) = self.ids.get(b.destination) else {
            return Arc::new(next);
        };
        let found = ids
            .iter()
            .filter_map(|id| self.rules.get(id).map(|r| (*id, r.clone())))
            .find(|(_, r)| r.arguments == *b.arguments);
        let Some((id, rule)) = found else {
            return Arc::new(next);
        };
        let rest: Vec<u64> = ids.iter().copied().filter(|i| *i != id).collect();
        if rest.is_empty() {
            next.ids.remove(b.destination);
        } else {
            next.ids.insert(b.destination.clone(), rest.into());
        }
        next.rules.remove(&id);
        next.always.remove(&id);
        for key in rule.index_keys() {
            if let Some(rules) = self.by_key.get(key) {
                let mut rules = rules.clone();
                rules.remove(&id);
                if rules.is_empty() {
                    next.by_key.remove(key);
                } else {
                    next.by_key.insert(key.clone(), rules);
                }
            }
        }
        Arc::new(next)
    }

    fn route<'a>(&'a self, _: &str, headers: Option<&FieldTable>, out: &mut Vec<&'a Destination>) {
        out.extend(self.always.values().map(|r| &r.destination));
        let Some(h) = headers else {
            return;
        };
        for key in h.inner().keys() {
            let Some(rules) = self.by_key.get(key.as_str()) else {
                continue;
            };
            for rule in rules.values() {
                if rule.matches(headers) {
                    out.push(&rule.destination);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{LongString, ShortString};

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    fn routed(r: &Arc<dyn Router>, headers: &FieldTable) -> Vec<String> {
        let mut out = Vec::new();
        r.route("", Some(headers), &mut out);
        let mut names: Vec<String> = out
            .into_iter()
            .map(|d| match d {
                Destination::Queue(n) | Destination::Exchange(n) => n.to_string(),
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    #[test]
    fn all_any_and_unbinding_through_the_key_index() {
        let q = |n: &str| Destination::Queue(n.into());
        let all = table(&[("x-match", s("all")), ("a", s("1")), ("b", s("2"))]);
        let any = table(&[("x-match", s("any")), ("a", s("1")), ("c", s("3"))]);
        let every = table(&[]);
        let none_any = table(&[("x-match", s("any"))]);
        let mut r: Arc<dyn Router> = Arc::new(Headers::default());
        for (dest, args) in [
            ("all", &all),
            ("any", &any),
            ("every", &every),
            ("never", &none_any),
        ] {
            r = r.bind(&Binding {
                destination: &q(dest),
                routing_key: "",
                arguments: args,
            });
        }
        let msg = |pairs: &[(&str, AMQPValue)]| table(pairs);
        assert_eq!(
            routed(&r, &msg(&[("a", s("1")), ("b", s("2"))])),
            ["all", "any", "every"]
        );
        assert_eq!(routed(&r, &msg(&[("b", s("2"))])), ["every"]);
        assert_eq!(routed(&r, &msg(&[("c", s("3"))])), ["any", "every"]);
        // Integers compare by value whatever their wire type.
        let by_int = table(&[("n", AMQPValue::LongInt(5))]);
        let r2 = r.bind(&Binding {
            destination: &q("int"),
            routing_key: "",
            arguments: &by_int,
        });
        assert_eq!(
            routed(&r2, &msg(&[("n", AMQPValue::ShortShortUInt(5))])),
            ["every", "int"]
        );
        let r3 = r2.unbind(&Binding {
            destination: &q("any"),
            routing_key: "",
            arguments: &any,
        });
        assert_eq!(routed(&r3, &msg(&[("c", s("3"))])), ["every"]);
        let r4 = r3.unbind(&Binding {
            destination: &q("every"),
            routing_key: "",
            arguments: &every,
        });
        assert!(routed(&r4, &msg(&[("c", s("3"))])).is_empty());
        assert_eq!(
            routed(&r2, &msg(&[("c", s("3"))])),
            ["any", "every"],
            "old tables untouched"
        );
    }
}
