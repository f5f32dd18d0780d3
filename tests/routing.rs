//! Routing through every exchange type, driven by the lapin client.
//!
//! Each test publishes on the same channel it later uses for `basic.get`, so
//! a message that was routed is already in its queue when we look (RabbitMQ
//! orders operations of one channel), and an empty `basic.get` proves a
//! message was not routed.

mod common;
mod support;

use lapin::{
    options::*,
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties, Channel, ExchangeKind,
};
use support::*;

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// Publishes `body` with the given headers to `exchange` (routing key ignored by headers exchanges).
async fn publish_headers(ch: &Channel, exchange: &str, body: &str, headers: FieldTable) {
    publish_props(
        ch,
        exchange,
        "ignored",
        body.as_bytes(),
        BasicProperties::default().with_headers(headers),
    )
    .await;
}

/// For each routing key, publishes a message whose body is the key, then
/// returns which keys reached `queue`.
async fn routed_keys(ch: &Channel, exchange: &str, queue: &str, keys: &[&str]) -> Vec<String> {
    for k in keys {
        publish(ch, exchange, k, format!("<{k}>").as_bytes()).await;
    }
    drain(ch, queue)
        .await
        .into_iter()
        .map(|b| b.trim_start_matches('<').trim_end_matches('>').to_string())
        .collect()
}

async fn exchange_exists(b: &common::TestBroker, name: &str) -> bool {
    // A failed passive declare closes the channel, so probe on a throwaway one.
    let conn = connect(b).await;
    let ch = channel(&conn).await;
    let r = tokio::time::timeout(
        WAIT,
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("passive exchange.declare timed out");
    let _ = conn.close(200, "bye".into()).await;
    match r {
        Ok(()) => true,
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(err) if err.get_id() == 404 => false,
            other => panic!("unexpected passive declare error {other:?}"),
        },
    }
}

// ---------------------------------------------------------------- direct

/// A direct exchange delivers to every queue whose binding key equals the
/// routing key exactly (case-sensitive), and drops everything else.
#[tokio::test]
async fn direct_routes_on_exact_key_to_every_matching_queue() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Direct, "direct").await;
    let q1 = temp_queue(&ch, "d1").await;
    let q2 = temp_queue(&ch, "d2").await;
    let q3 = temp_queue(&ch, "d3").await;
    bind(&ch, &q1, &x, "orange").await;
    bind(&ch, &q2, &x, "black").await;
    bind(&ch, &q3, &x, "orange").await;

    for k in ["orange", "black", "green", "Orange", "orange.x", ""] {
        publish(&ch, &x, k, k.as_bytes()).await;
    }
    assert_eq!(drain(&ch, &q1).await, strs(&["orange"]));
    assert_eq!(drain(&ch, &q2).await, strs(&["black"]));
    assert_eq!(drain(&ch, &q3).await, strs(&["orange"]));
    delete_exchange(&ch, &x).await;
}

/// A queue bound to one exchange under several keys (or the same key twice)
/// still receives a single copy of each message.
#[tokio::test]
async fn direct_duplicate_bindings_deliver_one_copy() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Direct, "direct").await;
    let q = temp_queue(&ch, "dup").await;
    bind(&ch, &q, &x, "k").await;
    bind(&ch, &q, &x, "k").await;
    bind(&ch, &q, &x, "other").await;
    publish(&ch, &x, "k", b"one").await;
    publish(&ch, &x, "other", b"two").await;
    assert_eq!(drain(&ch, &q).await, strs(&["one", "two"]));
    delete_exchange(&ch, &x).await;
}

/// A delivered message reports the exchange and routing key it was published with.
#[tokio::test]
async fn delivery_carries_exchange_and_routing_key() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Direct, "direct").await;
    let q = temp_queue(&ch, "meta").await;
    bind(&ch, &q, &x, "rk-1").await;
    publish(&ch, &x, "rk-1", b"hello").await;
    let m = get(&ch, &q).await.expect("message routed");
    assert_eq!(m.delivery.exchange.as_str(), x);
    assert_eq!(m.delivery.routing_key.as_str(), "rk-1");
    assert!(!m.delivery.redelivered);
    assert_eq!(m.delivery.data, b"hello");
    delete_exchange(&ch, &x).await;
}

// ---------------------------------------------------------------- fanout

/// A fanout exchange copies every message to every bound queue, whatever the
/// routing key or binding key.
#[tokio::test]
async fn fanout_copies_to_all_queues_ignoring_keys() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Fanout, "fanout").await;
    let q1 = temp_queue(&ch, "f1").await;
    let q2 = temp_queue(&ch, "f2").await;
    let q3 = temp_queue(&ch, "f3").await;
    bind(&ch, &q1, &x, "").await;
    bind(&ch, &q2, &x, "some.key").await;
    bind(&ch, &q3, &x, "#").await;
    publish(&ch, &x, "", b"a").await;
    publish(&ch, &x, "whatever", b"b").await;
    for q in [&q1, &q2, &q3] {
        assert_eq!(drain(&ch, q).await, strs(&["a", "b"]), "queue {q}");
    }
    delete_exchange(&ch, &x).await;
}

/// A fanout exchange with no bindings silently drops messages (no error
/// without the mandatory flag).
#[tokio::test]
async fn fanout_without_bindings_drops_messages() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Fanout, "fanout").await;
    publish(&ch, &x, "", b"lost").await;
    // The channel is still usable.
    let q = temp_queue(&ch, "after").await;
    assert_eq!(get_body(&ch, &q).await, None);
    delete_exchange(&ch, &x).await;
}

// ---------------------------------------------------------------- topic

/// `*` matches exactly one word; literal words must match exactly.
#[tokio::test]
async fn topic_star_matches_exactly_one_word() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Topic, "topic").await;
    let q = temp_queue(&ch, "star").await;
    bind(&ch, &q, &x, "stock.*.nyse").await;
    let got = routed_keys(
        &ch,
        &x,
        &q,
        &[
            "stock.ibm.nyse",
            "stock.nyse",
            "stock.ibm.x.nyse",
            "stock.ibm.nasdaq",
            "Stock.ibm.nyse",
            "stock.a.nyse",
        ],
    )
    .await;
    assert_eq!(got, strs(&["stock.ibm.nyse", "stock.a.nyse"]));
    delete_exchange(&ch, &x).await;
}

/// `#` matches zero or more words, at the start, middle or end of a pattern.
#[tokio::test]
async fn topic_hash_matches_zero_or_more_words() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Topic, "topic").await;
    let tail = temp_queue(&ch, "tail").await;
    let head = temp_queue(&ch, "head").await;
    let mid = temp_queue(&ch, "mid").await;
    bind(&ch, &tail, &x, "a.#").await;
    bind(&ch, &head, &x, "#.z").await;
    bind(&ch, &mid, &x, "a.#.z").await;
    let keys = [
        "a", "a.b", "a.b.c", "b.a", "z", "y.z", "x.y.z", "a.z", "a.b.c.z", "az",
    ];
    for k in keys {
        publish(&ch, &x, k, k.as_bytes()).await;
    }
    assert_eq!(
        drain(&ch, &tail).await,
        strs(&["a", "a.b", "a.b.c", "a.z", "a.b.c.z"])
    );
    assert_eq!(
        drain(&ch, &head).await,
        strs(&["z", "y.z", "x.y.z", "a.z", "a.b.c.z"])
    );
    assert_eq!(drain(&ch, &mid).await, strs(&["a.z", "a.b.c.z"]));
    delete_exchange(&ch, &x).await;
}

/// A lone `#` matches every routing key, including the empty one; a lone `*`
/// matches any single-word key but not the empty key (which has zero words).
#[tokio::test]
async fn topic_lone_hash_and_lone_star() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Topic, "topic").await;
    let all = temp_queue(&ch, "all").await;
    let one = temp_queue(&ch, "one").await;
    bind(&ch, &all, &x, "#").await;
    bind(&ch, &one, &x, "*").await;
    let keys = ["", "a", "a.b", "."];
    for k in keys {
        publish(&ch, &x, k, format!("<{k}>").as_bytes()).await;
    }
    assert_eq!(drain(&ch, &all).await, strs(&["<>", "<a>", "<a.b>", "<.>"]));
    assert_eq!(drain(&ch, &one).await, strs(&["<a>"]));
    delete_exchange(&ch, &x).await;
}

/// Empty words count as words (RabbitMQ semantics): "a." is two words, the
/// second empty, so `a.*` matches it; ".." is three empty words.
#[tokio::test]
async fn topic_empty_words_are_words() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Topic, "topic").await;
    let a_star = temp_queue(&ch, "astar").await;
    let star_star = temp_queue(&ch, "starstar").await;
    let literal = temp_queue(&ch, "literal").await;
    bind(&ch, &a_star, &x, "a.*").await;
    bind(&ch, &star_star, &x, "*.*").await;
    bind(&ch, &literal, &x, "a..b").await;
    let keys = ["a.", "a", ".", "..", "a..b", "a.b", ".a"];
    assert_eq!(
        routed_keys(&ch, &x, &a_star, &keys).await,
        strs(&["a.", "a.b"])
    );
    assert_eq!(
        drain(&ch, &star_star)
            .await
            .into_iter()
            .map(|b| b.trim_matches(|c| c == '<' || c == '>').to_string())
            .collect::<Vec<_>>(),
        strs(&["a.", ".", "a.b", ".a"])
    );
    assert_eq!(drain(&ch, &literal).await, strs(&["<a..b>"]));
    delete_exchange(&ch, &x).await;
}

/// `#` next to other wildcards: `#.*` needs at least one word, `*.#.*` at
/// least two, and `#.#` behaves like `#`.
#[tokio::test]
async fn topic_combined_wildcards() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Topic, "topic").await;
    let q1 = temp_queue(&ch, "hs").await;
    let q2 = temp_queue(&ch, "shs").await;
    let q3 = temp_queue(&ch, "hh").await;
    bind(&ch, &q1, &x, "#.*").await;
    bind(&ch, &q2, &x, "*.#.*").await;
    bind(&ch, &q3, &x, "#.#").await;
    let keys = ["", "a", "a.b", "a.b.c"];
    for k in keys {
        publish(&ch, &x, k, format!("<{k}>").as_bytes()).await;
    }
    assert_eq!(drain(&ch, &q1).await, strs(&["<a>", "<a.b>", "<a.b.c>"]));
    assert_eq!(drain(&ch, &q2).await, strs(&["<a.b>", "<a.b.c>"]));
    assert_eq!(
        drain(&ch, &q3).await,
        strs(&["<>", "<a>", "<a.b>", "<a.b.c>"])
    );
    delete_exchange(&ch, &x).await;
}

/// A queue whose several topic bindings all match a message gets it once.
#[tokio::test]
async fn topic_overlapping_bindings_deliver_once() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Topic, "topic").await;
    let q = temp_queue(&ch, "overlap").await;
    for pattern in ["a.*", "*.b", "#", "a.b"] {
        bind(&ch, &q, &x, pattern).await;
    }
    publish(&ch, &x, "a.b", b"once").await;
    assert_eq!(drain(&ch, &q).await, strs(&["once"]));
    delete_exchange(&ch, &x).await;
}

// ---------------------------------------------------------------- headers

/// x-match=all (also the default) requires every non-x- binding header to be
/// present with an equal value; extra message headers don't matter; the
/// routing key is ignored.
#[tokio::test]
async fn headers_match_all() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Headers, "headers").await;
    let explicit = temp_queue(&ch, "all").await;
    let implicit = temp_queue(&ch, "default").await;
    bind_args(
        &ch,
        &explicit,
        &x,
        "",
        table(&[
            ("x-match", s("all")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]),
    )
    .await;
    bind_args(
        &ch,
        &implicit,
        &x,
        "",
        table(&[("format", s("pdf")), ("type", s("report"))]),
    )
    .await;

    publish_headers(
        &ch,
        &x,
        "both",
        table(&[("format", s("pdf")), ("type", s("report"))]),
    )
    .await;
    publish_headers(
        &ch,
        &x,
        "both+extra",
        table(&[
            ("format", s("pdf")),
            ("type", s("report")),
            ("lang", s("en")),
        ]),
    )
    .await;
    publish_headers(&ch, &x, "one", table(&[("format", s("pdf"))])).await;
    publish_headers(
        &ch,
        &x,
        "wrong-value",
        table(&[("format", s("zip")), ("type", s("report"))]),
    )
    .await;
    publish_headers(&ch, &x, "none", FieldTable::default()).await;
    publish(&ch, &x, "no-headers-property", b"bare").await;

    assert_eq!(drain(&ch, &explicit).await, strs(&["both", "both+extra"]));
    assert_eq!(drain(&ch, &implicit).await, strs(&["both", "both+extra"]));
    delete_exchange(&ch, &x).await;
}

/// x-match=any routes when at least one non-x- binding header matches.
#[tokio::test]
async fn headers_match_any() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Headers, "headers").await;
    let q = temp_queue(&ch, "any").await;
    bind_args(
        &ch,
        &q,
        &x,
        "",
        table(&[
            ("x-match", s("any")),
            ("format", s("pdf")),
            ("type", s("log")),
        ]),
    )
    .await;
    publish_headers(&ch, &x, "format", table(&[("format", s("pdf"))])).await;
    publish_headers(
        &ch,
        &x,
        "type",
        table(&[("type", s("log")), ("other", s("x"))]),
    )
    .await;
    publish_headers(
        &ch,
        &x,
        "neither",
        table(&[("format", s("zip")), ("type", s("report"))]),
    )
    .await;
    publish_headers(&ch, &x, "empty", FieldTable::default()).await;
    assert_eq!(drain(&ch, &q).await, strs(&["format", "type"]));
    delete_exchange(&ch, &x).await;
}

/// Header values are compared with their type: the string "1" does not
/// match the integer 1, but integers of the same value match.
#[tokio::test]
async fn headers_compare_values_with_type() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Headers, "headers").await;
    let q = temp_queue(&ch, "typed").await;
    bind_args(
        &ch,
        &q,
        &x,
        "",
        table(&[("x-match", s("all")), ("n", AMQPValue::LongInt(1))]),
    )
    .await;
    publish_headers(&ch, &x, "int", table(&[("n", AMQPValue::LongInt(1))])).await;
    publish_headers(&ch, &x, "string", table(&[("n", s("1"))])).await;
    publish_headers(&ch, &x, "other-int", table(&[("n", AMQPValue::LongInt(2))])).await;
    assert_eq!(drain(&ch, &q).await, strs(&["int"]));
    delete_exchange(&ch, &x).await;
}

/// With plain all/any, binding arguments starting with "x-" are ignored when
/// matching; with all-with-x/any-with-x they take part in the match.
#[tokio::test]
async fn headers_with_x_variants_consider_x_headers() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Headers, "headers").await;
    let all = temp_queue(&ch, "all").await;
    let all_x = temp_queue(&ch, "allx").await;
    let any = temp_queue(&ch, "any").await;
    let any_x = temp_queue(&ch, "anyx").await;
    let args = |mode: &str| {
        table(&[
            ("x-match", s(mode)),
            ("x-tenant", s("t1")),
            ("kind", s("a")),
        ])
    };
    bind_args(&ch, &all, &x, "", args("all")).await;
    bind_args(&ch, &all_x, &x, "", args("all-with-x")).await;
    bind_args(&ch, &any, &x, "", args("any")).await;
    bind_args(&ch, &any_x, &x, "", args("any-with-x")).await;

    publish_headers(&ch, &x, "kind", table(&[("kind", s("a"))])).await;
    publish_headers(&ch, &x, "tenant", table(&[("x-tenant", s("t1"))])).await;
    publish_headers(
        &ch,
        &x,
        "both",
        table(&[("kind", s("a")), ("x-tenant", s("t1"))]),
    )
    .await;
    publish_headers(
        &ch,
        &x,
        "kind+other-tenant",
        table(&[("kind", s("a")), ("x-tenant", s("t2"))]),
    )
    .await;

    assert_eq!(
        drain(&ch, &all).await,
        strs(&["kind", "both", "kind+other-tenant"])
    );
    assert_eq!(drain(&ch, &all_x).await, strs(&["both"]));
    assert_eq!(
        drain(&ch, &any).await,
        strs(&["kind", "both", "kind+other-tenant"])
    );
    assert_eq!(
        drain(&ch, &any_x).await,
        strs(&["kind", "tenant", "both", "kind+other-tenant"])
    );
    delete_exchange(&ch, &x).await;
}

/// A headers binding with no match arguments: with x-match=all it matches
/// every message (nothing to disagree with), with x-match=any it matches none.
#[tokio::test]
async fn headers_empty_binding_all_matches_everything_any_nothing() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = temp_exchange(&ch, ExchangeKind::Headers, "headers").await;
    let all = temp_queue(&ch, "all").await;
    let any = temp_queue(&ch, "any").await;
    bind(&ch, &all, &x, "").await;
    bind_args(&ch, &any, &x, "", table(&[("x-match", s("any"))])).await;
    publish_headers(&ch, &x, "h", table(&[("k", s("v"))])).await;
    publish(&ch, &x, "rk", b"plain").await;
    assert_eq!(drain(&ch, &all).await, strs(&["h", "plain"]));
    assert_eq!(drain(&ch, &any).await, Vec::<String>::new());
    delete_exchange(&ch, &x).await;
}

// ---------------------------------------------------------------- default & predeclared

/// The default exchange "" routes to the queue named by the routing key, and
/// drops messages whose routing key names no queue.
#[tokio::test]
async fn default_exchange_routes_by_queue_name() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q1 = temp_queue(&ch, "dq1").await;
    let q2 = temp_queue(&ch, "dq2").await;
    publish(&ch, "", &q1, b"to-1").await;
    publish(&ch, "", &q2, b"to-2").await;
    publish(&ch, "", &common::unique("nobody"), b"lost").await;
    let m = get(&ch, &q1).await.expect("routed to q1");
    assert_eq!(m.delivery.exchange.as_str(), "");
    assert_eq!(m.delivery.routing_key.as_str(), q1);
    assert_eq!(m.delivery.data, b"to-1");
    ok("ack", m.delivery.ack(BasicAckOptions::default())).await;
    assert_eq!(drain(&ch, &q1).await, Vec::<String>::new());
    assert_eq!(drain(&ch, &q2).await, strs(&["to-2"]));
}

/// The standard exchanges amq.direct, amq.fanout, amq.topic, amq.headers and
/// amq.match exist in every vhost and route like their type.
#[tokio::test]
async fn predeclared_amq_exchanges_route() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let q = temp_queue(&ch, "amq").await;
    bind(&ch, &q, "amq.direct", &q).await;
    bind(&ch, &q, "amq.fanout", "").await;
    bind(&ch, &q, "amq.topic", &format!("{q}.#")).await;
    let hdr = table(&[("x-match", s("all")), ("dest", s(&q))]);
    bind_args(&ch, &q, "amq.headers", "", hdr.clone()).await;
    bind_args(&ch, &q, "amq.match", "", hdr).await;

    publish(&ch, "amq.direct", &q, b"direct").await;
    publish(&ch, "amq.fanout", "x", b"fanout").await;
    publish(&ch, "amq.topic", &format!("{q}.a.b"), b"topic").await;
    publish_headers(&ch, "amq.headers", "headers", table(&[("dest", s(&q))])).await;
    publish_headers(&ch, "amq.match", "match", table(&[("dest", s(&q))])).await;
    let mut got = drain(&ch, &q).await;
    // amq.fanout is shared by every test on an external broker, so only look
    // for what we sent.
    got.retain(|m| ["direct", "fanout", "topic", "headers", "match"].contains(&m.as_str()));
    assert!(got.contains(&"fanout".to_string()));
    got.retain(|m| m != "fanout");
    assert_eq!(got, strs(&["direct", "topic", "headers", "match"]));
}

// ---------------------------------------------------------------- exchange-to-exchange

/// An exchange bound to another exchange receives the messages its binding
/// matches and routes them on with its own rules; the delivery still names
/// the exchange the message was published to.
#[tokio::test]
async fn exchange_to_exchange_binding_forwards_matching_messages() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let src = temp_exchange(&ch, ExchangeKind::Topic, "e2e-src").await;
    let dst = temp_exchange(&ch, ExchangeKind::Direct, "e2e-dst").await;
    let q = temp_queue(&ch, "e2e").await;
    ok(
        "exchange.bind",
        ch.exchange_bind(
            dst.as_str().into(),
            src.as_str().into(),
            "logs.#".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    bind(&ch, &q, &dst, "logs.error").await;

    publish(&ch, &src, "logs.error", b"forwarded").await;
    publish(&ch, &src, "logs.info", b"filtered-by-dst").await;
    publish(&ch, &src, "metrics.error", b"filtered-by-binding").await;

    let m = get(&ch, &q).await.expect("forwarded message");
    assert_eq!(m.delivery.data, b"forwarded");
    assert_eq!(m.delivery.exchange.as_str(), src);
    assert_eq!(m.delivery.routing_key.as_str(), "logs.error");
    ok("ack", m.delivery.ack(BasicAckOptions::default())).await;
    assert_eq!(drain(&ch, &q).await, Vec::<String>::new());

    ok(
        "exchange.unbind",
        ch.exchange_unbind(
            dst.as_str().into(),
            src.as_str().into(),
            "logs.#".into(),
            ExchangeUnbindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    publish(&ch, &src, "logs.error", b"after-unbind").await;
    assert_eq!(drain(&ch, &q).await, Vec::<String>::new());
    delete_exchange(&ch, &src).await;
    delete_exchange(&ch, &dst).await;
}

/// Exchange bindings forming a cycle (x1 -> x2 -> x1) terminate, and a queue
/// reachable along several paths receives exactly one copy.
#[tokio::test]
async fn exchange_binding_cycle_delivers_exactly_once() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x1 = temp_exchange(&ch, ExchangeKind::Fanout, "cyc1").await;
    let x2 = temp_exchange(&ch, ExchangeKind::Fanout, "cyc2").await;
    for (dst, src) in [(&x2, &x1), (&x1, &x2)] {
        ok(
            "exchange.bind",
            ch.exchange_bind(
                dst.as_str().into(),
                src.as_str().into(),
                "".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
    }
    let both = temp_queue(&ch, "both").await;
    let only2 = temp_queue(&ch, "only2").await;
    bind(&ch, &both, &x1, "").await;
    bind(&ch, &both, &x2, "").await;
    bind(&ch, &only2, &x2, "").await;

    publish(&ch, &x1, "", b"via-x1").await;
    publish(&ch, &x2, "", b"via-x2").await;
    assert_eq!(drain(&ch, &both).await, strs(&["via-x1", "via-x2"]));
    assert_eq!(drain(&ch, &only2).await, strs(&["via-x1", "via-x2"]));
    delete_exchange(&ch, &x1).await;
    delete_exchange(&ch, &x2).await;
}

/// Two routes to the same queue (a diamond: x -> a -> q and x -> b -> q)
/// still deliver one copy.
#[tokio::test]
async fn exchange_binding_diamond_delivers_once() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let top = temp_exchange(&ch, ExchangeKind::Fanout, "top").await;
    let left = temp_exchange(&ch, ExchangeKind::Direct, "left").await;
    let right = temp_exchange(&ch, ExchangeKind::Topic, "right").await;
    for (dst, key) in [(&left, "k"), (&right, "#")] {
        ok(
            "exchange.bind",
            ch.exchange_bind(
                dst.as_str().into(),
                top.as_str().into(),
                key.into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
    }
    let q = temp_queue(&ch, "diamond").await;
    bind(&ch, &q, &left, "k").await;
    bind(&ch, &q, &right, "k").await;
    publish(&ch, &top, "k", b"one").await;
    assert_eq!(drain(&ch, &q).await, strs(&["one"]));
    for x in [&top, &left, &right] {
        delete_exchange(&ch, x).await;
    }
}

/// An internal exchange cannot be published to directly (403
/// ACCESS_REFUSED closes the channel) but routes messages that reach it
/// through an exchange-to-exchange binding.
#[tokio::test]
async fn internal_exchange_only_reachable_through_bindings() {
    let b = common::start().await;
    let (conn, ch) = open(&b).await;
    let front = temp_exchange(&ch, ExchangeKind::Fanout, "front").await;
    let internal = common::unique("internal");
    ok(
        "exchange.declare internal",
        ch.exchange_declare(
            internal.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                internal: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    ok(
        "exchange.bind",
        ch.exchange_bind(
            internal.as_str().into(),
            front.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let q = temp_queue(&ch, "behind-internal").await;
    bind(&ch, &q, &internal, "").await;
    publish(&ch, &front, "", b"via-front").await;
    assert_eq!(drain(&ch, &q).await, strs(&["via-front"]));

    let bad = channel(&conn).await;
    confirm_mode(&bad).await;
    // The refusal arrives as channel.close; the pending confirm reports it.
    let sent = bad
        .basic_publish(
            internal.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            b"direct",
            BasicProperties::default(),
        )
        .await;
    let err = match sent {
        Err(e) => e,
        Ok(confirm) => tokio::time::timeout(WAIT, confirm)
            .await
            .expect("the confirm settles")
            .expect_err("publishing to an internal exchange fails"),
    };
    let (code, text) = match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => (e.get_id(), e.get_message().to_string()),
        other => panic!("expected a channel close, got {other:?}"),
    };
    assert_eq!(code, 403, "{text}");
    assert!(text.starts_with("ACCESS_REFUSED"), "{text}");
    assert_eq!(drain(&ch, &q).await, Vec::<String>::new());
    delete_exchange(&ch, &front).await;
    delete_exchange(&ch, &internal).await;
}

// ---------------------------------------------------------------- auto-delete

/// An auto-delete exchange survives while it has no bindings yet, and is
/// deleted when its last binding is removed.
#[tokio::test]
async fn auto_delete_exchange_goes_away_with_last_binding() {
    let b = common::start().await;
    let (_c, ch) = open(&b).await;
    let x = common::unique("autodel");
    ok(
        "exchange.declare auto-delete",
        ch.exchange_declare(
            x.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert!(
        exchange_exists(&b, &x).await,
        "fresh auto-delete exchange exists"
    );
    let q1 = temp_queue(&ch, "ad1").await;
    let q2 = temp_queue(&ch, "ad2").await;
    bind(&ch, &q1, &x, "k").await;
    bind(&ch, &q2, &x, "k").await;
    publish(&ch, &x, "k", b"routed").await;
    assert_eq!(drain(&ch, &q1).await, strs(&["routed"]));

    ok(
        "queue.unbind",
        ch.queue_unbind(
            q1.as_str().into(),
            x.as_str().into(),
            "k".into(),
            FieldTable::default(),
        ),
    )
    .await;
    assert!(exchange_exists(&b, &x).await, "one binding left");
    // Deleting the queue removes the last binding.
    ok(
        "queue.delete",
        ch.queue_delete(q2.as_str().into(), QueueDeleteOptions::default()),
    )
    .await;
    assert!(!exchange_exists(&b, &x).await, "exchange auto-deleted");
}

/// Deleting an exchange that does not exist succeeds, as in RabbitMQ 3.x: the
/// channel stays open and goes on working.
#[tokio::test]
async fn delete_of_missing_exchange_is_ok() {
    let b = common::start().await;
    let (_conn, ch) = open(&b).await;
    let name = common::unique("no-such-exchange");
    ok(
        "exchange.delete",
        ch.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()),
    )
    .await;
    let q = temp_queue(&ch, "after-delete").await;
    publish(&ch, "", &q, b"still open").await;
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some(&b"still open"[..]));
}
