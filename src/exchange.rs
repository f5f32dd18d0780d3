//! Exchanges and how each type routes. The definitions here are plain data owned
//! by the vhost; `Router` is the compiled, read-only form that publishers use from
//! the vhost's routing snapshot, without taking any lock.

use std::cell::RefCell;
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
    Topic(TopicTrie),
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
            ExchangeKind::Topic => Rules::Topic(TopicTrie::new(
                def.bindings
                    .iter()
                    .map(|b| (b.routing_key.as_str(), b.destination.clone())),
            )),
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
            Rules::Topic(trie) => trie.route(routing_key, out),
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
fn split_key(key: &str) -> impl Iterator<Item = &str> {
    // `split` on "" would yield one empty word.
    key.split('.')
        .take(if key.is_empty() { 0 } else { usize::MAX })
}

fn topic_words(pattern: &str) -> Vec<&str> {
    let mut words: Vec<&str> = Vec::new();
    for w in split_key(pattern) {
        // "#.#" means the same as "#"; collapsing it keeps one `#` node per run.
        if w == "#" && words.last() == Some(&"#") {
            continue;
        }
        words.push(w);
    }
    words
}

type NodeId = u32;
type WordId = u32;

/// One node of the topic trie: the bindings whose pattern ends here, and where
/// each kind of next pattern word leads.
#[derive(Default)]
struct TopicNode {
    /// Literal edges, sorted by word for binary search.
    words: Box<[(WordId, NodeId)]>,
    star: Option<NodeId>,
    hash: Option<NodeId>,
    /// Reached by a `#` edge: it matches any number of words, so stays live.
    is_hash: bool,
    /// Indices into `TopicTrie::destinations`, ascending.
    ends: Vec<u32>,
}

/// A topic exchange's bindings as a trie of pattern words, matched by walking
/// every live path at once (an NFA simulation over de-duplicated nodes), as
/// RabbitMQ's topic trie does. A publish costs at most key words x trie nodes,
/// whatever the patterns: nothing backtracks and nothing recurses, so neither
/// a binding nor a routing key can make one publish expensive.
struct TopicTrie {
    /// Node 0 is the root.
    nodes: Vec<TopicNode>,
    /// Every literal word of every binding, numbered, so that a key word is
    /// hashed once per publish rather than once per live node.
    vocabulary: HashMap<Box<str>, WordId>,
    /// Every binding's destination, in binding order.
    destinations: Vec<Destination>,
}

thread_local! {
    /// One bit per trie node, for de-duplicating live nodes without a
    /// per-publish allocation the size of the trie. All bits are clear
    /// whenever no `TopicTrie::route` is running on this thread.
    static LIVE: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

impl TopicTrie {
    fn new<'a>(bindings: impl Iterator<Item = (&'a str, Destination)>) -> TopicTrie {
        let mut nodes = vec![TopicNode::default()];
        let mut vocabulary: HashMap<Box<str>, WordId> = HashMap::new();
        let mut edges: HashMap<(NodeId, WordId), NodeId> = HashMap::new();
        let mut destinations = Vec::new();
        // Ids cannot overflow u32: each node, word and binding is held in
        // memory, and a binding key is at most 255 bytes.
        for (pattern, dest) in bindings {
            let mut at: NodeId = 0;
            for w in topic_words(pattern) {
                let fresh = nodes.len() as NodeId;
                let child = match w {
                    "#" => *nodes[at as usize].hash.get_or_insert(fresh),
                    "*" => *nodes[at as usize].star.get_or_insert(fresh),
                    _ => {
                        let next_word = vocabulary.len() as WordId;
                        let word = *vocabulary.entry(Box::from(w)).or_insert(next_word);
                        *edges.entry((at, word)).or_insert(fresh)
                    }
                };
                if child == fresh {
                    nodes.push(TopicNode {
                        is_hash: w == "#",
                        ..TopicNode::default()
                    });
                }
                at = child;
            }
            nodes[at as usize].ends.push(destinations.len() as u32);
            destinations.push(dest);
        }
        let mut words: Vec<Vec<(WordId, NodeId)>> = vec![Vec::new(); nodes.len()];
        for ((from, word), to) in edges {
            words[from as usize].push((word, to));
        }
        for (node, mut w) in nodes.iter_mut().zip(words) {
            w.sort_unstable();
            node.words = w.into_boxed_slice();
        }
        TopicTrie {
            nodes,
            vocabulary,
            destinations,
        }
    }

    fn route(&self, routing_key: &str, out: &mut Vec<Destination>) {
        LIVE.with_borrow_mut(|seen| {
            let need = self.nodes.len().div_ceil(64);
            if seen.len() < need {
                seen.resize(need, 0);
            }
            self.route_with(routing_key, seen, out);
        });
    }

    fn route_with(&self, routing_key: &str, seen: &mut [u64], out: &mut Vec<Destination>) {
        // Adds a node, and the `#` node after it that matches zero words, to
        // `set` unless already there. Compilation collapses "#.#", so a `#`
        // node has no `#` child and one step covers the zero-word case.
        let enter = |set: &mut Vec<NodeId>, seen: &mut [u64], id: NodeId| {
            let mut add = |id: NodeId| {
                let (slot, bit) = (id as usize / 64, 1u64 << (id % 64));
                if seen[slot] & bit == 0 {
                    seen[slot] |= bit;
                    set.push(id);
                }
            };
            add(id);
            if let Some(h) = self.nodes[id as usize].hash {
                add(h);
            }
        };
        let clear = |set: &[NodeId], seen: &mut [u64]| {
            for &id in set {
                seen[id as usize / 64] &= !(1u64 << (id % 64));
            }
        };
        let mut active: Vec<NodeId> = Vec::new();
        let mut next: Vec<NodeId> = Vec::new();
        enter(&mut active, seen, 0);
        clear(&active, seen);
        for word in split_key(routing_key) {
            let word = self.vocabulary.get(word).copied();
            next.clear();
            for &id in &active {
                let node = &self.nodes[id as usize];
                if node.is_hash {
                    // `#` absorbs this word and stays open for more.
                    enter(&mut next, seen, id);
                }
                if let Some(c) = word.and_then(|w| {
                    node.words
                        .binary_search_by_key(&w, |&(w, _)| w)
                        .ok()
                        .map(|i| node.words[i].1)
                }) {
                    enter(&mut next, seen, c);
                }
                if let Some(c) = node.star {
                    enter(&mut next, seen, c);
                }
            }
            clear(&next, seen);
            std::mem::swap(&mut active, &mut next);
            if active.is_empty() {
                return;
            }
        }
        let mut matched: Vec<u32> = active
            .iter()
            .flat_map(|&id| self.nodes[id as usize].ends.iter().copied())
            .collect();
        // Binding order, as a scan of the bindings would report them.
        matched.sort_unstable();
        out.extend(
            matched
                .into_iter()
                .map(|i| self.destinations[i as usize].clone()),
        );
    }
}

/// Whether `key` matches the topic `pattern`: dynamic programming over pattern
/// positions, O(pattern words x key words), for checking one pattern alone.
pub fn topic_match(pattern: &str, key: &str) -> bool {
    let pattern = topic_words(pattern);
    // live[i]: the key read so far can be matched by the first i pattern words.
    let mut live = vec![false; pattern.len() + 1];
    let close = |live: &mut [bool]| {
        for i in 0..pattern.len() {
            if live[i] && pattern[i] == "#" {
                live[i + 1] = true;
            }
        }
    };
    live[0] = true;
    close(&mut live);
    for word in split_key(key) {
        let mut next = vec![false; pattern.len() + 1];
        for (i, p) in pattern.iter().enumerate() {
            if !live[i] {
                continue;
            }
            match *p {
                "#" => next[i] = true,
                "*" => next[i + 1] = true,
                w if w == word => next[i + 1] = true,
                _ => {}
            }
        }
        close(&mut next);
        live = next;
    }
    live[pattern.len()]
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

    /// The matcher this module used to have: RabbitMQ's semantics written as
    /// plainly as possible, exponential on `#`, so only for tiny inputs.
    fn backtracking_match(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|i| backtracking_match(rest, &key[i..])),
            Some((&"*", rest)) => !key.is_empty() && backtracking_match(rest, &key[1..]),
            Some((w, rest)) => key.first() == Some(w) && backtracking_match(rest, &key[1..]),
        }
    }

    fn queue(name: &str) -> Destination {
        Destination::Queue(Arc::from(name))
    }

    fn trie(patterns: &[&str]) -> TopicTrie {
        TopicTrie::new(patterns.iter().map(|p| (*p, queue(p))))
    }

    fn routed(trie: &TopicTrie, key: &str) -> Vec<Destination> {
        let mut out = Vec::new();
        trie.route(key, &mut out);
        out
    }

    /// Matches through the trie and the single-pattern DP, which must agree.
    fn m(pattern: &str, key: &str) -> bool {
        let by_trie = !routed(&trie(&[pattern]), key).is_empty();
        assert_eq!(
            by_trie,
            topic_match(pattern, key),
            "trie and DP disagree on {pattern:?} vs {key:?}"
        );
        by_trie
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

    #[test]
    fn topic_wildcards_around_empty_words() {
        // `#` between empty words: "." is two empty words, ".." three.
        assert!(m(".#.", "."));
        assert!(m(".#.", ".."));
        assert!(m(".#.", "..."));
        assert!(m(".#.", ".a.b."));
        assert!(!m(".#.", ""));
        assert!(!m(".#.", "a."));
        assert!(m("#.", "."));
        assert!(m("#.", "a."));
        assert!(!m("#.", "a"));
        assert!(!m("#.", ""));
        assert!(m(".#", "."));
        assert!(m("*.*", "."));
        assert!(!m("*.*", ""));
        assert!(m("*..*", "a..b"));
        assert!(!m("*..*", "a.b"));
        // `a.#` needs the `a`, then zero or more words.
        assert!(m("a.#", "a"));
        assert!(m("a.#", "a."));
        assert!(m("a.#", "a.b.c"));
        assert!(!m("a.#", ""));
        assert!(!m("a.#", "b.a"));
        assert!(m("#.a", "a"));
        assert!(!m("#.a", "a.b"));
        // Runs of `#` mean one `#`.
        assert!(m("#.#", ""));
        assert!(m("#.#", "."));
        assert!(m("#.#", "a.b.c"));
        assert!(m("#.#.#.a.#.#", "a"));
        assert!(!m("#.#.#.a.#.#", "b"));
        // `*.#.*` needs two words at least.
        assert!(!m("*.#.*", ""));
        assert!(!m("*.#.*", "a"));
        assert!(m("*.#.*", "a.b"));
        assert!(m("*.#.*", "."));
        assert!(m("*.#.*", "a.b.c.d"));
        assert!(!m("#.*.#.*.#", "a"));
        assert!(m("#.*.#.*.#", "a.b"));
        // Wildcards only count as whole words.
        assert!(!m("a*", "ab"));
        assert!(m("a*", "a*"));
        assert!(!m("a#", "a"));
        assert!(m("a#.b", "a#.b"));
    }

    /// Every pattern of up to four words over a few literals, `*`, `#` and the
    /// empty word, against every key of up to four words: the trie (one
    /// binding, and all of them in one trie) and the DP agree with the plain
    /// backtracking definition.
    #[test]
    fn topic_matchers_agree_with_the_backtracking_definition() {
        fn all(alphabet: &[&'static str], max: usize) -> Vec<String> {
            let mut out = vec![String::new()];
            let mut layer: Vec<Vec<&str>> = vec![vec![]];
            for _ in 0..max {
                let mut longer = Vec::new();
                for w in &layer {
                    for a in alphabet {
                        let mut v = w.clone();
                        v.push(a);
                        out.push(v.join("."));
                        longer.push(v);
                    }
                }
                layer = longer;
            }
            out.sort();
            out.dedup();
            out
        }
        let patterns = all(&["a", "b", "", "*", "#"], 4);
        let keys = all(&["a", "b", ""], 4);
        let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let everything = trie(&refs);
        for key in &keys {
            let key_words: Vec<&str> = split_key(key).collect();
            let mut want = Vec::new();
            for p in &patterns {
                let p_words: Vec<&str> = split_key(p).collect();
                let expected = backtracking_match(&p_words, &key_words);
                assert_eq!(m(p, key), expected, "{p:?} vs {key:?}");
                if expected {
                    want.push(queue(p));
                }
            }
            assert_eq!(routed(&everything, key), want, "all patterns vs {key:?}");
        }
    }

    #[test]
    fn topic_routes_in_binding_order_once_per_binding() {
        let bindings = [
            ("#", "q1"),
            ("a.*", "q2"),
            ("a.b", "q1"),
            ("*.b", "q3"),
            ("a.b", "q1"),
            ("x", "q4"),
            ("#.b", "q2"),
            ("a.#", "q5"),
        ];
        let t = TopicTrie::new(bindings.iter().map(|(p, q)| (*p, queue(q))));
        let names = |key: &str| -> Vec<String> {
            routed(&t, key)
                .into_iter()
                .map(|d| match d {
                    Destination::Queue(n) | Destination::Exchange(n) => n.to_string(),
                })
                .collect()
        };
        assert_eq!(names("a.b"), ["q1", "q2", "q1", "q3", "q1", "q2", "q5"]);
        assert_eq!(names("x"), ["q1", "q4"]);
        assert_eq!(names(""), ["q1"]);
        assert!(routed(&TopicTrie::new(std::iter::empty()), "a").is_empty());
    }

    /// The bindings from the hardening issue, against the longest keys a
    /// client can send (255 bytes: up to 128 words) and the longest bindings.
    #[test]
    fn topic_pathological_patterns_are_cheap() {
        let hash_a = "#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.a.#.b";
        let hash_star = "#.*.#.*.#.*.#.*.#.*.#.*.#.*.#.*.#.x";
        let long = format!("{}#.b", "#.a.".repeat(63));
        let a100 = vec!["a"; 100].join(".");
        let a127 = vec!["a"; 127].join(".");
        let a127b = format!("{a127}.b");
        let empty128 = ".".repeat(127);
        assert!(!m(hash_a, &a100));
        assert!(!m(hash_a, &a127));
        assert!(m(hash_a, &a127b));
        assert!(!m(hash_star, &a127));
        assert!(!m(hash_star, &empty128));
        assert!(m(hash_star, &format!("{}x", ".".repeat(126))));
        assert!(!m(&long, &a127));
        assert!(m(&long, &a127b));
        assert!(!m(&long, &format!("{}.b", vec!["a"; 62].join("."))));

        // Timings for the record, not assertions: a debug build on a shared
        // machine says little about speed, only that this is no longer minutes.
        let time = |what: &str, patterns: &[&str], key: &str, runs: u32| {
            let t = trie(patterns);
            let started = std::time::Instant::now();
            let mut hits = 0;
            for _ in 0..runs {
                hits += routed(&t, std::hint::black_box(key)).len();
            }
            assert_eq!(hits, 0, "{what}");
            println!(
                "topic trie, {what}: {runs} matches in {:?}",
                started.elapsed()
            );
        };
        time("the issue's binding vs 100 a", &[hash_a], &a100, 10_000);
        time("the issue's binding vs 127 a", &[hash_a], &a127, 10_000);
        time(
            "#.*...#.x vs 128 empty words",
            &[hash_star],
            &empty128,
            10_000,
        );
        time(
            "three bindings incl. a 255-byte one vs 127 a",
            &[hash_a, hash_star, &long],
            &a127,
            1_000,
        );
        let runs = 10_000;
        let started = std::time::Instant::now();
        for _ in 0..runs {
            assert!(!topic_match(std::hint::black_box(hash_a), &a100));
        }
        println!(
            "topic DP, the issue's binding vs 100 a: {runs} matches in {:?}",
            started.elapsed()
        );
    }
}
