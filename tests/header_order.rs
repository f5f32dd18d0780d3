//! Headers as RabbitMQ 3.10.8 leaves them, order and types included, read from
//! the raw frames (client libraries decode tables into sorted maps and would not
//! show it): what the broker does not change stays as the publisher sent it, and
//! x-death entries have RabbitMQ's key order (checked against RabbitMQ side by
//! side: a first death's entry is count, reason, queue, time, exchange,
//! routing-keys; a later death's entry is sorted and goes first).

mod common;
mod raw;

use raw::*;
use warrenmq::protocol::ordered::{
    array, array_items, long, longstr, table, table_of, RawHeader, RawTable,
};

const FLAG_HEADERS: u16 = 1 << 13;

fn declare(channel: u16, name: &str, args: &RawTable) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut a, name);
    // Exclusive: gone with the connection, also on an external broker that
    // outlives the test (a message left over from an earlier run must not be read).
    a.push(0b0000_0100);
    a.extend_from_slice(&args.encode());
    method_frame(channel, QUEUE_DECLARE, &a)
}

fn get(channel: u16, queue: &str) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&0u16.to_be_bytes());
    shortstr(&mut a, queue);
    a.push(0); // no_ack = false
    method_frame(channel, (60, 70), &a)
}

fn reject(channel: u16, tag: u64) -> Vec<u8> {
    let mut a = tag.to_be_bytes().to_vec();
    a.push(0); // requeue = false
    method_frame(channel, (60, 90), &a)
}

fn dead_lettering_to(queue: &str) -> RawTable {
    let mut t = RawTable::default();
    t.set("x-dead-letter-exchange", longstr(b""));
    t.set("x-dead-letter-routing-key", longstr(queue.as_bytes()));
    t
}

/// basic.get on `queue`: the delivery tag and the content header's payload.
async fn fetch(raw: &mut Raw, queue: &str) -> (u64, Vec<u8>) {
    raw.send(&get(1, queue)).await;
    let ok = expect_method(&mut raw.stream, 1, (60, 71)).await;
    let tag = u64::from_be_bytes(ok.args()[..8].try_into().unwrap());
    let header = read_frame(&mut raw.stream).await.expect("content header");
    assert_eq!(header.kind, FRAME_HEADER);
    let _body = read_frame(&mut raw.stream).await.expect("body");
    (tag, header.payload)
}

fn keys(t: &RawTable) -> Vec<String> {
    t.entries
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_the_publishers_order_and_write_x_death_as_rabbitmq() {
    let b = common::start().await;
    let (first_q, second_q, final_q) = (
        common::unique("ho-first"),
        common::unique("ho-second"),
        common::unique("ho-final"),
    );
    let mut raw = handshake(&b).await;
    raw.open_channel(1).await;
    for (name, args) in [
        (&final_q, RawTable::default()),
        (&second_q, dead_lettering_to(&final_q)),
        (&first_q, dead_lettering_to(&second_q)),
    ] {
        raw.send(&declare(1, name, &args)).await;
        expect_method(&mut raw.stream, 1, (50, 11)).await;
    }
    // Headers in an order of the publisher's own, with a nested table in one too.
    let mut nested = RawTable::default();
    nested.set("z", long(1));
    nested.set("a", long(2));
    let mut headers = RawTable::default();
    headers.set("zeta", longstr(b"last"));
    headers.set("nested", table(&nested));
    headers.set("alpha", longstr(b"first"));
    let mut payload = vec![0, 60, 0, 0];
    payload.extend_from_slice(&4u64.to_be_bytes());
    payload.extend_from_slice(&FLAG_HEADERS.to_be_bytes());
    payload.extend_from_slice(&headers.encode());
    let mut publish = basic_publish(1, &first_q);
    publish.extend_from_slice(&frame(FRAME_HEADER, 1, &payload));
    publish.extend_from_slice(&body(1, b"body"));
    raw.send(&publish).await;

    // Delivered as published: the broker changed nothing.
    let (tag, got) = fetch(&mut raw, &first_q).await;
    assert_eq!(
        got, payload,
        "a header the broker does not touch is delivered as sent"
    );

    // First death: the top level sorted, the nested table as sent, and the
    // x-death entry in RabbitMQ's order.
    raw.send(&reject(1, tag)).await;
    let (tag, got) = fetch(&mut raw, &second_q).await;
    let h = RawHeader::parse(&got).unwrap().headers().unwrap();
    assert_eq!(
        keys(&h),
        [
            "alpha",
            "nested",
            "x-death",
            "x-first-death-exchange",
            "x-first-death-queue",
            "x-first-death-reason",
            "zeta"
        ]
    );
    assert_eq!(table_of(h.get("nested").unwrap()).unwrap(), nested);
    let deaths = array_items(h.get("x-death").unwrap()).unwrap();
    let first = table_of(&deaths[0]).unwrap();
    assert_eq!(
        keys(&first),
        [
            "count",
            "reason",
            "queue",
            "time",
            "exchange",
            "routing-keys"
        ]
    );
    assert_eq!(first.get("count").unwrap(), long(1).as_slice());
    assert_eq!(
        first.get("queue").unwrap(),
        longstr(first_q.as_bytes()).as_slice()
    );
    assert_eq!(
        first.get("routing-keys").unwrap(),
        array(&[longstr(first_q.as_bytes())]).as_slice()
    );

    // Second death: the new entry sorted and first, the first one as it was.
    raw.send(&reject(1, tag)).await;
    let (_, got) = fetch(&mut raw, &final_q).await;
    let h = RawHeader::parse(&got).unwrap().headers().unwrap();
    let deaths = array_items(h.get("x-death").unwrap()).unwrap();
    assert_eq!(deaths.len(), 2);
    let newest = table_of(&deaths[0]).unwrap();
    assert_eq!(
        keys(&newest),
        [
            "count",
            "exchange",
            "queue",
            "reason",
            "routing-keys",
            "time"
        ]
    );
    assert_eq!(
        newest.get("queue").unwrap(),
        longstr(second_q.as_bytes()).as_slice()
    );
    assert_eq!(
        table_of(&deaths[1]).unwrap(),
        first,
        "the older entry is kept as it was"
    );
    assert_eq!(
        h.get("x-first-death-queue").unwrap(),
        longstr(first_q.as_bytes()).as_slice(),
        "x-first-death-* are the first death's"
    );
}

/// connection.start lists the server's capabilities in RabbitMQ's order.
#[tokio::test]
async fn server_capabilities_come_in_rabbitmqs_order() {
    use tokio::io::AsyncWriteExt;
    let b = common::start().await;
    let mut stream = tcp(&b).await;
    stream.write_all(PROTOCOL_HEADER).await.unwrap();
    let start = expect_method(&mut stream, 0, CONNECTION_START).await;
    let props = RawTable::parse(&start.args()[2..]).expect("server properties");
    let keys = |t: &RawTable| -> Vec<String> {
        t.entries
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect()
    };
    assert_eq!(
        keys(&props)[..2],
        ["capabilities".to_string(), "cluster_name".to_string()]
    );
    let caps = table_of(props.get("capabilities").unwrap()).expect("a table");
    assert_eq!(
        keys(&caps),
        [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "consumer_priorities",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ]
    );
}
