//! A persistent map for routing tables: cloning it is O(1) and an insert or a
//! removal copies only what it changes, so the topology can be replaced as a
//! whole on every change while publishers keep reading the old value. Small maps
//! (most trie nodes, most binding lists) are a shared slice scanned in place; large
//! ones a hash array mapped trie (imbl), whose nodes are too big for a map of two.

use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Arc;

/// Past this many entries a map becomes a trie.
const SMALL: usize = 16;

#[derive(Clone)]
pub enum PMap<K: Clone + Eq + Hash, V: Clone> {
    Small(Option<Arc<[(K, V)]>>),
    Large(imbl::HashMap<K, V>),
}

impl<K: Clone + Eq + Hash, V: Clone> Default for PMap<K, V> {
    fn default() -> Self {
        PMap::Small(None)
    }
}

pub enum Iter<'a, K, V> {
    Small(std::slice::Iter<'a, (K, V)>),
    Large(imbl::hashmap::Iter<'a, K, V, imbl::shared_ptr::DefaultSharedPtr>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Small(i) => i.next().map(|(k, v)| (k, v)),
            Iter::Large(i) => i.next(),
        }
    }
}

impl<K: Clone + Eq + Hash, V: Clone> PMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        match self {
            PMap::Small(s) => s.as_ref().map_or(0, |s| s.len()),
            PMap::Large(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            PMap::Small(s) => s
                .as_deref()
                .unwrap_or(&[])
                .iter()
                .find(|(key, _)| key.borrow() == k)
                .map(|(_, v)| v),
            PMap::Large(m) => m.get(k),
        }
    }

    pub fn contains_key<Q>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(k).is_some()
    }

    pub fn insert(&mut self, k: K, v: V) {
        match self {
            PMap::Small(s) => {
                let mut entries: Vec<(K, V)> = s.as_deref().unwrap_or(&[]).to_vec();
                match entries.iter_mut().find(|(key, _)| *key == k) {
                    Some(e) => e.1 = v,
                    None => entries.push((k, v)),
                }
                *self = if entries.len() > SMALL {
                    PMap::Large(entries.into_iter().collect())
                } else {
                    PMap::Small(Some(entries.into()))
                };
            }
            PMap::Large(m) => {
                m.insert(k, v);
            }
        }
    }

    pub fn remove<Q>(&mut self, k: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            PMap::Small(s) => {
                let entries = s.as_deref().unwrap_or(&[]);
                if entries.iter().any(|(key, _)| key.borrow() == k) {
                    let rest: Vec<(K, V)> = entries
                        .iter()
                        .filter(|(key, _)| key.borrow() != k)
                        .cloned()
                        .collect();
                    *s = (!rest.is_empty()).then(|| rest.into());
                }
            }
            PMap::Large(m) => {
                m.remove(k);
                if m.len() <= SMALL / 2 {
                    let entries: Vec<(K, V)> =
                        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                    *self = PMap::Small((!entries.is_empty()).then(|| entries.into()));
                }
            }
        }
    }

    pub fn iter(&self) -> Iter<'_, K, V> {
        match self {
            PMap::Small(s) => Iter::Small(s.as_deref().unwrap_or(&[]).iter()),
            PMap::Large(m) => Iter::Large(m.iter()),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::PMap;

    #[test]
    fn grows_and_shrinks_across_the_small_limit_keeping_old_values() {
        let mut m: PMap<u32, u32> = PMap::new();
        let mut versions = Vec::new();
        for i in 0..100 {
            versions.push(m.clone());
            m.insert(i, i * 10);
        }
        for (n, v) in versions.iter().enumerate() {
            assert_eq!(v.len(), n);
            assert_eq!(v.get(&(n as u32)), None);
            if n > 0 {
                assert_eq!(v.get(&(n as u32 - 1)), Some(&((n as u32 - 1) * 10)));
            }
        }
        m.insert(5, 7);
        assert_eq!(m.get(&5), Some(&7));
        assert_eq!(m.len(), 100);
        for i in 0..100 {
            m.remove(&i);
            assert_eq!(m.len(), 99 - i as usize);
            assert!(!m.contains_key(&i));
        }
        assert!(m.is_empty());
        assert_eq!(versions[99].iter().count(), 99);
    }
}
