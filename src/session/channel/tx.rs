//! tx.select, tx.commit and tx.rollback: publishes and settlements held until a
//! commit, which replies only once what it made durable is on disk.

use amq_protocol::protocol::{tx, AMQPClass};

use super::publish::Publish;
use super::{class_name, After, Channel};
use crate::error::{AmqpError, AmqpResult};
use crate::session::delivery::{nack_taken, settle, Unacked};

/// An ack, nack or reject inside a transaction. The deliveries it names were taken
/// out of the unacked map when it arrived (an unknown tag fails right then, as in
/// RabbitMQ, not halfway through the commit); rollback puts them back.
pub(super) enum TxOp {
    Ack(Vec<Unacked>),
    Nack(Vec<Unacked>, bool),
}

impl TxOp {
    pub(super) fn into_deliveries(self) -> Vec<Unacked> {
        match self {
            TxOp::Ack(v) | TxOp::Nack(v, _) => v,
        }
    }
}

#[derive(Default)]
pub(super) struct Tx {
    pub(super) publishes: Vec<Publish>,
    pub(super) acks: Vec<TxOp>,
}

impl Channel {
    pub(super) fn tx_method(&mut self, m: tx::AMQPMethod) -> AmqpResult<After> {
        use tx::AMQPMethod as M;
        match m {
            M::Select(_) => {
                if self.confirm {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from confirm to tx mode".into(),
                    ));
                }
                if self.tx.is_none() {
                    self.tx = Some(Tx::default());
                    self.shared
                        .listing
                        .transactional
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                self.reply(AMQPClass::Tx(M::SelectOk(tx::SelectOk {})));
            }
            M::Commit(_) => {
                let Some(tx) = self.tx.replace(Tx::default()) else {
                    return Err(AmqpError::precondition_failed(
                        "channel is not transactional".into(),
                    ));
                };
                self.sync_needed = false;
                // Every publish was checked when it arrived: routing cannot fail now.
                for p in tx.publishes {
                    self.route(p, true)?;
                }
                // Acks and persistent publishes are on disk before commit-ok.
                let durable = self.sync_needed || !tx.acks.is_empty();
                self.sync_needed = false;
                for op in tx.acks {
                    match op {
                        TxOp::Ack(taken) => settle(taken),
                        TxOp::Nack(taken, rq) => nack_taken(taken, rq),
                    }
                }
                self.after_settle();
                return Ok(self.answer(
                    durable,
                    false,
                    AMQPClass::Tx(M::CommitOk(tx::CommitOk {})),
                    None,
                ));
            }
            M::Rollback(_) => {
                let Some(tx) = self.tx.replace(Tx::default()) else {
                    return Err(AmqpError::precondition_failed(
                        "channel is not transactional".into(),
                    ));
                };
                // Discarded acks leave their deliveries unacked, as before them.
                let mut st = self.shared.lock();
                for u in tx.acks.into_iter().flat_map(TxOp::into_deliveries) {
                    st.unacked.insert(u.tag, u);
                }
                drop(st);
                self.reply(AMQPClass::Tx(M::RollbackOk(tx::RollbackOk {})));
            }
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "unexpected method {}",
                    class_name(&AMQPClass::Tx(other))
                )))
            }
        }
        Ok(After::Nothing)
    }
}
