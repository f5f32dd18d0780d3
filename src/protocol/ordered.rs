//! Message headers edited on their wire bytes. amq-protocol decodes a field table
//! into a sorted map, so re-encoding it loses the order the publisher gave its
//! keys (in nested tables too) where RabbitMQ keeps it: removing BCC must leave
//! the rest of the headers as sent, and x-death entries have an order of their
//! own. Here a table is a list of entries whose values stay the bytes they
//! arrived as; only what the broker changes is encoded anew.

use bytes::Bytes;

use super::tables::{be_u32, scalar_width};

/// A field table's entries in their order, each value its type tag and data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawTable {
    pub entries: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The size of the value whose type tag is at `buf[at]`, tag included.
pub fn value_size(buf: &[u8], at: usize) -> Option<usize> {
    let data = at + 1;
    let kind = *buf.get(at)?;
    let n = match scalar_width(kind) {
        Some(n) => n,
        None if matches!(kind, b'S' | b'x' | b'A' | b'F') => {
            4usize.checked_add(be_u32(buf, data)?)?
        }
        None => return None,
    };
    let size = 1 + n;
    (at.checked_add(size)? <= buf.len()).then_some(size)
}

impl RawTable {
    /// The table at the start of `buf` (its 4-byte length first).
    pub fn parse(buf: &[u8]) -> Option<RawTable> {
        let len = be_u32(buf, 0)?;
        let body = buf.get(4..4usize.checked_add(len)?)?;
        let mut entries = Vec::new();
        let mut at = 0;
        while at < body.len() {
            let klen = *body.get(at)? as usize;
            let key = body.get(at + 1..at + 1 + klen)?.to_vec();
            at += 1 + klen;
            let size = value_size(body, at)?;
            entries.push((key, body[at..at + size].to_vec()));
            at += size;
        }
        Some(RawTable { entries })
    }

    /// The table's wire form, its length first.
    pub fn encode(&self) -> Vec<u8> {
        let len: usize = self
            .entries
            .iter()
            .map(|(k, v)| 1 + k.len() + v.len())
            .sum();
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        for (k, v) in &self.entries {
            out.push(k.len() as u8);
            out.extend_from_slice(k);
            out.extend_from_slice(v);
        }
        out
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|(k, _)| k == key.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    pub fn remove(&mut self, key: &str) {
        self.entries.retain(|(k, _)| k != key.as_bytes());
    }

    /// Replaces the value where the key is, or adds it at the end.
    pub fn set(&mut self, key: &str, value: Vec<u8>) {
        match self.entries.iter_mut().find(|(k, _)| k == key.as_bytes()) {
            Some((_, v)) => *v = value,
            None => self.entries.push((key.as_bytes().to_vec(), value)),
        }
    }

    /// Sorted by key, as RabbitMQ's sort_field_table leaves a table it edits.
    pub fn sort(&mut self) {
        self.entries.sort_by(|a, b| a.0.cmp(&b.0));
    }
}

/// A long string value.
pub fn longstr(s: &[u8]) -> Vec<u8> {
    let mut v = vec![b'S'];
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s);
    v
}

/// A signed 64-bit integer value (RabbitMQ's `long`).
pub fn long(n: i64) -> Vec<u8> {
    let mut v = vec![b'l'];
    v.extend_from_slice(&n.to_be_bytes());
    v
}

pub fn timestamp(secs: u64) -> Vec<u8> {
    let mut v = vec![b'T'];
    v.extend_from_slice(&secs.to_be_bytes());
    v
}

pub fn table(t: &RawTable) -> Vec<u8> {
    let mut v = vec![b'F'];
    v.extend_from_slice(&t.encode());
    v
}

/// An array of values, each already encoded with its tag.
pub fn array(items: &[Vec<u8>]) -> Vec<u8> {
    let len: usize = items.iter().map(Vec::len).sum();
    let mut v = Vec::with_capacity(5 + len);
    v.push(b'A');
    v.extend_from_slice(&(len as u32).to_be_bytes());
    for item in items {
        v.extend_from_slice(item);
    }
    v
}

/// The values of an array value (tag `A`), each with its tag.
pub fn array_items(value: &[u8]) -> Option<Vec<Vec<u8>>> {
    if value.first() != Some(&b'A') {
        return None;
    }
    let len = be_u32(value, 1)?;
    let body = value.get(5..5usize.checked_add(len)?)?;
    let mut items = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let size = value_size(body, at)?;
        items.push(body[at..at + size].to_vec());
        at += size;
    }
    Some(items)
}

/// The table of a table value (tag `F`).
pub fn table_of(value: &[u8]) -> Option<RawTable> {
    if value.first() != Some(&b'F') {
        return None;
    }
    RawTable::parse(&value[1..])
}

/// The bytes of a string value (`S`, or a byte array `x`).
pub fn string_of(value: &[u8]) -> Option<&[u8]> {
    match value.first() {
        Some(b'S' | b'x') => {
            let len = be_u32(value, 1)?;
            value.get(5..5usize.checked_add(len)?)
        }
        _ => None,
    }
}

/// An integer value of any width, as RabbitMQ reads a count.
pub fn int_of(value: &[u8]) -> Option<i128> {
    let d = value.get(1..)?;
    let b = |n: usize| d.get(..n);
    Some(match value.first()? {
        b'b' => i8::from_be_bytes(b(1)?.try_into().ok()?) as i128,
        b'B' => b(1)?[0] as i128,
        b's' => i16::from_be_bytes(b(2)?.try_into().ok()?) as i128,
        b'u' => u16::from_be_bytes(b(2)?.try_into().ok()?) as i128,
        b'I' => i32::from_be_bytes(b(4)?.try_into().ok()?) as i128,
        b'i' => u32::from_be_bytes(b(4)?.try_into().ok()?) as i128,
        b'l' => i64::from_be_bytes(b(8)?.try_into().ok()?) as i128,
        b'L' | b'T' => u64::from_be_bytes(b(8)?.try_into().ok()?) as i128,
        _ => return None,
    })
}

/// Property flags of basic's content header, in wire order, and whether each
/// is a short string (else: table, octet or 64-bit).
const PROPERTIES: [(u16, Kind); 14] = [
    (1 << 15, Kind::Short), // content-type
    (1 << 14, Kind::Short), // content-encoding
    (1 << 13, Kind::Table), // headers
    (1 << 12, Kind::Octet), // delivery-mode
    (1 << 11, Kind::Octet), // priority
    (1 << 10, Kind::Short), // correlation-id
    (1 << 9, Kind::Short),  // reply-to
    (1 << 8, Kind::Short),  // expiration
    (1 << 7, Kind::Short),  // message-id
    (1 << 6, Kind::U64),    // timestamp
    (1 << 5, Kind::Short),  // type
    (1 << 4, Kind::Short),  // user-id
    (1 << 3, Kind::Short),  // app-id
    (1 << 2, Kind::Short),  // cluster-id
];

#[derive(Clone, Copy)]
enum Kind {
    Short,
    Table,
    Octet,
    U64,
}

pub const FLAG_HEADERS: u16 = 1 << 13;
pub const FLAG_EXPIRATION: u16 = 1 << 8;

/// A content header payload taken apart: class, weight and body size as they
/// were, and each property present as its raw bytes.
pub struct RawHeader {
    prefix: [u8; 12],
    props: Vec<(u16, Vec<u8>)>,
}

impl RawHeader {
    pub fn parse(payload: &[u8]) -> Option<RawHeader> {
        let prefix: [u8; 12] = payload.get(..12)?.try_into().ok()?;
        let flags = u16::from_be_bytes(payload.get(12..14)?.try_into().ok()?);
        let mut at = 14;
        let mut props = Vec::new();
        for (flag, kind) in PROPERTIES {
            if flags & flag == 0 {
                continue;
            }
            let size = match kind {
                Kind::Short => 1 + *payload.get(at)? as usize,
                Kind::Table => 4 + be_u32(payload, at)?,
                Kind::Octet => 1,
                Kind::U64 => 8,
            };
            props.push((flag, payload.get(at..at + size)?.to_vec()));
            at += size;
        }
        Some(RawHeader { prefix, props })
    }

    /// The headers table, empty if there is none.
    pub fn headers(&self) -> Option<RawTable> {
        match self.props.iter().find(|(f, _)| *f == FLAG_HEADERS) {
            Some((_, raw)) => RawTable::parse(raw),
            None => Some(RawTable::default()),
        }
    }

    pub fn property(&self, flag: u16) -> Option<&[u8]> {
        self.props
            .iter()
            .find(|(f, _)| *f == flag)
            .map(|(_, v)| v.as_slice())
    }

    pub fn set_headers(&mut self, t: &RawTable) {
        self.props.retain(|(f, _)| *f != FLAG_HEADERS);
        self.props.push((FLAG_HEADERS, t.encode()));
        self.props.sort_by_key(|p| std::cmp::Reverse(p.0));
    }

    pub fn remove(&mut self, flag: u16) {
        self.props.retain(|(f, _)| *f != flag);
    }

    pub fn encode(&self) -> Bytes {
        let flags = self.props.iter().fold(0u16, |acc, (f, _)| acc | f);
        let mut out =
            Vec::with_capacity(14 + self.props.iter().map(|(_, v)| v.len()).sum::<usize>());
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(&flags.to_be_bytes());
        for (_, v) in &self.props {
            out.extend_from_slice(v);
        }
        Bytes::from(out)
    }
}

/// The content header without one header, every other entry left as sent.
pub fn without_header(payload: &[u8], key: &str) -> Option<Bytes> {
    let mut h = RawHeader::parse(payload)?;
    let mut t = h.headers()?;
    t.remove(key);
    h.set_headers(&t);
    Some(h.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_with(table: &RawTable) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
        p.extend_from_slice(&(FLAG_HEADERS | (1 << 12)).to_be_bytes());
        p.extend_from_slice(&table.encode());
        p.push(2);
        p
    }

    #[test]
    fn removing_one_header_keeps_the_others_in_their_order() {
        let mut nested = RawTable::default();
        nested.set("z", long(1));
        nested.set("a", long(2));
        let mut t = RawTable::default();
        t.set("x", longstr(b"1"));
        t.set("BCC", array(&[longstr(b"k")]));
        t.set("n", table(&nested));
        t.set("CC", array(&[longstr(b"c")]));
        let out = without_header(&header_with(&t), "BCC").unwrap();
        let h = RawHeader::parse(&out).unwrap();
        let kept = h.headers().unwrap();
        let keys: Vec<&[u8]> = kept.entries.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, [&b"x"[..], b"n", b"CC"]);
        let inner = table_of(kept.get("n").unwrap()).unwrap();
        assert_eq!(inner, nested, "a nested table is kept byte for byte");
        assert_eq!(h.property(1 << 12), Some(&[2u8][..]), "delivery mode kept");
        assert_eq!(&out[..12], &header_with(&t)[..12]);
    }

    #[test]
    fn values_are_read_back_as_written() {
        assert_eq!(int_of(&long(-3)), Some(-3));
        assert_eq!(int_of(&timestamp(9)), Some(9));
        assert_eq!(string_of(&longstr(b"q")), Some(&b"q"[..]));
        let a = array(&[long(1), longstr(b"x")]);
        assert_eq!(array_items(&a), Some(vec![long(1), longstr(b"x")]));
        assert_eq!(RawTable::parse(&[0, 0, 0, 9, 1]), None, "truncated");
    }
}
