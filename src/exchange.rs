//! Exchanges and how each type routes. The definitions here are plain data owned
//! by the vhost; `Router` is the compiled, read-only form that publishers use from
//! the vhost's routing snapshot, without taking any lock.

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(s: &str) -> Option<ExchangeKind> {
        match s {
            "direct" => Some(ExchangeKind::Direct),
            "fanout" => Some(ExchangeKind::Fanout),
            "topic" => Some(ExchangeKind::Topic),
            "headers" => Some(ExchangeKind::Headers),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Queue(Arc<str>),
    Exchange(Arc<str>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone)]
pub struct ExchangeDef {
    pub name: Arc<str>,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// Bindings whose source is this exchange.
    pub bindings: Vec<Binding>,
}

/// One exchange's bindings compiled for routing.
pub struct Router {
    pub name: Arc<str>,
    pub internal: bool,
    /// The `alternate-exchange` argument: where messages this exchange cannot route go.
    pub alternate: Option<Arc<str>>,
    rules: Rules,
}

enum Rules {
    Direct(HashMap<String, Vec<Destination>>),
    Fanout(Vec<Destination>),
    Topic(Vec<(Vec<String>, Destination)>),
    Headers(Vec<(HeaderRule, Destination)>),
}

impl Router {
    pub fn compile(def: &ExchangeDef) -> Router {
        let rules = match def.kind {
            ExchangeKind::Direct => {
                let mut map: HashMap<String, Vec<Destination>> = HashMap::new();
                for b in &def.bindings {
                    map.entry(b.routing_key.clone())
                        .or_default()
                        .push(b.destination.clone());
                }
                Rules::Direct(map)
            }
            ExchangeKind::Fanout => {
                Rules::Fanout(def.bindings.iter().map(|b| b.destination.clone()).collect())
            }
            ExchangeKind::Topic => Rules::Topic(
                def.bindings
                    .iter()
                    .map(|b| (topic_words(&b.routing_key), b.destination.clone()))
                    .collect(),
            ),
            ExchangeKind::Headers => Rules::Headers(
                def.bindings
                    .iter()
                    .map(|b| (HeaderRule::new(&b.arguments), b.destination.clone()))
                    .collect(),
            ),
        };
        Router {
            name: def.name.clone(),
            internal: def.internal,
            alternate: def
                .arguments
                .inner()
                .get("alternate-exchange")
                .and_then(string_value)
                .map(Arc::from),
            rules,
        }
    }

    /// Appends the destinations this exchange routes the message to.
    pub fn route(
        &self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<Destination>,
    ) {
        match &self.rules {
            Rules::Direct(map) => {
                if let Some(d) = map.get(routing_key) {
                    out.extend(d.iter().cloned());
                }
            }
            Rules::Fanout(all) => out.extend(all.iter().cloned()),
            Rules::Topic(rules) => {
                let key = split_key(routing_key);
                for (pattern, dest) in rules {
                    if topic_match(pattern, &key) {
                        out.push(dest.clone());
                    }
                }
            }
            Rules::Headers(rules) => {
                for (rule, dest) in rules {
                    if rule.matches(headers) {
                        out.push(dest.clone());
                    }
                }
            }
        }
    }
}

/// RabbitMQ splits on '.', keeps empty words, and treats the empty key as no words.
fn split_key(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

fn topic_words(pattern: &str) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    for w in split_key(pattern) {
        // "#.#" means the same as "#" and would only slow matching down.
        if w == "#" && words.last().map(|l| l == "#").unwrap_or(false) {
            continue;
        }
        words.push(w.to_string());
    }
    words
}

pub fn topic_match(pattern: &[String], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((w, rest)) if w == "#" => (0..=key.len()).any(|i| topic_match(rest, &key[i..])),
        Some((w, rest)) if w == "*" => !key.is_empty() && topic_match(rest, &key[1..]),
        Some((w, rest)) => key.first() == Some(&w.as_str()) && topic_match(rest, &key[1..]),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum XMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

struct HeaderRule {
    mode: XMatch,
    args: Vec<(String, AMQPValue)>,
}

impl HeaderRule {
    fn new(arguments: &FieldTable) -> HeaderRule {
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
            .map(|(k, v)| (k.as_str().to_string(), v.clone()))
            .collect();
        HeaderRule { mode, args }
    }

    fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let one =
            |(k, v): &(String, AMQPValue)| match headers.and_then(|h| h.inner().get(k.as_str())) {
                None => false,
                Some(actual) => matches!(v, AMQPValue::Void) || values_equal(v, actual),
            };
        match self.mode {
            XMatch::All | XMatch::AllWithX => self.args.iter().all(one),
            XMatch::Any | XMatch::AnyWithX => self.args.iter().any(one),
        }
    }
}

pub fn string_value(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

pub fn int_value(v: &AMQPValue) -> Option<i128> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => *n as i128,
        AMQPValue::ShortShortUInt(n) => *n as i128,
        AMQPValue::ShortInt(n) => *n as i128,
        AMQPValue::ShortUInt(n) => *n as i128,
        AMQPValue::LongInt(n) => *n as i128,
        AMQPValue::LongUInt(n) => *n as i128,
        AMQPValue::LongLongInt(n) => *n as i128,
        AMQPValue::Timestamp(n) => *n as i128,
        _ => return None,
    })
}

/// Equality as RabbitMQ compares header values: by value, not by wire type.
fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    if let (Some(x), Some(y)) = (int_value(a), int_value(b)) {
        return x == y;
    }
    let bytes = |v: &AMQPValue| -> Option<Vec<u8>> {
        match v {
            AMQPValue::ShortString(s) => Some(s.as_str().as_bytes().to_vec()),
            AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
            _ => None,
        }
    };
    if let (Some(x), Some(y)) = (bytes(a), bytes(b)) {
        return x == y;
    }
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, key: &str) -> bool {
        topic_match(&topic_words(pattern), &split_key(key))
    }

    #[test]
    fn topic_semantics_follow_rabbitmq() {
        assert!(m("a.*.c", "a.b.c"));
        assert!(!m("a.*.c", "a.c"));
        assert!(m("a.#.c", "a.c"));
        assert!(m("a.#.c", "a.b.b.c"));
        assert!(m("#", ""));
        assert!(m("#", "a.b"));
        assert!(!m("*", ""));
        assert!(m("*", "a"));
        assert!(m("a.*", "a."));
        assert!(m("a..b", "a..b"));
        assert!(m("#.#.b", "b"));
        assert!(!m("a", "a.b"));
        assert!(m("", ""));
        assert!(!m("", "a"));
    }
}
