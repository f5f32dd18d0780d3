//! The topic exchange: binding keys are patterns of dot-separated words where `*`
//! stands for one word and `#` for zero or more. The bindings form a trie of
//! pattern words, matched by walking every live path at once (an NFA simulation
//! over de-duplicated nodes), as RabbitMQ's topic trie does: a publish costs at
//! most key words x trie nodes, whatever the patterns. Nothing backtracks, and the
//! only recursion (binding and unbinding) is bounded by the 128 words a 255-byte
//! binding key can have.

use std::collections::HashSet;
use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::super::pmap::PMap;
use super::{any_arguments, Binding, Destination, ExchangeType, Router};

pub const TYPE: ExchangeType = ExchangeType {
    name: "topic",
    code: 3,
    empty: || Arc::new(Topic::default()),
    check_binding: any_arguments,
};

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

/// One trie node: the bindings whose pattern ends here and where each kind of
/// next pattern word leads. Nodes are shared between versions of the trie.
#[derive(Default, Clone)]
struct Node {
    words: PMap<Arc<str>, Arc<Node>>,
    star: Option<Arc<Node>>,
    hash: Option<Arc<Node>>,
    /// Reached by a `#` edge: it matches any number of words, so stays live.
    is_hash: bool,
    /// Destinations of the bindings that end here, with how many bindings each.
    ends: PMap<Destination, u32>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.words.is_empty() && self.star.is_none() && self.hash.is_none() && self.ends.is_empty()
    }

    fn child(&self, word: &str) -> Option<&Arc<Node>> {
        match word {
            "#" => self.hash.as_ref(),
            "*" => self.star.as_ref(),
            w => self.words.get(w),
        }
    }

    fn set_child(&mut self, word: &str, child: Option<Arc<Node>>) {
        match (word, child) {
            ("#", c) => self.hash = c,
            ("*", c) => self.star = c,
            (w, Some(c)) => self.words.insert(w.into(), c),
            (w, None) => self.words.remove(w),
        }
    }

    /// A copy of this node with `dest` bound at the end of `words`; the nodes off
    /// that path are shared.
    fn with(&self, words: &[&str], dest: &Destination) -> Node {
        let mut next = self.clone();
        match words.split_first() {
            None => {
                let n = self.ends.get(dest).copied().unwrap_or(0);
                next.ends.insert(dest.clone(), n + 1);
            }
            Some((w, rest)) => {
                let child = match self.child(w) {
                    Some(c) => c.with(rest, dest),
                    None => Node {
                        is_hash: *w == "#",
                        ..Node::default()
                    }
                    .with(rest, dest),
                };
                next.set_child(w, Some(Arc::new(child)));
            }
        }
        next
    }

    /// A copy of this node with one binding of `dest` at the end of `words` gone;
    /// nodes left empty are dropped.
    fn without(&self, words: &[&str], dest: &Destination) -> Node {
        let mut next = self.clone();
        match words.split_first() {
            None => match self.ends.get(dest) {
                Some(1) => next.ends.remove(dest),
                Some(n) => next.ends.insert(dest.clone(), n - 1),
                None => {}
            },
            Some((w, rest)) => {
                if let Some(c) = self.child(w) {
                    let child = c.without(rest, dest);
                    next.set_child(w, (!child.is_empty()).then(|| Arc::new(child)));
                }
            }
        }
        next
    }
}

#[derive(Default, Clone)]
struct Topic {
    root: Arc<Node>,
}

impl Router for Topic {
    fn bind(&self, b: &Binding<'_>) -> Arc<dyn Router> {
        let words = topic_words(b.routing_key);
        Arc::new(Topic {
            root: Arc::new(self.root.with(&words, b.destination)),
        })
    }

    fn unbind(&self, b: &Binding<'_>) -> Arc<dyn Router> {
        let words = topic_words(b.routing_key);
        Arc::new(Topic {
            root: Arc::new(self.root.without(&words, b.destination)),
        })
    }

    fn route<'a>(&'a self, key: &str, _: Option<&FieldTable>, out: &mut Vec<&'a Destination>) {
        let mut active = Live::default();
        let mut next = Live::default();
        active.enter(&self.root);
        for word in split_key(key) {
            next.clear();
            for node in &active.nodes {
                if node.is_hash {
                    // `#` absorbs this word and stays open for more.
                    next.enter(node);
                }
                if let Some(c) = node.words.get(word) {
                    next.enter(c);
                }
                if let Some(c) = &node.star {
                    next.enter(c);
                }
            }
            std::mem::swap(&mut active, &mut next);
            if active.nodes.is_empty() {
                return;
            }
        }
        for node in active.nodes {
            out.extend(node.ends.keys());
        }
    }
}

/// The set of live trie nodes during one match, each once.
#[derive(Default)]
struct Live<'a> {
    nodes: Vec<&'a Node>,
    /// Node addresses, once the set is too large to search linearly.
    index: Option<HashSet<*const Node>>,
}

impl<'a> Live<'a> {
    fn clear(&mut self) {
        self.nodes.clear();
        if let Some(i) = &mut self.index {
            i.clear();
        }
    }

    fn add(&mut self, node: &'a Node) {
        let p: *const Node = node;
        let fresh = match &mut self.index {
            Some(i) => i.insert(p),
            None if self.nodes.len() < 16 => !self.nodes.iter().any(|n| std::ptr::eq(*n, p)),
            None => {
                let mut i: HashSet<*const Node> =
                    self.nodes.iter().map(|n| *n as *const Node).collect();
                let fresh = i.insert(p);
                self.index = Some(i);
                fresh
            }
        };
        if fresh {
            self.nodes.push(node);
        }
    }

    /// Adds a node and the `#` node after it, which matches zero words. Runs of
    /// `#` are collapsed when binding, so a `#` node has no `#` child.
    fn enter(&mut self, node: &'a Node) {
        self.add(node);
        if let Some(h) = &node.hash {
            self.add(h);
        }
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

    fn bound<'a>(bindings: impl IntoIterator<Item = (&'a str, Destination)>) -> Arc<dyn Router> {
        let none = FieldTable::default();
        let mut t: Arc<dyn Router> = Arc::new(Topic::default());
        for (pattern, dest) in bindings {
            t = t.bind(&Binding {
                destination: &dest,
                routing_key: pattern,
                arguments: &none,
            });
        }
        t
    }

    fn trie(patterns: &[&str]) -> Arc<dyn Router> {
        bound(patterns.iter().map(|p| (*p, queue(p))))
    }

    /// The destinations a key reaches, each once, sorted.
    fn routed(trie: &Arc<dyn Router>, key: &str) -> Vec<Destination> {
        let mut out = Vec::new();
        trie.route(key, None, &mut out);
        let mut names: Vec<Destination> = out.into_iter().cloned().collect();
        names.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        names.dedup();
        names
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
            want.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
            assert_eq!(routed(&everything, key), want, "all patterns vs {key:?}");
        }
    }

    #[test]
    fn topic_routes_to_each_matching_destination_and_unbinds_one_binding_at_a_time() {
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
        let t = bound(bindings.iter().map(|(p, q)| (*p, queue(q))));
        let names = |t: &Arc<dyn Router>, key: &str| -> Vec<String> {
            routed(t, key)
                .into_iter()
                .map(|d| match d {
                    Destination::Queue(n) | Destination::Exchange(n) => n.to_string(),
                })
                .collect()
        };
        assert_eq!(names(&t, "a.b"), ["q1", "q2", "q3", "q5"]);
        assert_eq!(names(&t, "x"), ["q1", "q4"]);
        assert_eq!(names(&t, ""), ["q1"]);
        let none = FieldTable::default();
        let unbind = |t: &Arc<dyn Router>, p: &str, q: &str| {
            t.unbind(&Binding {
                destination: &queue(q),
                routing_key: p,
                arguments: &none,
            })
        };
        // "a.b" to q1 was bound twice: one unbind leaves the other.
        let t2 = unbind(&unbind(&t, "#", "q1"), "a.b", "q1");
        assert_eq!(names(&t2, "a.b"), ["q1", "q2", "q3", "q5"]);
        let t3 = unbind(&t2, "a.b", "q1");
        assert_eq!(names(&t3, "a.b"), ["q2", "q3", "q5"]);
        assert_eq!(names(&t3, "x"), ["q4"]);
        assert_eq!(names(&t, "x"), ["q1", "q4"], "older tables are untouched");
        assert!(routed(&trie(&[]), "a").is_empty());
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
