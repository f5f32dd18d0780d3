//! Field tables checked on the raw bytes before amq-protocol decodes them. Its
//! decoder recurses into nested tables and arrays and makes a heap object of
//! every value, so a client could exhaust the stack or memory with a small frame;
//! here the depth and the value count are bounded without recursion. Tables read
//! back from disk go through the same walk.

use amq_protocol::frame::parsing::parse_content_header;

use super::method_parse_error;
use crate::error::AmqpError;

/// Bounds on the field tables a client may send. amq-protocol decodes tables and
/// arrays recursively, and every value becomes a heap object, so both the nesting
/// depth (the stack) and the number of values (memory, many times the wire size)
/// are checked on the raw bytes first, without recursion.
#[derive(Debug, Clone, Copy)]
pub struct TableLimits {
    /// Tables and arrays nested in each other, the outermost table counting as 1.
    pub max_depth: usize,
    /// Values in one table, nested ones included.
    pub max_fields: usize,
}

impl TableLimits {
    /// For walking tables the broker already accepted, only to count their values.
    pub const UNBOUNDED: TableLimits = TableLimits {
        max_depth: usize::MAX,
        max_fields: usize::MAX,
    };
}

impl Default for TableLimits {
    fn default() -> Self {
        TableLimits {
            max_depth: 32,
            max_fields: 65536,
        }
    }
}

/// Why a table was refused before decoding.
#[derive(Debug, PartialEq, Eq)]
pub enum TableError {
    /// Not a well-formed table: amq-protocol would refuse it too.
    Malformed,
    TooDeep(usize),
    TooManyFields(usize),
}

impl TableError {
    fn into_amqp(self, what: &str) -> AmqpError {
        match self {
            TableError::Malformed => {
                AmqpError::syntax_error(format!("malformed field table in {what}"))
            }
            TableError::TooDeep(n) => AmqpError::syntax_error(format!(
                "field table in {what} is nested deeper than the limit of {n} levels"
            )),
            TableError::TooManyFields(n) => AmqpError::syntax_error(format!(
                "field table in {what} holds more than the limit of {n} values"
            )),
        }
    }
}

pub(super) fn be_u32(buf: &[u8], at: usize) -> Option<usize> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Checks the field table that starts at `buf[pos]` (its 4-byte length first)
/// against `limits`; returns the offset just past it and how many values it holds.
pub fn walk_table(
    buf: &[u8],
    pos: usize,
    limits: &TableLimits,
) -> Result<(usize, usize), TableError> {
    use TableError::Malformed;
    // Each open table or array: where it ends and whether its entries have keys.
    let mut open: Vec<(usize, bool)> = Vec::new();
    let len = be_u32(buf, pos).ok_or(Malformed)?;
    let end = (pos + 4)
        .checked_add(len)
        .filter(|e| *e <= buf.len())
        .ok_or(Malformed)?;
    open.push((end, true));
    let mut at = pos + 4;
    let mut fields = 0usize;
    while let Some(&(end, keyed)) = open.last() {
        if at == end {
            open.pop();
            continue;
        }
        if keyed {
            let klen = *buf.get(at).ok_or(Malformed)? as usize;
            at += 1 + klen;
        }
        let kind = *buf.get(at).filter(|_| at < end).ok_or(Malformed)?;
        at += 1;
        fields += 1;
        if fields > limits.max_fields {
            return Err(TableError::TooManyFields(limits.max_fields));
        }
        let fixed = match (kind, scalar_width(kind)) {
            (_, Some(n)) => n,
            (b'S' | b'x', None) => {
                4 + be_u32(buf, at).filter(|_| at + 4 <= end).ok_or(Malformed)?
            }
            (b'A' | b'F', None) => {
                let n = be_u32(buf, at).filter(|_| at + 4 <= end).ok_or(Malformed)?;
                let inner_end = (at + 4)
                    .checked_add(n)
                    .filter(|e| *e <= end)
                    .ok_or(Malformed)?;
                if open.len() >= limits.max_depth {
                    return Err(TableError::TooDeep(limits.max_depth));
                }
                open.push((inner_end, kind == b'F'));
                at += 4;
                continue;
            }
            _ => return Err(Malformed),
        };
        at = at
            .checked_add(fixed)
            .filter(|a| *a <= end)
            .ok_or(Malformed)?;
    }
    Ok((at, fields))
}

/// The data width of a field value type of fixed size (not a string, byte
/// array, array or table), by its type tag.
pub(super) fn scalar_width(kind: u8) -> Option<usize> {
    Some(match kind {
        b'V' => 0,
        b't' | b'b' | b'B' => 1,
        b's' | b'U' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'D' => 5,
        b'l' | b'L' | b'd' | b'T' => 8,
        _ => return None,
    })
}

/// Skips a short string (length octet + bytes).
fn skip_short(buf: &[u8], at: usize) -> Option<usize> {
    let n = *buf.get(at)? as usize;
    Some(at + 1 + n).filter(|e| *e <= buf.len())
}

/// Where the field table of a method payload starts, for the methods that carry one.
fn method_table_offset(payload: &[u8]) -> Option<Option<usize>> {
    let class = u16::from_be_bytes([*payload.first()?, *payload.get(1)?]);
    let method = u16::from_be_bytes([*payload.get(2)?, *payload.get(3)?]);
    let args = 4;
    // (shorts before the strings, short strings, a bits octet before the table)
    let (shorts, strings, bits) = match (class, method) {
        (10, 10) => return Some(Some(args + 2)), // version major and minor octets
        (10, 11) => (0, 0, 0),
        (40, 10) => (2, 2, 1),
        (40, 30) | (40, 40) => (2, 3, 1),
        (50, 10) => (2, 1, 1),
        (50, 20) => (2, 3, 1),
        (50, 50) => (2, 3, 0),
        (60, 20) => (2, 2, 1),
        _ => return Some(None),
    };
    let mut at = args + shorts;
    for _ in 0..strings {
        at = skip_short(payload, at)?;
    }
    Some(Some(at + bits))
}

/// Bounds the field table of a method frame before amq-protocol decodes it.
pub fn check_method_tables(payload: &[u8], limits: &TableLimits) -> Result<(), AmqpError> {
    // Too short to find the table: amq-protocol's parse fails cleanly on it.
    let Some(Some(at)) = method_table_offset(payload) else {
        return Ok(());
    };
    // Refused here rather than left to amq-protocol, so that whatever this walk
    // cannot follow never reaches the recursive decoder.
    match walk_table(payload, at, limits) {
        Ok(_) => Ok(()),
        Err(TableError::Malformed) => Err(method_parse_error(payload)),
        Err(e) => Err(e.into_amqp("method arguments")),
    }
}

/// Property flags of a basic content header: content-type, content-encoding, headers.
const FLAG_CONTENT_TYPE: u16 = 1 << 15;
const FLAG_CONTENT_ENCODING: u16 = 1 << 14;
const FLAG_HEADERS: u16 = 1 << 13;

/// Bounds the headers table of a content header payload (class, weight, size, flags, properties).
/// Returns how many values the headers hold (0 without headers).
pub fn check_content_header(payload: &[u8], limits: &TableLimits) -> Result<usize, AmqpError> {
    let Some(flags) = payload
        .get(12..14)
        .map(|f| u16::from_be_bytes([f[0], f[1]]))
    else {
        return Err(AmqpError::frame_error("malformed content header".into()));
    };
    if flags & FLAG_HEADERS == 0 {
        return Ok(0);
    }
    let mut at = Some(14);
    for flag in [FLAG_CONTENT_TYPE, FLAG_CONTENT_ENCODING] {
        if flags & flag != 0 {
            at = at.and_then(|a| skip_short(payload, a));
        }
    }
    let malformed = || AmqpError::frame_error("malformed content header".into());
    let at = at.ok_or_else(malformed)?;
    match walk_table(payload, at, limits) {
        Ok((_, fields)) => Ok(fields),
        Err(TableError::Malformed) => Err(malformed()),
        Err(e) => Err(e.into_amqp("message headers")),
    }
}

/// Limits for what the broker itself stored: as deep as any configuration allows.
const STORED: TableLimits = TableLimits {
    max_depth: 128,
    max_fields: usize::MAX,
};

/// Decodes a content header read back from disk, never recursing without bound
/// however the bytes were damaged.
pub fn decode_stored_header(bytes: &[u8]) -> Option<amq_protocol::frame::AMQPContentHeader> {
    check_content_header(bytes, &STORED).ok()?;
    parse_content_header(bytes).ok().map(|(_, h)| h)
}

/// Decodes a field table read back from disk (length prefix first); returns the rest.
pub fn decode_stored_table(bytes: &[u8]) -> Option<(&[u8], amq_protocol::types::FieldTable)> {
    walk_table(bytes, 0, &STORED).ok()?;
    amq_protocol::types::parsing::parse_field_table(bytes).ok()
}
