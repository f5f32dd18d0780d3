//! Every binding of a vhost as the changing side needs them: to tell a new binding
//! from a repeated one, to count them against limits, and to find the bindings a
//! deleted queue or exchange takes with it. Publishers never look here (they route
//! on each exchange's table), so these are plain maps under the vhost's writer
//! mutex, not persistent ones.

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::exchange::Destination;

/// One binding's key and arguments.
pub type KeyArgs = (Arc<str>, FieldTable);

#[derive(Default)]
pub(super) struct Bindings {
    by_source: HashMap<Arc<str>, Source>,
    /// For each destination, the exchanges with bindings to it (usually one).
    bound_from: HashMap<Destination, Vec<Arc<str>>>,
}

#[derive(Default)]
struct Source {
    to: HashMap<Destination, Vec<KeyArgs>>,
    count: usize,
}

impl Bindings {
    /// Every binding, for listings (the management API): source, destination,
    /// key and arguments.
    pub fn all(&self) -> Vec<(Arc<str>, Destination, Arc<str>, FieldTable)> {
        let mut out = Vec::new();
        for (source, s) in &self.by_source {
            for (dest, keys) in &s.to {
                for (key, args) in keys {
                    out.push((source.clone(), dest.clone(), key.clone(), args.clone()));
                }
            }
        }
        out
    }

    pub fn has(&self, source: &str, dest: &Destination, key: &str, args: &FieldTable) -> bool {
        self.by_source
            .get(source)
            .and_then(|s| s.to.get(dest))
            .is_some_and(|v| v.iter().any(|(k, a)| &**k == key && a == args))
    }

    /// Bindings whose source is this exchange.
    pub fn count(&self, source: &str) -> usize {
        self.by_source.get(source).map_or(0, |s| s.count)
    }

    /// Adds a binding; false if it was there already.
    pub fn add(
        &mut self,
        source: &Arc<str>,
        dest: &Destination,
        key: &str,
        args: &FieldTable,
    ) -> bool {
        if self.has(source, dest, key, args) {
            return false;
        }
        let s = self.by_source.entry(source.clone()).or_default();
        s.to.entry(dest.clone())
            .or_default()
            .push((key.into(), args.clone()));
        s.count += 1;
        let sources = self.bound_from.entry(dest.clone()).or_default();
        if !sources.contains(source) {
            sources.push(source.clone());
        }
        true
    }

    /// Removes a binding; false if there was none.
    pub fn remove(
        &mut self,
        source: &str,
        dest: &Destination,
        key: &str,
        args: &FieldTable,
    ) -> bool {
        let Some(s) = self.by_source.get_mut(source) else {
            return false;
        };
        let Some(list) = s.to.get_mut(dest) else {
            return false;
        };
        let Some(i) = list.iter().position(|(k, a)| &**k == key && a == args) else {
            return false;
        };
        list.remove(i);
        s.count -= 1;
        let last_to_dest = list.is_empty();
        if last_to_dest {
            s.to.remove(dest);
        }
        if s.count == 0 {
            self.by_source.remove(source);
        }
        if last_to_dest {
            self.forget_source(dest, source);
        }
        true
    }

    fn forget_source(&mut self, dest: &Destination, source: &str) {
        if let Some(sources) = self.bound_from.get_mut(dest) {
            sources.retain(|s| &**s != source);
            if sources.is_empty() {
                self.bound_from.remove(dest);
            }
        }
    }

    /// Removes every binding from `source` to `dest`, returning them.
    pub fn remove_to(&mut self, source: &str, dest: &Destination) -> Vec<KeyArgs> {
        let Some(s) = self.by_source.get_mut(source) else {
            return Vec::new();
        };
        let gone = s.to.remove(dest).unwrap_or_default();
        s.count -= gone.len();
        if s.count == 0 {
            self.by_source.remove(source);
        }
        self.forget_source(dest, source);
        gone
    }

    /// Removes every binding from `source`, returning them.
    pub fn remove_from(&mut self, source: &str) -> Vec<(Destination, KeyArgs)> {
        let Some(s) = self.by_source.remove(source) else {
            return Vec::new();
        };
        let mut gone = Vec::with_capacity(s.count);
        for (dest, list) in s.to {
            self.forget_source(&dest, source);
            gone.extend(list.into_iter().map(|ka| (dest.clone(), ka)));
        }
        gone
    }

    /// The exchanges with bindings to `dest`.
    pub fn sources_of(&self, dest: &Destination) -> Vec<Arc<str>> {
        self.bound_from.get(dest).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_are_found_from_either_end_and_counted() {
        let q = |n: &str| Destination::Queue(n.into());
        let (x, y): (Arc<str>, Arc<str>) = ("x".into(), "y".into());
        let none = FieldTable::default();
        let mut b = Bindings::default();
        assert!(b.add(&x, &q("a"), "k1", &none));
        assert!(
            !b.add(&x, &q("a"), "k1", &none),
            "a repeated binding is one"
        );
        assert!(b.add(&x, &q("a"), "k2", &none));
        assert!(b.add(&x, &q("b"), "k1", &none));
        assert!(b.add(&y, &q("a"), "k1", &none));
        assert_eq!(b.count("x"), 3);
        let mut sources = b.sources_of(&q("a"));
        sources.sort();
        assert_eq!(sources, [x.clone(), y.clone()]);
        assert!(b.remove("x", &q("a"), "k1", &none));
        assert!(!b.remove("x", &q("a"), "k1", &none));
        assert_eq!(b.sources_of(&q("a")).len(), 2, "x still binds a with k2");
        assert_eq!(b.remove_to("x", &q("a")).len(), 1);
        assert_eq!(b.sources_of(&q("a")), std::slice::from_ref(&y));
        assert_eq!(b.count("x"), 1);
        let gone = b.remove_from("x");
        assert_eq!(gone.len(), 1);
        assert_eq!(b.count("x"), 0);
        assert!(b.sources_of(&q("b")).is_empty());
        assert!(b.has("y", &q("a"), "k1", &none));
    }
}
