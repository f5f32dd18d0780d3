//! exchange.declare, exchange.delete, exchange.bind and exchange.unbind: each
//! becomes a topology `Change` for the vhost.

use amq_protocol::protocol::{exchange, AMQPClass};

use super::{class_name, After, Channel};
use crate::error::{AmqpError, AmqpResult};
use crate::model::change::{BindingSpec, Change, ExchangeSpec};
use crate::model::exchange::Destination;

impl Channel {
    pub(super) fn exchange_method(&mut self, m: exchange::AMQPMethod) -> AmqpResult<After> {
        use exchange::AMQPMethod as M;
        let (change, nowait, ok) = match m {
            M::Declare(d) => (
                Change::DeclareExchange(ExchangeSpec {
                    name: d.exchange.to_string(),
                    kind: d.kind.to_string(),
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments,
                }),
                d.nowait,
                M::DeclareOk(exchange::DeclareOk {}),
            ),
            M::Delete(d) => (
                Change::DeleteExchange {
                    name: d.exchange.to_string(),
                    if_unused: d.if_unused,
                },
                d.nowait,
                M::DeleteOk(exchange::DeleteOk {}),
            ),
            M::Bind(b) => (
                Change::Bind(BindingSpec {
                    source: b.source.to_string(),
                    destination: Destination::Exchange(b.destination.as_str().into()),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                }),
                b.nowait,
                M::BindOk(exchange::BindOk {}),
            ),
            M::Unbind(b) => (
                Change::Unbind(BindingSpec {
                    source: b.source.to_string(),
                    destination: Destination::Exchange(b.destination.as_str().into()),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments,
                }),
                b.nowait,
                M::UnbindOk(exchange::UnbindOk {}),
            ),
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "unexpected method {}",
                    class_name(&AMQPClass::Exchange(other))
                )))
            }
        };
        self.permit_change(&change)?;
        let applied = self.vhost.apply(change, self.actor())?;
        Ok(self.answer(applied.durable, nowait, AMQPClass::Exchange(ok), None))
    }
}
