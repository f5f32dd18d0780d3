//! basic.qos, basic.consume, basic.cancel, basic.get, basic.ack, basic.nack,
//! basic.reject and basic.recover (basic.publish is in `publish`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use amq_protocol::protocol::{basic, AMQPClass};

use super::{class_name, After, Channel, TxOp};
use crate::auth::Access;
use crate::error::{queue_name, AmqpError, AmqpResult};
use crate::model::queue::{ConsumeRefused, Consumer, Deliver, Got};
use crate::model::values::int_value;
use crate::model::vhost::REPLY_TO;
use crate::protocol::short;
use crate::session::delivery::{nack_taken, requeue, settle};

/// RabbitMQ's `amq.ctag-` tags for consumers that did not name themselves.
fn generated_tag() -> String {
    use std::hash::BuildHasher;
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let h = std::collections::hash_map::RandomState::new().hash_one(n);
    format!("amq.ctag-{h:016x}{n:06x}")
}

impl Channel {
    pub(super) fn basic_method(&mut self, m: basic::AMQPMethod) -> AmqpResult<After> {
        use basic::AMQPMethod as M;
        match m {
            M::Publish(p) => self.publish(p)?,
            M::Qos(q) => {
                if q.global {
                    self.shared.lock().prefetch = q.prefetch_count as u32;
                } else {
                    // As RabbitMQ does: a per-consumer qos also lifts the channel-wide limit.
                    self.shared.lock().prefetch = 0;
                    self.consumer_prefetch = q.prefetch_count as u32;
                    self.shared.listing.prefetch.store(
                        q.prefetch_count as u32,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                self.reply(AMQPClass::Basic(M::QosOk(basic::QosOk {})));
                self.kick_consumers();
            }
            M::Consume(c) => self.consume(c)?,
            M::Cancel(c) => {
                let tag = c.consumer_tag.as_str();
                if let Some((q, c)) = self.consumers.remove(tag) {
                    self.drop_consumer(&q, &c);
                }
                if !c.nowait {
                    self.reply(AMQPClass::Basic(M::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag,
                    })));
                }
            }
            M::Get(g) => {
                let name = self.resolve_queue(g.queue.as_str())?;
                self.permit(Access::Read, "queue", &name)?;
                let q = self.vhost.queue(&name, self.actor())?;
                match q.get(g.no_ack) {
                    Got::Message(m, remaining) => self.shared.get_ok(&q, m, remaining, g.no_ack),
                    Got::Empty => {
                        crate::session::shared::MessageCounts::bump(
                            &self.shared.counts.get_empty,
                            1,
                        );
                        self.reply(AMQPClass::Basic(M::GetEmpty(basic::GetEmpty {})))
                    }
                    // The head is on disk: ask again once it is read back, and
                    // meanwhile nothing else on this connection overtakes the get.
                    Got::PagingIn(ready) => {
                        return Ok(After::Retry(ready, AMQPClass::Basic(M::Get(g))));
                    }
                }
            }
            M::Ack(a) => {
                if let Some(tx) = self.tx.as_mut() {
                    let taken = self.shared.take(a.delivery_tag, a.multiple)?;
                    tx.acks.push(TxOp::Ack(taken));
                } else {
                    let taken = self.shared.take(a.delivery_tag, a.multiple)?;
                    crate::session::shared::MessageCounts::bump(
                        &self.shared.counts.acknowledged,
                        taken.len() as u64,
                    );
                    settle(taken);
                    self.after_settle();
                }
            }
            M::Nack(n) => {
                if let Some(tx) = self.tx.as_mut() {
                    let taken = self.shared.take(n.delivery_tag, n.multiple)?;
                    tx.acks.push(TxOp::Nack(taken, n.requeue));
                } else {
                    self.nack(n.delivery_tag, n.multiple, n.requeue)?;
                    self.after_settle();
                }
            }
            M::Reject(r) => {
                if let Some(tx) = self.tx.as_mut() {
                    let taken = self.shared.take(r.delivery_tag, false)?;
                    tx.acks.push(TxOp::Nack(taken, r.requeue));
                } else {
                    self.nack(r.delivery_tag, false, r.requeue)?;
                    self.after_settle();
                }
            }
            M::Recover(r) => {
                if !r.requeue {
                    return Err(AmqpError::not_implemented("requeue=false".into()));
                }
                requeue(self.shared.take_all());
                self.reply(AMQPClass::Basic(M::RecoverOk(basic::RecoverOk {})));
            }
            M::RecoverAsync(r) => {
                if !r.requeue {
                    return Err(AmqpError::not_implemented("requeue=false".into()));
                }
                requeue(self.shared.take_all());
            }
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "unexpected method {}",
                    class_name(&AMQPClass::Basic(other))
                )))
            }
        }
        Ok(After::Nothing)
    }

    pub(super) fn nack(&self, tag: u64, multiple: bool, requeue_it: bool) -> AmqpResult<()> {
        nack_taken(self.shared.take(tag, multiple)?, requeue_it);
        Ok(())
    }

    pub(super) fn consume(&mut self, c: basic::Consume) -> AmqpResult<()> {
        if self.max_consumers != 0 && self.consumers.len() >= self.max_consumers as usize {
            // RabbitMQ's consumer_max_per_channel answer (a connection error).
            return Err(AmqpError::not_allowed(format!(
                "reached maximum ({}) of consumers per channel",
                self.max_consumers
            )));
        }
        let name = self.resolve_queue(c.queue.as_str())?;
        let q = if &*name == REPLY_TO {
            if !c.no_ack {
                return Err(AmqpError::precondition_failed(
                    "reply consumer cannot acknowledge".into(),
                ));
            }
            if self.reply_queue.is_some() {
                return Err(AmqpError::precondition_failed(
                    "reply consumer already set".into(),
                ));
            }
            let q = self.vhost.new_reply_queue();
            self.reply_queue = Some(q.clone());
            q
        } else {
            self.permit(Access::Read, "queue", &name)?;
            self.vhost.queue(&name, self.actor())?
        };
        let tag: Arc<str> = if c.consumer_tag.as_str().is_empty() {
            generated_tag().into()
        } else {
            c.consumer_tag.as_str().into()
        };
        if self.consumers.contains_key(&tag) {
            return Err(AmqpError::not_allowed(format!(
                "attempt to reuse consumer tag '{tag}'"
            )));
        }
        check_consume_arguments(&c.arguments, &name, &self.vhost.name, q.args().quorum)?;
        let consumer = Arc::new(Consumer {
            tag: tag.clone(),
            channel: self.shared.clone() as Arc<dyn Deliver>,
            no_ack: c.no_ack,
            exclusive: c.exclusive,
            prefetch: self.consumer_prefetch,
            unacked: Default::default(),
            priority: c
                .arguments
                .inner()
                .get("x-priority")
                .and_then(int_value)
                .map(|p| p.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
                .unwrap_or(0),
        });
        let nowait = c.nowait;
        let shared = self.shared.clone();
        let ok_tag = tag.clone();
        let added = q.add_consumer(consumer.clone(), move || {
            if !nowait {
                shared.send(&AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(
                    basic::ConsumeOk {
                        consumer_tag: short(&*ok_tag),
                    },
                )));
            }
        });
        match added {
            Ok(()) => {
                self.consumers.insert(tag, (q, consumer));
                Ok(())
            }
            Err(ConsumeRefused::ExclusiveInUse) => Err(AmqpError::access_refused(format!(
                "{} in exclusive use",
                queue_name(&name, &self.vhost.name)
            ))),
            Err(ConsumeRefused::Deleted) => Err(self.vhost.not_found_queue(&name)),
        }
    }
}

/// RabbitMQ's consume argument checks (rabbit_amqqueue's consume_args): x-priority
/// an integer, x-cancel-on-ha-failover a boolean, x-stream-offset only on a
/// stream, with its texts.
fn check_consume_arguments(
    args: &amq_protocol::types::FieldTable,
    queue: &str,
    vhost: &str,
    quorum: bool,
) -> AmqpResult<()> {
    use amq_protocol::types::AMQPValue;
    let bad = |key: &str, why: String| {
        AmqpError::precondition_failed(format!(
            "invalid arg '{key}' for {}: {why}",
            queue_name(queue, vhost)
        ))
    };
    if args.inner().contains_key("x-stream-offset") {
        // Only streams take it (check_consume_arguments' invalid keys).
        let kind = if quorum {
            "rabbit_quorum_queue"
        } else {
            "rabbit_classic_queue"
        };
        return Err(AmqpError::precondition_failed(format!(
            "invalid arg 'x-stream-offset' for {} of queue type {kind}",
            queue_name(queue, vhost)
        )));
    }
    if let Some(v) = args.inner().get("x-priority") {
        crate::model::values::integer_arg(v).map_err(|why| bad("x-priority", why))?;
    }
    match args.inner().get("x-cancel-on-ha-failover") {
        None | Some(AMQPValue::Boolean(_)) => Ok(()),
        Some(v) => Err(bad(
            "x-cancel-on-ha-failover",
            format!(
                "{{unacceptable_type,{}}}",
                crate::model::values::type_name(v)
            ),
        )),
    }
}
