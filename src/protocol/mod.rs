//! AMQP 0-9-1 wire format: splitting the byte stream into frames and writing frames.
//!
//! amq-protocol parses and generates methods, but it has no frame size limit and it
//! copies body frames into a `Vec`. So frame boundaries are found here: the 7-byte
//! header is checked against the negotiated frame_max before anything is buffered,
//! the end octet is checked, and bodies are split out of the read buffer as `Bytes`
//! without a copy. Hot-path frames (basic.deliver, content header, body) are written
//! by hand for the same reason.

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::{gen_class, parse_class, AMQPClass, BasicProperties};
use amq_protocol::types::ShortString;
use bytes::{BufMut, Bytes, BytesMut};

use crate::error::AmqpError;

pub mod ordered;
mod tables;

use tables::be_u32;

pub use tables::{
    check_content_header, check_method_tables, decode_stored_header, decode_stored_table,
    walk_table, TableError, TableLimits,
};

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// Type, channel and size, before the payload.
pub const FRAME_HEADER_SIZE: usize = 7;
/// Header plus end octet: what a frame costs beyond its payload.
pub const FRAME_OVERHEAD: usize = 8;
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Body frames at least this large are kept as slices of the read buffer.
const SHARE_BODY_FROM: usize = 32 * 1024;

/// One frame read from a client.
#[derive(Debug)]
pub enum Frame {
    Method(u16, Box<AMQPClass>),
    /// A content header: its raw payload (forwarded to consumers as is) and its decoded form.
    Header {
        channel: u16,
        raw: Bytes,
        body_size: u64,
        properties: Box<BasicProperties>,
    },
    Body(u16, Bytes),
    Heartbeat(u16),
    /// A method that parsed but that the broker refuses whatever the channel's
    /// state (basic.qos with a prefetch size): the channel's state decides which
    /// error comes first, so the refusal travels as a frame.
    Refused(u16, AmqpError),
}

/// What the start of a connection held.
pub enum Greeting {
    /// `AMQP\0\0\x09\x01`: go on.
    Accepted,
    /// Anything else: answer with our header and close.
    Refused,
    /// Fewer than 8 bytes so far.
    Incomplete,
}

pub fn check_protocol_header(buf: &BytesMut) -> Greeting {
    if buf.len() < PROTOCOL_HEADER.len() {
        // Refuse early when what arrived can never become the header.
        if !PROTOCOL_HEADER.starts_with(&buf[..]) {
            return Greeting::Refused;
        }
        return Greeting::Incomplete;
    }
    if &buf[..8] == PROTOCOL_HEADER {
        Greeting::Accepted
    } else {
        Greeting::Refused
    }
}

/// Takes the next whole frame out of `buf`, or `Ok(None)` when more bytes are needed.
/// `frame_max` bounds the whole frame, header and end octet included, as the spec says.
pub fn read_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, AmqpError> {
    read_frame_with(buf, frame_max, &TableLimits::default())
}

/// `read_frame` with the field-table limits the broker is configured with.
pub fn read_frame_with(
    buf: &mut BytesMut,
    frame_max: u32,
    tables: &TableLimits,
) -> Result<Option<Frame>, AmqpError> {
    if buf.len() < FRAME_HEADER_SIZE {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    // RabbitMQ's texts: `type 1, all octets = <<>>: {frame_too_large,131073,131064}`.
    let limit = (frame_max as usize).saturating_sub(FRAME_OVERHEAD);
    // RabbitMQ lets a frame exceed the limit by the frame overhead ("quite a few
    // clients get it wrong - off-by 1 or 8"), and names the limit without it.
    if size > frame_max as usize {
        return Err(AmqpError::frame_error(format!(
            "type {kind}, all octets = <<>>: {{frame_too_large,{size},{limit}}}"
        )));
    }
    let total = size + FRAME_OVERHEAD;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let payload_of = |buf: &BytesMut| buf[FRAME_HEADER_SIZE..total - 1].to_vec();
    if !matches!(
        kind,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(AmqpError::frame_error(format!(
            "type {kind}, {}: unknown_frame",
            octets(&payload_of(buf))
        )));
    }
    if buf[total - 1] != FRAME_END {
        return Err(AmqpError::frame_error(format!(
            "type {kind}, {}: {{invalid_frame_end_marker,{}}}",
            octets(&payload_of(buf)),
            buf[total - 1]
        )));
    }
    let mut frame = buf.split_to(total);
    frame.truncate(total - 1);
    let _ = frame.split_to(FRAME_HEADER_SIZE);
    let payload = frame.freeze();
    match kind {
        FRAME_METHOD => {
            // amq-protocol decodes tables recursively: bound them before it sees them.
            check_method_tables(&payload, tables)?;
            match parse_class(&payload[..]) {
                Ok(([], class)) => match check_prefetch_size(&payload) {
                    Ok(()) => Ok(Some(Frame::Method(channel, Box::new(class)))),
                    Err(e) => Ok(Some(Frame::Refused(channel, e))),
                },
                _ => Err(method_parse_error(&payload)),
            }
        }
        FRAME_HEADER => {
            check_content_header(&payload, tables)?;
            match parse_content_header(&payload[..]) {
                Ok(([], header)) => Ok(Some(Frame::Header {
                    channel,
                    // Copied for the same reason as small bodies: it lives as long as the message.
                    raw: Bytes::copy_from_slice(&payload),
                    body_size: header.body_size,
                    properties: Box::new(header.properties),
                })),
                _ => Err(AmqpError::frame_error(
                    "malformed content header".to_string(),
                )),
            }
        }
        // A small body is copied out once, so that a message left in a queue does
        // not pin the whole read buffer it arrived in; a large one is the buffer.
        FRAME_BODY if payload.len() < SHARE_BODY_FROM => {
            Ok(Some(Frame::Body(channel, Bytes::copy_from_slice(&payload))))
        }
        FRAME_BODY => Ok(Some(Frame::Body(channel, payload))),
        _ => {
            if size != 0 {
                return Err(AmqpError::frame_error(
                    "heartbeat frame with a payload".into(),
                ));
            }
            Ok(Some(Frame::Heartbeat(channel)))
        }
    }
}

/// RabbitMQ's view of a bad frame's payload: `all octets = <<...>>` (or `first 16
/// octets`), the bytes as Erlang prints a binary: a string when every byte is
/// printable, else the numbers.
pub fn octets(payload: &[u8]) -> String {
    let (what, shown) = if payload.len() <= 16 {
        ("all", payload)
    } else {
        ("first 16", &payload[..16])
    };
    format!("{what} octets = {}", erlang_binary(shown))
}

/// Bytes as Erlang prints a binary: `<<"text">>` when every byte is printable,
/// else `<<0,50,...>>`.
fn erlang_binary(shown: &[u8]) -> String {
    let printable = |b: u8| (32..=126).contains(&b) || b"\n\r\t\x0b\x08\x0c\x1b".contains(&b);
    let body = if !shown.is_empty() && shown.iter().all(|&b| printable(b)) {
        let mut s = String::from("\"");
        for &b in shown {
            match b {
                b'"' => s.push_str("\\\""),
                b'\\' => s.push_str("\\\\"),
                b'\n' => s.push_str("\\n"),
                b'\r' => s.push_str("\\r"),
                b'\t' => s.push_str("\\t"),
                0x0b => s.push_str("\\v"),
                0x08 => s.push_str("\\b"),
                0x0c => s.push_str("\\f"),
                0x1b => s.push_str("\\e"),
                _ => s.push(b as char),
            }
        }
        s.push('"');
        s
    } else {
        shown
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    format!("<<{body}>>")
}

/// basic.qos with a prefetch size: RabbitMQ does not implement it (540), and
/// amq-protocol drops the field, so it is read here from the raw arguments.
fn check_prefetch_size(payload: &[u8]) -> Result<(), AmqpError> {
    if payload.get(..4) != Some(&[0, 60, 0, 10]) {
        return Ok(());
    }
    let size = be_u32(payload, 4).unwrap_or(0);
    if size == 0 {
        return Ok(());
    }
    Err(AmqpError::not_implemented(format!("prefetch_size!=0 ({size})")).with_method(60, 10))
}

/// An unknown class or method is a command error; a known one that does not parse is a syntax error.
pub(super) fn method_parse_error(payload: &[u8]) -> AmqpError {
    if payload.len() < 4 {
        return AmqpError::syntax_error("method frame too short".into());
    }
    let class = u16::from_be_bytes([payload[0], payload[1]]);
    let method = u16::from_be_bytes([payload[2], payload[3]]);
    let known = matches!(
        (class, method),
        (10, 10..=61)
            | (20, 10..=41)
            | (30, 10..=11)
            | (40, 10..=51)
            | (50, 10..=51)
            | (60, 10..=120)
            | (85, 10..=11)
            | (90, 10..=31)
    );
    if known {
        // RabbitMQ's rabbit_misc:frame_error: the arguments it could not decode.
        AmqpError::frame_error(format!("cannot decode {}", erlang_binary(&payload[4..])))
    } else {
        AmqpError::command_invalid(format!("unknown method {class}.{method}"))
    }
    .with_method(class, method)
}

/// A short string from text that may be longer than 255 bytes (reply texts quote names).
pub fn short(s: impl Into<String>) -> ShortString {
    let mut s = s.into();
    if s.len() > 255 {
        let mut cut = 255;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    ShortString::try_new(s).unwrap_or_default()
}

/// Appends one method frame.
pub fn write_method(out: &mut BytesMut, channel: u16, class: &AMQPClass) {
    let payload = match gen_class(class)(WriteContext::from(Vec::with_capacity(64))) {
        Ok(ctx) => ctx.write,
        // Generation only fails for values we built ourselves out of range; never from input.
        Err(e) => {
            tracing::error!("cannot encode {class:?}: {e:?}");
            return;
        }
    };
    out.reserve(payload.len() + FRAME_OVERHEAD);
    out.put_u8(FRAME_METHOD);
    out.put_u16(channel);
    out.put_u32(payload.len() as u32);
    out.put_slice(&payload);
    out.put_u8(FRAME_END);
}

pub fn write_heartbeat(out: &mut BytesMut) {
    out.put_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

fn put_short_str(out: &mut BytesMut, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(255);
    out.put_u8(n as u8);
    out.put_slice(&b[..n]);
}

/// basic.deliver, written by hand: it is the hottest frame the broker sends.
pub fn write_deliver(
    out: &mut BytesMut,
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) {
    let start = out.len();
    out.put_u8(FRAME_METHOD);
    out.put_u16(channel);
    out.put_u32(0);
    out.put_u16(60);
    out.put_u16(60);
    put_short_str(out, consumer_tag);
    out.put_u64(delivery_tag);
    out.put_u8(redelivered as u8);
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    patch_size_and_end(out, start);
}

/// basic.get-ok, written by hand like deliver.
pub fn write_get_ok(
    out: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
    message_count: u32,
) {
    let start = out.len();
    out.put_u8(FRAME_METHOD);
    out.put_u16(channel);
    out.put_u32(0);
    out.put_u16(60);
    out.put_u16(71);
    out.put_u64(delivery_tag);
    out.put_u8(redelivered as u8);
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    out.put_u32(message_count);
    patch_size_and_end(out, start);
}

/// basic.return, before the returned content.
pub fn write_return(
    out: &mut BytesMut,
    channel: u16,
    reply_code: u16,
    reply_text: &str,
    exchange: &str,
    routing_key: &str,
) {
    let start = out.len();
    out.put_u8(FRAME_METHOD);
    out.put_u16(channel);
    out.put_u32(0);
    out.put_u16(60);
    out.put_u16(50);
    out.put_u16(reply_code);
    put_short_str(out, reply_text);
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    patch_size_and_end(out, start);
}

fn patch_size_and_end(out: &mut BytesMut, start: usize) {
    let size = (out.len() - start - FRAME_HEADER_SIZE) as u32;
    out[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
    out.put_u8(FRAME_END);
}

/// The content header frame around a raw header payload exactly as the publisher sent it.
pub fn write_content_header(out: &mut BytesMut, channel: u16, raw: &[u8]) {
    out.reserve(raw.len() + FRAME_OVERHEAD);
    out.put_u8(FRAME_HEADER);
    out.put_u16(channel);
    out.put_u32(raw.len() as u32);
    out.put_slice(raw);
    out.put_u8(FRAME_END);
}

/// The 7-byte header of one body frame; the payload and the end octet follow.
pub fn body_frame_header(channel: u16, len: usize) -> [u8; 7] {
    let c = channel.to_be_bytes();
    let l = (len as u32).to_be_bytes();
    [FRAME_BODY, c[0], c[1], l[0], l[1], l[2], l[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0x7f, 0xff, 0xff, 0xff][..]);
        let err = read_frame(&mut buf, 131072).unwrap_err();
        assert_eq!(err.code, 501);
    }

    #[test]
    fn body_frame_is_split_without_copy() {
        let mut buf = BytesMut::new();
        buf.put_slice(&body_frame_header(3, 5));
        buf.put_slice(b"hello");
        buf.put_u8(FRAME_END);
        buf.put_u8(8);
        match read_frame(&mut buf, 4096).unwrap() {
            Some(Frame::Body(3, b)) => assert_eq!(&b[..], b"hello"),
            other => panic!("{other:?}"),
        }
        assert_eq!(&buf[..], &[8]);
    }

    #[test]
    fn bad_end_octet_is_a_frame_error() {
        let mut buf = BytesMut::from(&[8u8, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(read_frame(&mut buf, 4096).unwrap_err().code, 501);
    }
}
