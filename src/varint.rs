//! LEB128 numbers and zigzag differences: the compact encodings of a queue's
//! long backlog in memory (`model/queue/ready.rs`) and of the index chunks on
//! disk (`store/chunk.rs`) write small numbers in a byte and a difference of
//! either sign as a small number.

/// A signed difference (as wrapping u64 arithmetic gives it) as a small number.
pub fn zigzag(d: u64) -> u64 {
    let d = d as i64;
    ((d << 1) ^ (d >> 63)) as u64
}

/// The difference `zigzag` was given.
pub fn unzigzag(z: u64) -> u64 {
    ((z >> 1) as i64 ^ -((z & 1) as i64)) as u64
}

/// Appends `v` in LEB128: seven bits a byte, low bits first.
pub fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads bytes and numbers off the front of a slice; every read is checked
/// against its end.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }

    /// A LEB128 number; None when the slice ends inside it or it runs past 64 bits.
    pub fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_differences_come_back() {
        let values = [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX];
        let mut out = Vec::new();
        for v in values {
            put(&mut out, v);
            put(&mut out, zigzag(v));
        }
        assert_eq!(out[..2], [0, 0]);
        let mut r = Reader(&out);
        for v in values {
            assert_eq!(r.varint(), Some(v));
            assert_eq!(r.varint().map(unzigzag), Some(v));
        }
        assert_eq!(r.byte(), None);
        assert_eq!(zigzag(5u64.wrapping_sub(6)), 1, "-1 is one byte");
        assert_eq!(Reader(&[0x80]).varint(), None, "cut short");
        assert_eq!(Reader(&[0xff; 11]).varint(), None, "past 64 bits");
    }
}
