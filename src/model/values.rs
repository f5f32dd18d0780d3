//! Field-table values as RabbitMQ reads them: integers of any wire width compare
//! by value, short and long strings alike, and each type has the name RabbitMQ
//! prints in its error texts. One place, so that argument checks, header matching
//! and error messages agree.

use amq_protocol::types::AMQPValue;

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

/// An integer argument as RabbitMQ's check_int_arg takes it: any integer type
/// but a timestamp; otherwise its error term, as RabbitMQ prints it with ~p
/// (`"expected integer, got longstr"`, quotes included).
pub fn integer_arg(v: &AMQPValue) -> Result<i128, String> {
    match v {
        AMQPValue::Timestamp(_) => None,
        other => int_value(other),
    }
    .ok_or_else(|| format!("\"expected integer, got {}\"", type_name(v)))
}

/// RabbitMQ's names for field table value types.
pub fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

/// Equality for argument equivalence: by value across integer widths and string kinds.
pub fn value_eq(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (int_value(a), int_value(b)) {
        (Some(x), Some(y)) => x == y,
        _ => match (string_value(a), string_value(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

/// A value as RabbitMQ shows it in an error text.
pub fn display_value(v: &AMQPValue) -> String {
    if let Some(n) = int_value(v) {
        return n.to_string();
    }
    if let Some(s) = string_value(v) {
        return s;
    }
    match v {
        // As Erlang prints them: true, false, 1.5.
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(d) => d.to_string(),
        _ => format!("{v:?}"),
    }
}
