//! Start-up on a data directory with damaged records, written by the broker and then
//! damaged through sled directly: one unreadable message costs that message only, and
//! a damaged queue-id counter stops start-up instead of reusing stored queues' ids.

mod common;
mod support;

use std::path::{Path, PathBuf};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use support::{channel, connect_url, ok};
use warrenmq::store::disk_format;

fn data_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("warrenmq-rec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

const BUDGET: u64 = 64 * 1024 * 1024;

fn url(b: &warrenmq::BrokerHandle) -> String {
    format!("amqp://guest:guest@{}/%2f", b.local_addr())
}

/// Declares durable queues and publishes persistent, confirmed messages to them.
async fn fill(dir: &Path, queues: &[(&str, usize)]) {
    let broker = warrenmq::start(support::budget_config(dir, BUDGET))
        .await
        .unwrap();
    {
        let conn = connect_url(&url(&broker)).await;
        let ch = channel(&conn).await;
        ok(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        for (q, n) in queues {
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ok(
                "queue.declare",
                ch.queue_declare((*q).into(), durable, FieldTable::default()),
            )
            .await;
            for i in 0..*n {
                ok(
                    "publish",
                    ch.basic_publish(
                        "".into(),
                        (*q).into(),
                        BasicPublishOptions::default(),
                        format!("{q}-{i}").as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    ),
                )
                .await;
            }
        }
        ok("confirms", ch.wait_for_confirms()).await;
        let _ = conn.close(200, "bye".into()).await;
    }
    broker.shutdown().await;
}

/// The id the store gave a queue: meta key `q` + vhost + name, value version + id.
fn queue_id(meta: &sled::Tree, name: &str) -> u64 {
    let mut k = vec![b'q'];
    for s in ["/", name] {
        k.extend_from_slice(&(s.len() as u16).to_be_bytes());
        k.extend_from_slice(s.as_bytes());
    }
    let v = meta.get(k).unwrap().expect("the queue is stored");
    u64::from_be_bytes(v[1..9].try_into().unwrap())
}

/// Every message body left in a queue, fetched without ack.
async fn drain(ch: &lapin::Channel, q: &str, ack: bool) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(m) = ok(
        "basic.get",
        ch.basic_get(q.into(), BasicGetOptions { no_ack: ack }),
    )
    .await
    {
        got.push(String::from_utf8(m.delivery.data).unwrap());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_message_records_are_skipped_and_the_rest_recovered() {
    let dir = data_dir("skip");
    fill(&dir, &[("damaged", 6), ("intact", 3)]).await;

    {
        let db = support::open_db(&dir);
        let meta = db.open_tree("meta").unwrap();
        // The index keeps a queue's entries in chunks of 256 sequence numbers:
        // key queue id + seq / 256; the value lists each entry with its
        // sequence number's low byte.
        let index = db.open_tree("index").unwrap();
        let id = queue_id(&meta, "damaged");
        let chunks: Vec<(sled::IVec, sled::IVec)> = index
            .scan_prefix(id.to_be_bytes())
            .map(|kv| kv.unwrap())
            .collect();
        assert_eq!(chunks.len(), 1);
        let chunk_key = &chunks[0].0;
        let items = disk_format::decode_chunk(&chunks[0].1).unwrap();
        assert_eq!(items.len(), 6);
        let entry = |i: usize| items[i].1.to_vec();
        let mut changed = items.clone();
        // damaged-1: an entry version nobody wrote.
        changed[1].1[0] = 9;
        index
            .insert(chunk_key, disk_format::encode_chunk_v1(&changed))
            .unwrap();
        // damaged-2 and damaged-3: their bodies in the body log. An entry is a
        // version, stored-at, then segment, offset and length of the record.
        let record_of = |v: &[u8]| {
            let u = |i: usize| u32::from_be_bytes(v[i..i + 4].try_into().unwrap());
            (
                dir.join("msgs").join(format!("{:08}.seg", u(9))),
                u(13) as usize,
                u(17) as usize,
            )
        };
        // damaged-2: one flipped byte, which the record's checksum catches.
        let (path, offset, len) = record_of(&entry(2));
        let mut log = std::fs::read(&path).unwrap();
        log[offset + len - 1] ^= 0x40;
        // damaged-3: property flags that announce a headers table which is not
        // there, under a checksum that matches: only decoding the header finds it.
        // Record: exchange, routing key, header length, header, body.
        let (path3, offset, len) = record_of(&entry(3));
        assert_eq!(path3, path, "one segment holds them all");
        let mut at = offset;
        for _ in 0..2 {
            at += 2 + u16::from_be_bytes([log[at], log[at + 1]]) as usize;
        }
        let header = at + 4;
        log[header + 12] |= 0x20;
        let crc = crc32fast::hash(&log[offset..offset + len]);
        log[offset - 4..offset].copy_from_slice(&crc.to_be_bytes());
        std::fs::write(&path, log).unwrap();
        // A chunk whose key has no sequence number at all.
        let mut k = id.to_be_bytes().to_vec();
        k.extend_from_slice(&[0, 0, 0]);
        index.insert(k, &b"junk"[..]).unwrap();
        db.flush().unwrap();
    }

    // Paged out (no memory budget): the record errors show at recovery, the bad
    // header only when the message is read back for delivery. Fetched without
    // ack, so that the next start sees them all again.
    let broker = warrenmq::start(support::budget_config(&dir, 0))
        .await
        .expect("one bad record must not stop start-up");
    {
        let conn = connect_url(&url(&broker)).await;
        let ch = channel(&conn).await;
        assert_eq!(
            drain(&ch, "damaged", false).await,
            ["damaged-0", "damaged-4", "damaged-5"]
        );
        assert_eq!(
            drain(&ch, "intact", false).await,
            ["intact-0", "intact-1", "intact-2"]
        );
        let _ = conn.close(200, "bye".into()).await;
    }
    broker.shutdown().await;

    // In memory: the bad header is found at recovery too.
    let broker = warrenmq::start(support::budget_config(&dir, BUDGET))
        .await
        .expect("one bad record must not stop start-up");
    {
        let conn = connect_url(&url(&broker)).await;
        let ch = channel(&conn).await;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = ok(
            "queue.declare passive",
            ch.queue_declare("damaged".into(), passive, FieldTable::default()),
        )
        .await;
        assert_eq!(q.message_count(), 3);
        assert_eq!(
            drain(&ch, "damaged", true).await,
            ["damaged-0", "damaged-4", "damaged-5"]
        );
        assert_eq!(
            drain(&ch, "intact", true).await,
            ["intact-0", "intact-1", "intact-2"]
        );
        // The queue takes new messages as before.
        ok(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        ok(
            "publish",
            ch.basic_publish(
                "".into(),
                "damaged".into(),
                BasicPublishOptions::default(),
                b"after",
                BasicProperties::default().with_delivery_mode(2),
            ),
        )
        .await;
        ok("confirms", ch.wait_for_confirms()).await;
        assert_eq!(drain(&ch, "damaged", true).await, ["after"]);
        let _ = conn.close(200, "bye".into()).await;
    }
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A chunk of the index that cannot be read loses its entries at start-up, and
/// nothing more: the queue takes new messages in the same range of sequence
/// numbers, and the checkpoints that write them replace the chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_index_chunk_does_not_stop_later_checkpoints() {
    let dir = data_dir("chunk");
    fill(&dir, &[("torn", 4), ("intact", 2)]).await;
    {
        let db = support::open_db(&dir);
        let meta = db.open_tree("meta").unwrap();
        let index = db.open_tree("index").unwrap();
        let id = queue_id(&meta, "torn");
        let keys: Vec<sled::IVec> = index
            .scan_prefix(id.to_be_bytes())
            .map(|kv| kv.unwrap().0)
            .collect();
        assert_eq!(keys.len(), 1);
        // Version 1, then an entry cut short.
        index.insert(&keys[0], &[1u8, 0, 2, 0][..]).unwrap();
        db.flush().unwrap();
    }
    for round in 0..2 {
        let broker = warrenmq::start(support::budget_config(&dir, BUDGET))
            .await
            .expect("an unreadable chunk must not stop start-up");
        let conn = connect_url(&url(&broker)).await;
        let ch = channel(&conn).await;
        if round == 0 {
            ok(
                "confirm.select",
                ch.confirm_select(ConfirmSelectOptions::default()),
            )
            .await;
            for i in 0..3 {
                let confirm = ok(
                    "publish",
                    ch.basic_publish(
                        "".into(),
                        "torn".into(),
                        BasicPublishOptions::default(),
                        format!("new-{i}").as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    ),
                )
                .await;
                assert!(
                    ok("confirm", confirm).await.is_ack(),
                    "a publish to the queue is confirmed"
                );
            }
        }
        let _ = conn.close(200, "bye".into()).await;
        // Shutdown checkpoints: the new entries go into the damaged chunk's range.
        broker.shutdown().await;
    }
    let broker = warrenmq::start(support::budget_config(&dir, BUDGET))
        .await
        .unwrap();
    let conn = connect_url(&url(&broker)).await;
    let ch = channel(&conn).await;
    assert_eq!(drain(&ch, "torn", true).await, ["new-0", "new-1", "new-2"]);
    assert_eq!(drain(&ch, "intact", true).await, ["intact-0", "intact-1"]);
    let _ = conn.close(200, "bye".into()).await;
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_next_queue_id_stops_start_up() {
    let dir = data_dir("next-id");
    fill(&dir, &[("first", 1), ("second", 1)]).await;

    let good = {
        let db = support::open_db(&dir);
        let meta = db.open_tree("meta").unwrap();
        let good = meta.get("next-queue-id").unwrap().expect("stored").to_vec();
        assert_eq!(good.len(), 8);
        assert!(u64::from_be_bytes(good[..].try_into().unwrap()) > queue_id(&meta, "second"));
        good
    };
    let set = |v: Option<&[u8]>| {
        let db = support::open_db(&dir);
        let meta = db.open_tree("meta").unwrap();
        match v {
            Some(v) => meta.insert("next-queue-id", v).unwrap(),
            None => meta.remove("next-queue-id").unwrap(),
        };
        db.flush().unwrap();
    };
    let refused = |why: &'static str| {
        let dir = dir.clone();
        async move {
            match warrenmq::start(support::budget_config(&dir, BUDGET)).await {
                Ok(b) => {
                    b.shutdown().await;
                    panic!("start-up accepted a next-queue-id that is {why}");
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.contains("next-queue-id"), "{why}: {e}");
                    e
                }
            }
        }
    };

    set(Some(&good[..3]));
    let e = refused("3 bytes long").await;
    assert!(e.contains("3 bytes"), "{e}");
    set(Some(&1u64.to_be_bytes()));
    refused("below the stored queues' ids").await;
    set(None);
    refused("missing while queues are stored").await;

    set(Some(&good));
    let broker = warrenmq::start(support::budget_config(&dir, BUDGET))
        .await
        .expect("the intact counter starts");
    {
        let conn = connect_url(&url(&broker)).await;
        let ch = channel(&conn).await;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ok(
            "queue.declare",
            ch.queue_declare("third".into(), durable, FieldTable::default()),
        )
        .await;
        assert_eq!(drain(&ch, "first", true).await, ["first-0"]);
        assert_eq!(drain(&ch, "second", true).await, ["second-0"]);
        let _ = conn.close(200, "bye".into()).await;
    }
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// sled holding the entry of a message whose body the body log lost (a disk that
/// dropped written data; the store itself gives sled an entry only after the
/// body's sync): start-up drops such entries and keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_whose_bodies_were_torn_off_are_dropped_at_start_up() {
    let dir = data_dir("torn");
    fill(&dir, &[("torn", 3)]).await;
    let seg = std::fs::read_dir(dir.join("msgs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .expect("a segment with the bodies");
    // Records are length (top bit set for the index's own records), CRC-32 and
    // payload: the file is cut 2 bytes into the last message body.
    let bytes = std::fs::read(&seg).unwrap();
    let (mut at, mut last_body_end) = (0usize, 0usize);
    while at + 8 <= bytes.len() {
        let tagged = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        at += 8 + (tagged & 0x7fff_ffff) as usize;
        if tagged & 0x8000_0000 == 0 {
            last_body_end = at;
        }
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(last_body_end as u64 - 2)
        .unwrap();

    let broker = warrenmq::start(support::budget_config(&dir, BUDGET))
        .await
        .expect("a torn tail must not stop start-up");
    {
        let conn = connect_url(&url(&broker)).await;
        let ch = channel(&conn).await;
        assert_eq!(drain(&ch, "torn", false).await, ["torn-0", "torn-1"]);
        let _ = conn.close(200, "bye".into()).await;
    }
    broker.shutdown().await;
    let db = support::open_db(&dir);
    let meta = db.open_tree("meta").unwrap();
    let id = queue_id(&meta, "torn");
    let entries: Vec<usize> = db
        .open_tree("index")
        .unwrap()
        .scan_prefix(id.to_be_bytes())
        .map(|kv| disk_format::decode_chunk(&kv.unwrap().1).unwrap().len())
        .collect();
    assert_eq!(entries, [2], "the torn message's entry is gone");
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A directory written before the chunked index (format 2: one sled key per
/// entry in `messages`, and format 1's entries with the body inline) starts with
/// every message, moved into the chunks once; the old tree is left empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_directory_is_moved_into_the_chunked_index() {
    let dir = data_dir("upgrade");
    fill(&dir, &[("old", 3)]).await;
    {
        let db = support::open_db(&dir);
        let meta = db.open_tree("meta").unwrap();
        let index = db.open_tree("index").unwrap();
        let messages = db.open_tree("messages").unwrap();
        let id = queue_id(&meta, "old");
        let (_, chunk) = index.scan_prefix(id.to_be_bytes()).next().unwrap().unwrap();
        let items = disk_format::decode_chunk(&chunk).unwrap();
        let entry = |i: usize| items[i].1.to_vec();
        let key = |seq: u64| {
            let mut k = id.to_be_bytes().to_vec();
            k.extend_from_slice(&seq.to_be_bytes());
            k
        };
        // Format 2: the same 38-byte entries, one key each.
        for i in 0..3 {
            messages.insert(key(i as u64), entry(i)).unwrap();
        }
        // Format 1: version 1, stored-at, then the record as the body log holds
        // it (exchange, routing key, header length, header, body): old-2's, with
        // its body made old-3.
        let e = entry(2);
        let u = |i: usize| u32::from_be_bytes(e[i..i + 4].try_into().unwrap());
        let segment = std::fs::read(dir.join("msgs").join(format!("{:08}.seg", u(9)))).unwrap();
        let mut record = segment[u(13) as usize..(u(13) + u(17)) as usize].to_vec();
        let n = record.len();
        record[n - 1] = b'3';
        let mut inline = vec![1u8];
        inline.extend_from_slice(&e[1..9]);
        inline.extend_from_slice(&record);
        messages.insert(key(3), inline).unwrap();
        index.clear().unwrap();
        meta.insert("format", &b"warrenmq-store-2"[..]).unwrap();
        meta.remove("checkpoint").unwrap();
        db.flush().unwrap();
    }
    for round in 0..2 {
        let broker = warrenmq::start(support::budget_config(&dir, BUDGET))
            .await
            .expect("an older directory starts");
        {
            let conn = connect_url(&url(&broker)).await;
            let ch = channel(&conn).await;
            assert_eq!(
                drain(&ch, "old", false).await,
                ["old-0", "old-1", "old-2", "old-3"],
                "start {round}"
            );
            let _ = conn.close(200, "bye".into()).await;
        }
        broker.shutdown().await;
    }
    let db = support::open_db(&dir);
    assert!(db.open_tree("messages").unwrap().is_empty());
    assert_eq!(db.open_tree("index").unwrap().len(), 1);
    let format = db
        .open_tree("meta")
        .unwrap()
        .get("format")
        .unwrap()
        .unwrap();
    assert_eq!(&format[..], b"warrenmq-store-4");
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A format-3 directory keeps its chunks in version 1 (39 bytes an entry): it
/// starts with every message, is marked format 4 (so that an older broker
/// refuses it), and a checkpoint rewrites a chunk it changes in version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_3_chunks_are_read_and_rewritten_smaller() {
    let dir = data_dir("format3");
    fill(&dir, &[("v1", 200)]).await;
    let v1_len = {
        let db = support::open_db(&dir);
        let index = db.open_tree("index").unwrap();
        let (k, v) = index.iter().next().unwrap().unwrap();
        let items = disk_format::decode_chunk(&v).unwrap();
        assert_eq!(items.len(), 200);
        let v1 = disk_format::encode_chunk_v1(&items);
        assert!(v.len() * 5 < v1.len(), "version 2 is the smaller by far");
        index.insert(k, &v1[..]).unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format", &b"warrenmq-store-3"[..]).unwrap();
        db.flush().unwrap();
        v1.len()
    };
    let broker = warrenmq::start(support::budget_config(&dir, BUDGET))
        .await
        .expect("a format-3 directory starts");
    {
        let conn = connect_url(&url(&broker)).await;
        let ch = channel(&conn).await;
        let m = ok(
            "basic.get",
            ch.basic_get("v1".into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("a message");
        assert_eq!(m.delivery.data, b"v1-0");
        let _ = conn.close(200, "bye".into()).await;
    }
    broker.shutdown().await;
    {
        let db = support::open_db(&dir);
        let meta = db.open_tree("meta").unwrap();
        assert_eq!(
            &meta.get("format").unwrap().unwrap()[..],
            b"warrenmq-store-4"
        );
        let (_, v) = db
            .open_tree("index")
            .unwrap()
            .iter()
            .next()
            .unwrap()
            .unwrap();
        let items = disk_format::decode_chunk(&v).unwrap();
        assert_eq!(items.len(), 199, "the one taken is gone");
        assert!(
            v.len() * 5 < v1_len,
            "rewritten in version 2: {} bytes",
            v.len()
        );
    }
    let broker = warrenmq::start(support::budget_config(&dir, BUDGET))
        .await
        .unwrap();
    {
        let conn = connect_url(&url(&broker)).await;
        let ch = channel(&conn).await;
        let want: Vec<String> = (1..200).map(|i| format!("v1-{i}")).collect();
        assert_eq!(drain(&ch, "v1", true).await, want);
        let _ = conn.close(200, "bye".into()).await;
    }
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
