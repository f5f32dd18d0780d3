//! A persistent map for the topology: cloning it is O(1), and an insert or a
//! removal copies only a part of it, so the topology can be replaced as a whole on
//! every change while publishers keep reading the old value. Small maps (most trie
//! nodes, most exchanges) are a shared slice scanned in place; large ones are
//! about sqrt(n) shards, each a std HashMap behind an Arc: a change copies the
//! shard table and one shard, O(sqrt n), and a lookup costs a std HashMap lookup,
//! with the memory of one (persistent tries with 32-way nodes cost several times
//! more per entry at 100,000 entries, most of it empty slots).

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

/// Past this many entries a map is sharded.
const SMALL: usize = 16;

#[derive(Clone)]
pub enum PMap<K: Clone + Eq + Hash, V: Clone> {
    Small(Option<Arc<[(K, V)]>>),
    Large(Arc<Sharded<K, V>>),
}

#[derive(Clone)]
pub struct Sharded<K, V> {
    shards: Box<[Arc<HashMap<K, V>>]>,
    len: usize,
    /// Picks the shard; each shard's map hashes with its own state.
    hasher: RandomState,
}

impl<K: Clone + Eq + Hash, V: Clone> Sharded<K, V> {
    fn with_entries(entries: impl Iterator<Item = (K, V)>, len: usize) -> Sharded<K, V> {
        let n = shards_for(len);
        let hasher = RandomState::new();
        let mut shards: Vec<HashMap<K, V>> = (0..n).map(|_| HashMap::new()).collect();
        for (k, v) in entries {
            let i = (hasher.hash_one(&k) as usize) & (n - 1);
            shards[i].insert(k, v);
        }
        Sharded {
            shards: shards.into_iter().map(Arc::new).collect(),
            len,
            hasher,
        }
    }

    fn shard_of<Q: Hash + ?Sized>(&self, k: &Q) -> usize {
        (self.hasher.hash_one(k) as usize) & (self.shards.len() - 1)
    }
}

/// About sqrt(len) shards, a power of two: a change then copies as many shard
/// pointers as entries of one shard.
fn shards_for(len: usize) -> usize {
    ((len as f64).sqrt() as usize)
        .next_power_of_two()
        .clamp(4, 4096)
}

impl<K: Clone + Eq + Hash, V: Clone> Default for PMap<K, V> {
    fn default() -> Self {
        PMap::Small(None)
    }
}

pub enum Iter<'a, K, V> {
    Small(std::slice::Iter<'a, (K, V)>),
    Large {
        shards: std::slice::Iter<'a, Arc<HashMap<K, V>>>,
        current: Option<std::collections::hash_map::Iter<'a, K, V>>,
    },
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Small(i) => i.next().map(|(k, v)| (k, v)),
            Iter::Large { shards, current } => loop {
                if let Some(e) = current.as_mut().and_then(|c| c.next()) {
                    return Some(e);
                }
                *current = Some(shards.next()?.iter());
            },
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
            PMap::Large(m) => m.len,
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
            PMap::Large(m) => m.shards[m.shard_of(k)].get(k),
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
                    let len = entries.len();
                    PMap::Large(Arc::new(Sharded::with_entries(entries.into_iter(), len)))
                } else {
                    PMap::Small(Some(entries.into()))
                };
            }
            PMap::Large(m) => {
                let m = Arc::make_mut(m);
                let i = m.shard_of(&k);
                if Arc::make_mut(&mut m.shards[i]).insert(k, v).is_none() {
                    m.len += 1;
                }
                if shards_for(m.len) > m.shards.len() {
                    let all: Vec<(K, V)> = m
                        .shards
                        .iter()
                        .flat_map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())))
                        .collect();
                    *m = Sharded::with_entries(all.into_iter(), m.len);
                }
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
                let i = m.shard_of(k);
                if !m.shards[i].contains_key(k) {
                    return;
                }
                let m = Arc::make_mut(m);
                Arc::make_mut(&mut m.shards[i]).remove(k);
                m.len -= 1;
                if m.len <= SMALL / 2 {
                    let entries: Vec<(K, V)> = m
                        .shards
                        .iter()
                        .flat_map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())))
                        .collect();
                    *self = PMap::Small((!entries.is_empty()).then(|| entries.into()));
                } else if shards_for(m.len) * 4 < m.shards.len() {
                    let all: Vec<(K, V)> = m
                        .shards
                        .iter()
                        .flat_map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())))
                        .collect();
                    *m = Sharded::with_entries(all.into_iter(), m.len);
                }
            }
        }
    }

    pub fn iter(&self) -> Iter<'_, K, V> {
        match self {
            PMap::Small(s) => Iter::Small(s.as_deref().unwrap_or(&[]).iter()),
            PMap::Large(m) => Iter::Large {
                shards: m.shards.iter(),
                current: None,
            },
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
