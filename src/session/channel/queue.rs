//! queue.declare, queue.bind, queue.unbind, queue.purge and queue.delete: each
//! becomes a topology `Change` for the vhost; an empty queue name means the last
//! queue this channel declared.

use amq_protocol::protocol::{queue, AMQPClass};

use super::{class_name, After, Channel};
use crate::error::{AmqpError, AmqpResult};
use crate::model::change::{BindingSpec, Change, Outcome, QueueSpec};
use crate::model::exchange::Destination;
use crate::model::vhost::REPLY_TO;
use crate::protocol::short;

impl Channel {
    pub(super) fn queue_method(&mut self, m: queue::AMQPMethod) -> AmqpResult<After> {
        use queue::AMQPMethod as M;
        let (change, nowait) = match m {
            M::Declare(d) => {
                let name = if d.passive && d.queue.as_str().is_empty() {
                    self.resolve_queue("")?.to_string()
                } else {
                    d.queue.to_string()
                };
                // As in RabbitMQ, every declare of a direct reply-to name is passive:
                // the pseudo-queue itself, or a live reply queue, exists with its one
                // consumer; any other name under the prefix does not.
                if name.starts_with(REPLY_TO) {
                    let exists = name == REPLY_TO
                        || (name.as_bytes().get(REPLY_TO.len()) == Some(&b'.')
                            && self.vhost.reply_queue(&name).is_some());
                    if !exists {
                        return Err(self.vhost.not_found_queue(&name));
                    }
                    let ok = AMQPClass::Queue(M::DeclareOk(queue::DeclareOk {
                        queue: short(name.as_str()),
                        message_count: 0,
                        consumer_count: 1,
                    }));
                    return Ok(self.answer(false, d.nowait, ok, None));
                }
                let change = Change::DeclareQueue(QueueSpec {
                    name,
                    passive: d.passive,
                    durable: d.durable,
                    exclusive: d.exclusive,
                    auto_delete: d.auto_delete,
                    arguments: d.arguments,
                });
                (change, d.nowait)
            }
            M::Bind(b) => {
                let q = self.resolve_queue(b.queue.as_str())?;
                let change = Change::Bind(BindingSpec {
                    source: b.exchange.to_string(),
                    destination: Destination::Queue(q),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                });
                (change, b.nowait)
            }
            M::Unbind(b) => {
                let q = self.resolve_queue(b.queue.as_str())?;
                let change = Change::Unbind(BindingSpec {
                    source: b.exchange.to_string(),
                    destination: Destination::Queue(q),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                });
                (change, false)
            }
            M::Purge(p) => {
                let queue = self.resolve_queue(p.queue.as_str())?.to_string();
                (Change::Purge { queue }, p.nowait)
            }
            M::Delete(d) => {
                let name = self.resolve_queue(d.queue.as_str())?.to_string();
                let change = Change::DeleteQueue {
                    name,
                    if_unused: d.if_unused,
                    if_empty: d.if_empty,
                };
                (change, d.nowait)
            }
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "unexpected method {}",
                    class_name(&AMQPClass::Queue(other))
                )))
            }
        };
        let is_bind = matches!(change, Change::Bind(_));
        self.permit_change(&change)?;
        let applied = self.vhost.apply(change, self.actor())?;
        let (reply, cancel) = match applied.outcome {
            Outcome::Queue {
                queue,
                messages,
                consumers,
            } => {
                self.last_queue = Some(queue.name.clone());
                let ok = M::DeclareOk(queue::DeclareOk {
                    queue: short(&*queue.name),
                    message_count: messages,
                    consumer_count: consumers,
                });
                (ok, None)
            }
            Outcome::QueueDeleted {
                messages,
                cancellations,
            } => (
                M::DeleteOk(queue::DeleteOk {
                    message_count: messages,
                }),
                Some(cancellations),
            ),
            Outcome::Purged { messages } => (
                M::PurgeOk(queue::PurgeOk {
                    message_count: messages,
                }),
                None,
            ),
            Outcome::Done if is_bind => (M::BindOk(queue::BindOk {}), None),
            Outcome::Done => (M::UnbindOk(queue::UnbindOk {}), None),
        };
        Ok(self.answer(applied.durable, nowait, AMQPClass::Queue(reply), cancel))
    }
}
