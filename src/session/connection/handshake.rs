//! The AMQP handshake: protocol header, connection.start / start-ok (with SASL
//! PLAIN or AMQPLAIN), tune / tune-ok and open / open-ok, all within one deadline,
//! with the broker's connection limits checked on the way.

use std::time::Duration;

use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::Buf;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Connection, End};
use crate::auth::{authenticate, authenticate_external, AuthFailure};
use crate::error::AmqpError;
use crate::protocol::ordered::{self, longstr, RawTable};
use crate::protocol::{check_protocol_header, Frame, Greeting, PROTOCOL_HEADER};
use crate::session::connection::write_method;

impl Connection {
    /// Waits for one connection-class method on channel 0 during the handshake.
    /// The next connection-class method on channel 0, heartbeats skipped. Until
    /// tune-ok (`opening` false) anything else ends the connection as RabbitMQ
    /// ends it, silently after a pause; while opening, as RabbitMQ answers it.
    async fn expect(
        &mut self,
        deadline: Instant,
        opening: bool,
    ) -> Result<connection::AMQPMethod, End> {
        // A loop, not recursion: a client may send any number of heartbeats first.
        loop {
            let frame = match self.next_frame(deadline).await {
                Ok(f) => f,
                Err(End::Error(_)) if !opening => return Err(self.silent_close().await),
                Err(e) => return Err(e),
            };
            return match frame {
                Frame::Heartbeat(0) => continue,
                Frame::Method(0, class) => match *class {
                    AMQPClass::Connection(m) => Ok(m),
                    other => Err(self.out_of_order(opening, Some(&other)).await),
                },
                _ if !opening => Err(self.silent_close().await),
                Frame::Method(ch, class) => {
                    // Its payload as it came (re-encoded: the same bytes for a method).
                    let mut frame = bytes::BytesMut::new();
                    write_method(&mut frame, ch, &class);
                    let payload = frame.get(7..frame.len() - 1).unwrap_or_default();
                    Err(unexpected_frame(1, payload))
                }
                Frame::Header { raw, .. } => Err(unexpected_frame(2, &raw)),
                Frame::Body(_, body) => Err(unexpected_frame(3, &body)),
                Frame::Heartbeat(_) => Err(unexpected_frame(8, &[])),
                Frame::Refused(_, e) => Err(e.into()),
            };
        }
    }

    /// Closes the socket without a word after RabbitMQ's pause, or as soon as the
    /// client hangs up.
    async fn silent_close(&mut self) -> End {
        tokio::select! {
            _ = tokio::time::sleep(SILENT_CLOSE_DELAY) => {}
            _ = self.input.reader.hung_up() => {}
        }
        End::Done
    }

    /// A method that is not the next step of the handshake.
    async fn out_of_order(&mut self, opening: bool, class: Option<&AMQPClass>) -> End {
        if !opening {
            return self.silent_close().await;
        }
        let mut e =
            AmqpError::channel_error("unexpected method in connection state opening".into());
        if let Some(c) = class {
            e = e.with_method(c.get_amqp_class_id(), c.get_amqp_method_id());
        }
        e.into()
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
        // EXTERNAL only where a verified client certificate names the user.
        let mechanisms = if matches!(self.client_cn, Some(Some(_))) {
            "PLAIN AMQPLAIN EXTERNAL"
        } else {
            "PLAIN AMQPLAIN"
        };
        self.shared
            .outbox
            .append()
            .buf()
            .extend_from_slice(&start_frame(mechanisms));
        if let Some(max) = self.over_broker_limit {
            warn!("refusing a connection: node connection limit ({max}) is reached");
            return Err(AmqpError::not_allowed(format!(
                "connection refused: node connection limit ({max}) is reached"
            ))
            .into());
        }
        let start_ok = match self.expect(deadline, false).await? {
            connection::AMQPMethod::StartOk(s) => s,
            _ => return Err(self.out_of_order(false, None).await),
        };
        self.read_capabilities(&start_ok.client_properties);
        // A client that does not say it takes a connection.close for a failed
        // login gets the socket closed instead, as the spec has it (and RabbitMQ).
        let failure_close = matches!(
            start_ok.client_properties.inner().get("capabilities"),
            Some(AMQPValue::FieldTable(caps)) if matches!(
                caps.inner().get("authentication_failure_close"),
                Some(AMQPValue::Boolean(true))
            )
        );
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
            Err(failure) => {
                match failure {
                    AuthFailure::BadCredentials => {
                        warn!("login refused using mechanism {mechanism}")
                    }
                    AuthFailure::NotFromLoopback => {
                        warn!("login refused: user may only connect from loopback")
                    }
                }
                // Bounded (LoginThrottle::MAX_DELAY): slows password guessing down.
                tokio::time::sleep(self.broker.login_throttle.failed(self.peer.ip())).await;
                if !failure_close {
                    return Err(End::Done);
                }
                // RabbitMQ's text says no more than this, whatever the reason, and
                // names no method (0, 0); the log has the reason.
                return Err(AmqpError::access_refused(format!(
                    "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                ))
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
        let tune_ok = match self.expect(deadline, false).await? {
            connection::AMQPMethod::TuneOk(t) => t,
            _ => return Err(self.out_of_order(false, None).await),
        };
        // RabbitMQ's rule: a value below the minimum, or above the server's maximum
        // (0, "no limit", is above any maximum), is refused.
        negotiated("frame_max", tune_ok.frame_max, 4096, limits.frame_max)?;
        negotiated(
            "channel_max",
            u32::from(tune_ok.channel_max),
            1,
            u32::from(limits.channel_max),
        )?;
        let frame_max = match tune_ok.frame_max {
            0 => limits.frame_max,
            n => n,
        };
        self.frame_max = frame_max;
        self.shared.set_frame_max(frame_max);
        self.channel_max = match tune_ok.channel_max {
            0 => limits.channel_max,
            n => n,
        };
        self.heartbeat = tune_ok.heartbeat;
        let open = match self.expect(deadline, true).await? {
            connection::AMQPMethod::Open(o) => o,
            other => {
                let class = AMQPClass::Connection(other);
                return Err(self.out_of_order(true, Some(&class)).await);
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

/// How long RabbitMQ waits before closing the socket of a client that broke the
/// handshake ("we don't trust the client at this point": repeated attempts cost
/// it time).
const SILENT_CLOSE_DELAY: Duration = Duration::from_secs(3);

/// A frame where only connection.open may come, with RabbitMQ's text.
fn unexpected_frame(kind: u8, payload: &[u8]) -> End {
    AmqpError::unexpected_frame(format!("type {kind}, {}", crate::protocol::octets(payload))).into()
}

/// Checks a value the client chose in tune-ok against the server's bounds, with
/// RabbitMQ's text (a connection error naming connection.tune).
fn negotiated(field: &str, client: u32, min: u32, server: u32) -> Result<(), AmqpError> {
    let detail = if field == "channel_max" && client == 0 {
        " (no limit)"
    } else {
        ""
    };
    let refuse = |what: &str, bound: u32| {
        Err(AmqpError::not_allowed(format!(
            "negotiated {field} = {client}{detail} is {what} allowed value ({bound})"
        ))
        .with_method(10, 30))
    };
    if client != 0 && client < min {
        return refuse("lower than the minimum", min);
    }
    if server != 0 && (client == 0 || client > server) {
        return refuse("higher than the maximum", server);
    }
    Ok(())
}

/// connection.start's server properties, written by hand: a decoded table is a
/// sorted map, and RabbitMQ lists its capabilities in an order of its own
/// (publisher_confirms first), which a client comparing bytes would see.
fn server_properties() -> Vec<u8> {
    let mut caps = RawTable::default();
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
        caps.set(cap, vec![b't', 1]);
    }
    let mut props = RawTable::default();
    props.set("capabilities", ordered::table(&caps));
    props.set("cluster_name", longstr(b"warrenmq"));
    props.set("copyright", longstr(b"WarrenMQ contributors"));
    props.set(
        "information",
        longstr(b"Licensed under the Apache License 2.0"),
    );
    props.set("platform", longstr(b"Rust"));
    props.set("product", longstr(b"WarrenMQ"));
    props.set("version", longstr(env!("CARGO_PKG_VERSION").as_bytes()));
    props.encode()
}

/// The whole connection.start frame (channel 0).
fn start_frame(mechanisms: &str) -> Vec<u8> {
    let mut payload = vec![0, 10, 0, 10, 0, 9];
    payload.extend_from_slice(&server_properties());
    payload.extend_from_slice(&longstr(mechanisms.as_bytes())[1..]);
    payload.extend_from_slice(&longstr(b"en_US")[1..]);
    let mut frame = vec![1, 0, 0];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(0xCE);
    frame
}
