//! Dead-lettering must never lose a persistent message to a crash: the dead
//! letter is stored before the dead queue's copy is deleted. The window between the
//! two is the housekeeper's hop, too short to hit with kill -9; so this test holds
//! the housekeeper back (its task is simply not started yet) and looks at the store
//! at that moment, through the library's own model and store.

use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::Bytes;
use warrenmq::model::change::{Actor, Change, Outcome, QueueSpec};
use warrenmq::model::message::{encode_header, MemoryGauge, Message};
use warrenmq::model::vhost::Vhost;
use warrenmq::store::{SledStore, Store};

fn stored(store: &dyn Store, queue: u64) -> usize {
    store
        .messages(queue)
        .filter(|m| matches!(m, Ok(Ok(_))))
        .count()
}

#[tokio::test]
async fn dead_letter_is_stored_before_its_source_is_deleted() {
    let dir = std::env::temp_dir().join(format!("warrenmq-dlstore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store: Arc<dyn Store> = SledStore::open(&dir).expect("store opens");
    let gauge = Arc::new(MemoryGauge::new(1 << 30));
    let vhost = Arc::new(Vhost::new(
        "/",
        Some(store.clone()),
        gauge.clone(),
        64 << 20,
    ));
    let declare = |name: &'static str, arguments: &FieldTable| {
        let change = Change::DeclareQueue(QueueSpec {
            name: name.into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: arguments.clone(),
        });
        match vhost
            .apply(change, Actor::Operator)
            .expect("declare")
            .outcome
        {
            Outcome::Queue { queue, .. } => queue,
            _ => panic!("a declare reports its queue"),
        }
    };
    let dlq = declare("dlq", &FieldTable::default());
    let mut args = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    args.insert(ShortString::from("x-message-ttl"), AMQPValue::LongInt(0));
    args.insert(ShortString::from("x-dead-letter-exchange"), text(""));
    args.insert(ShortString::from("x-dead-letter-routing-key"), text("dlq"));
    let src = declare("src", &args);
    let (src_id, dlq_id) = (
        src.store.as_ref().expect("stored").1,
        dlq.store.as_ref().expect("stored").1,
    );

    let properties = BasicProperties::default().with_delivery_mode(2);
    let body = Bytes::from_static(b"precious");
    let header = encode_header(body.len() as u64, &properties);
    let msg = Message::new("".into(), "src".into(), header, properties, body, gauge);
    // TTL 0 and no consumer: it dies at once and goes to the housekeeper.
    src.publish(Arc::new(msg));
    // Writes are requests to the store's thread: a sync says they are on disk.
    store.synced().await.expect("sync");

    // The housekeeper has not run: the message must still be stored somewhere.
    assert_eq!(
        stored(&*store, src_id) + stored(&*store, dlq_id),
        1,
        "between dying and being dead-lettered, the message is on disk"
    );

    vhost.start_housekeeping();
    for _ in 0..100 {
        store.synced().await.expect("sync");
        if stored(&*store, dlq_id) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The source's deletion is requested right after the dead letter's write.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    store.synced().await.expect("sync");
    assert_eq!(stored(&*store, dlq_id), 1, "the dead letter is stored");
    assert_eq!(stored(&*store, src_id), 0, "then its source copy goes");
    drop((src, dlq, vhost, store));
    let _ = std::fs::remove_dir_all(&dir);
}
