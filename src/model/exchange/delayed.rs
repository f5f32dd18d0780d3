//! The delayed-message exchange (`x-delayed-message`, as RabbitMQ's plugin and
//! LavinMQ have it): it routes as the type its `x-delayed-type` argument names,
//! but a message with a positive `x-delay` header (milliseconds) waits that long
//! in its vhost's [`Delayed`](crate::model::delayed::Delayed) before it is routed
//! from this exchange. What this file knows is the type's rules: which arguments
//! a declaration needs, which headers delay a message and how the header reads
//! once the delay is over.

use amq_protocol::types::{AMQPValue, FieldTable};

use super::{any_arguments, by_name, ExchangeType};
use crate::error::{AmqpError, AmqpResult};
use crate::model::values::{integer_arg, string_value};
use crate::protocol::ordered::{RawHeader, RawTable};

pub const NAME: &str = "x-delayed-message";

pub const TYPE: ExchangeType = ExchangeType {
    name: NAME,
    code: 5,
    // Never used: a delayed exchange routes with the table of its x-delayed-type
    // (`ExchangeDef::routes_as`).
    empty: || (super::direct::TYPE.empty)(),
    check_binding: any_arguments,
};

/// The longest delay the plugin takes (Erlang's timer limit); a longer one, like
/// zero or a negative one, routes the message at once.
pub const MAX_DELAY_MS: u64 = 4_294_967_295;

/// The type a new delayed exchange routes as, or the error RabbitMQ's plugin
/// answers its declaration with.
pub fn routes_as(arguments: &FieldTable) -> AmqpResult<&'static ExchangeType> {
    let named = arguments
        .inner()
        .get("x-delayed-type")
        .and_then(|v| match v {
            AMQPValue::LongString(_) => string_value(v),
            _ => None,
        });
    match named.as_deref() {
        Some(NAME) => Err(AmqpError::precondition_failed(
            "Invalid argument, 'x-delayed-message' can't be used for 'x-delayed-type'".into(),
        )),
        // rabbit_exchange:check_type, as for the declared type itself.
        Some(other) => by_name(other)
            .ok_or_else(|| AmqpError::command_invalid(format!("unknown exchange type '{other}'"))),
        None => Err(AmqpError::precondition_failed(
            "Invalid argument, 'x-delayed-type' must be an existing exchange type".into(),
        )),
    }
}

/// The type a stored or already checked delayed exchange routes as.
pub fn routes_as_checked(arguments: &FieldTable) -> &'static ExchangeType {
    routes_as(arguments).unwrap_or(&super::direct::TYPE)
}

/// How long a message with these headers waits: its `x-delay` as the plugin
/// reads it (integers of any width, strings of digits, floats truncated), when
/// it is positive and within the limit.
pub fn delay_of(headers: Option<&FieldTable>) -> Option<u64> {
    let v = headers?.inner().get("x-delay")?;
    let ms: i128 = match v {
        AMQPValue::Float(f) => f.trunc() as i128,
        AMQPValue::Double(f) => f.trunc() as i128,
        AMQPValue::DecimalValue(d) => (d.value as i128) / 10i128.pow(u32::from(d.scale).min(30)),
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
            string_value(v)?.trim().parse::<i128>().ok()?
        }
        // Integers of any width, as check_int_arg takes them (no timestamp).
        other => integer_arg(other).ok()?,
    };
    (ms > 0 && ms <= MAX_DELAY_MS as i128).then_some(ms as u64)
}

/// The content header a delayed message is routed with once its delay is over:
/// `x-delay` becomes the negated delay as a signed 32-bit integer, so that no
/// delayed exchange further on delays it again and consumers can tell it was
/// delayed, and the table is sorted by key (the plugin's set_table_value).
pub fn header_after_delay(header: &[u8], delay: u64) -> Option<bytes::Bytes> {
    let mut h = RawHeader::parse(header)?;
    let mut t: RawTable = h.headers()?;
    let mut v = vec![b'I'];
    // Delays above i32::MAX wrap as Erlang's 32-bit encoding of them does.
    v.extend_from_slice(&(delay as i64).wrapping_neg().to_be_bytes()[4..]);
    t.set("x-delay", v);
    t.sort();
    h.set_headers(&t);
    Some(h.encode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ordered::{int_of, long, longstr};

    fn headers(v: AMQPValue) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-delay".into(), v);
        t
    }

    #[test]
    fn delays_read_as_the_plugin_reads_them() {
        let d = |v| delay_of(Some(&headers(v)));
        assert_eq!(d(AMQPValue::ShortShortInt(5)), Some(5));
        assert_eq!(d(AMQPValue::LongUInt(u32::MAX)), Some(MAX_DELAY_MS));
        assert_eq!(d(AMQPValue::LongLongInt(MAX_DELAY_MS as i64 + 1)), None);
        assert_eq!(d(AMQPValue::Double(9.9)), Some(9));
        assert_eq!(d(AMQPValue::LongString("12".into())), Some(12));
        assert_eq!(d(AMQPValue::LongString("1x".into())), None);
        assert_eq!(d(AMQPValue::LongInt(0)), None);
        assert_eq!(d(AMQPValue::LongInt(-1)), None);
        assert_eq!(d(AMQPValue::Timestamp(5)), None);
        assert_eq!(delay_of(None), None);
    }

    #[test]
    fn after_the_delay_x_delay_is_negated_and_the_table_sorted() {
        let mut t = RawTable::default();
        t.set("z", longstr(b"last"));
        t.set("x-delay", long(1500));
        t.set("a", longstr(b"first"));
        let mut p = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        p.extend_from_slice(&(1u16 << 13).to_be_bytes());
        p.extend_from_slice(&t.encode());
        let out = header_after_delay(&p, 1500).unwrap();
        let got = RawHeader::parse(&out).unwrap().headers().unwrap();
        let keys: Vec<&[u8]> = got.entries.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, [&b"a"[..], b"x-delay", b"z"]);
        let v = got.get("x-delay").unwrap();
        assert_eq!((v[0], int_of(v)), (b'I', Some(-1500)));
    }
}
