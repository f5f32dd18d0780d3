//! The AMQP handshake: protocol header, connection.start / start-ok (with SASL
//! PLAIN or AMQPLAIN), tune / tune-ok and open / open-ok, all within one deadline,
//! with the broker's connection limits checked on the way.

use std::time::Duration;

use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::Buf;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Connection, End};
use crate::auth::{authenticate, authenticate_external, AuthFailure};
use crate::error::AmqpError;
use crate::protocol::{check_protocol_header, short, Frame, Greeting, PROTOCOL_HEADER};
use crate::session::channel::class_name;

impl Connection {
    /// Waits for one connection-class method on channel 0 during the handshake.
    async fn expect(
        &mut self,
        deadline: Instant,
        what: &str,
    ) -> Result<connection::AMQPMethod, End> {
        // A loop, not recursion: a client may send any number of heartbeats first.
        loop {
            return match self.next_frame(deadline).await? {
                Frame::Method(0, class) => match *class {
                    AMQPClass::Connection(m) => Ok(m),
                    other => Err(AmqpError::command_invalid(format!(
                        "expected {what}, got {}",
                        class_name(&other)
                    ))
                    .into()),
                },
                Frame::Heartbeat(0) => continue,
                _ => Err(AmqpError::unexpected_frame(format!("expected {what}")).into()),
            };
        }
    }

    pub(super) async fn handshake(&mut self) -> Result<(), End> {
        let limits = self.broker.config.limits.clone();
        // A config built in code skips the file's bounds: saturate rather than overflow.
        let deadline = Instant::now()
            .checked_add(Duration::from_secs(limits.handshake_timeout.max(1)))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        loop {
            match check_protocol_header(&self.input.buf) {
                Greeting::Accepted => {
                    self.input.buf.advance(PROTOCOL_HEADER.len());
                    break;
                }
                Greeting::Refused => {
                    self.shared
                        .outbox
                        .append()
                        .buf()
                        .extend_from_slice(PROTOCOL_HEADER);
                    return Err(End::Done);
                }
                Greeting::Incomplete => self.input.fill(Some(deadline)).await?,
            }
        }
        self.send(
            0,
            &AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: server_properties(),
                // EXTERNAL only where a verified client certificate names the user.
                mechanisms: LongString::from(if matches!(self.client_cn, Some(Some(_))) {
                    "PLAIN AMQPLAIN EXTERNAL"
                } else {
                    "PLAIN AMQPLAIN"
                }),
                locales: LongString::from("en_US"),
            })),
        );
        if let Some(max) = self.over_broker_limit {
            warn!("refusing a connection: node connection limit ({max}) is reached");
            return Err(AmqpError::not_allowed(format!(
                "connection refused: node connection limit ({max}) is reached"
            ))
            .into());
        }
        let start_ok = match self.expect(deadline, "'connection.start_ok'").await? {
            connection::AMQPMethod::StartOk(s) => s,
            _ => {
                return Err(
                    AmqpError::command_invalid("expected 'connection.start_ok'".into()).into(),
                )
            }
        };
        self.read_capabilities(&start_ok.client_properties);
        let mechanism = start_ok.mechanism.as_str().to_string();
        let users = self.broker.users.load();
        let authenticated = match (&mechanism[..], &self.client_cn) {
            ("EXTERNAL", Some(Some(cn))) => authenticate_external(&users, cn, self.peer.ip()),
            _ => authenticate(
                &users,
                &mechanism,
                start_ok.response.as_bytes(),
                self.peer.ip(),
            ),
        };
        let user = match authenticated {
            Ok(u) => u.clone(),
            Err(AuthFailure::BadCredentials) => {
                warn!("login refused using mechanism {mechanism}");
                // Bounded (LoginThrottle::MAX_DELAY): slows password guessing down.
                tokio::time::sleep(self.broker.login_throttle.failed(self.peer.ip())).await;
                // RabbitMQ names no method (0, 0) in this close.
                return Err(AmqpError::access_refused(format!(
                    "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                ))
                .into());
            }
            Err(AuthFailure::NotFromLoopback) => {
                warn!("user may only connect from loopback");
                tokio::time::sleep(self.broker.login_throttle.failed(self.peer.ip())).await;
                return Err(AmqpError::access_refused(
                    "user may only connect via localhost".into(),
                )
                .with_method(10, 11)
                .into());
            }
        };
        self.shared.set_user(&user.name);
        self.send(
            0,
            &AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: limits.channel_max,
                frame_max: limits.frame_max,
                heartbeat: limits.heartbeat,
            })),
        );
        let tune_ok = match self.expect(deadline, "'connection.tune_ok'").await? {
            connection::AMQPMethod::TuneOk(t) => t,
            _ => {
                return Err(
                    AmqpError::command_invalid("expected 'connection.tune_ok'".into()).into(),
                )
            }
        };
        let frame_max = if tune_ok.frame_max == 0 {
            limits.frame_max
        } else {
            tune_ok.frame_max
        };
        if frame_max > limits.frame_max || frame_max < 4096 {
            return Err(AmqpError::not_allowed(format!(
                "negotiated frame_max = {frame_max} is outside the permitted range 4096 to {}",
                limits.frame_max
            ))
            .with_method(10, 31)
            .into());
        }
        self.frame_max = frame_max;
        self.shared.set_frame_max(frame_max);
        self.channel_max = match tune_ok.channel_max {
            0 => limits.channel_max,
            n => n.min(limits.channel_max),
        };
        self.heartbeat = tune_ok.heartbeat;
        let open = match self.expect(deadline, "'connection.open'").await? {
            connection::AMQPMethod::Open(o) => o,
            _ => {
                return Err(AmqpError::command_invalid("expected 'connection.open'".into()).into())
            }
        };
        let vhost_name = open.virtual_host.as_str();
        let Some(vhost) = self.broker.vhost(vhost_name) else {
            return Err(
                AmqpError::not_allowed(format!("vhost {vhost_name} not found"))
                    .with_method(10, 40)
                    .into(),
            );
        };
        let Some(permissions) = self.broker.permissions_for(&user, vhost_name) else {
            return Err(AmqpError::not_allowed(format!(
                "access to vhost '{vhost_name}' refused for user '{}'",
                user.name
            ))
            .with_method(10, 40)
            .into());
        };
        let key = (user.name.clone(), vhost_name.to_string());
        self.shared.set_permissions(permissions);
        if let Some(t) = self.broker.topic_permissions.load().get(&key) {
            self.shared.set_topic_permissions(t.clone());
        }
        // RabbitMQ's order: the vhost's connection limit, then the user's.
        if let Err(limit) = self.broker.vhost_connected(vhost_name) {
            return Err(AmqpError::not_allowed(format!(
                "access to vhost '{vhost_name}' refused for user '{}': connection limit ({limit}) is reached",
                user.name
            ))
            .with_method(10, 40)
            .into());
        }
        self.counted_vhost = Some(vhost_name.to_string());
        if let Err(limit) = self.broker.user_connected(&user) {
            return Err(AmqpError::not_allowed(format!(
                "connection refused for user '{}': user connection limit ({limit}) is reached",
                user.name
            ))
            .with_method(10, 40)
            .into());
        }
        self.counted_user = Some(user.name.clone());
        self.channel_limit = user.max_channels;
        self.vhost = Some(vhost);
        self.send(
            0,
            &AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        );
        self.shared.set_opened(crate::session::shared::Opened {
            vhost: vhost_name.to_string(),
            mechanism: mechanism.clone(),
            client_properties: start_ok.client_properties.clone(),
            channel_max: self.channel_max,
            frame_max: self.frame_max,
            heartbeat: self.heartbeat,
        });
        info!(user = %user.name, vhost = vhost_name, "connection opened");
        Ok(())
    }

    fn read_capabilities(&mut self, props: &FieldTable) {
        let Some(AMQPValue::FieldTable(caps)) = props.inner().get("capabilities") else {
            return;
        };
        let on = |k: &str| matches!(caps.inner().get(k), Some(AMQPValue::Boolean(true)));
        self.shared
            .set_consumer_cancel_notify(on("consumer_cancel_notify"));
        self.blocked_capable = on("connection.blocked");
    }
}

fn server_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(short(cap), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    props.insert(short("product"), text("WarrenMQ"));
    props.insert(short("version"), text(env!("CARGO_PKG_VERSION")));
    props.insert(short("platform"), text("Rust"));
    props.insert(short("copyright"), text("WarrenMQ contributors"));
    props.insert(
        short("information"),
        text("Licensed under the Apache License 2.0"),
    );
    props.insert(short("cluster_name"), text("warrenmq"));
    props.insert(short("capabilities"), AMQPValue::FieldTable(caps));
    props
}
