//! The management HTTP API: RabbitMQ's paths, JSON shapes, errors and access rules
//! (user tags), so that rabbitmqadmin, dashboards and probes written against
//! RabbitMQ's management plugin work against this broker unchanged. It reads the
//! state the AMQP side keeps (the vhosts' topology, each queue, the registry of
//! connections) and never holds a lock a publisher needs for longer than a copy.
//! The same listener serves a small web console at `/` (console.rs) built on it.

mod access;
mod api;
mod console;
mod https;
pub mod metrics;
mod rates;
mod write;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use axum::Json;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::User;
use crate::session::context::BrokerState;

/// Serves the API on `listeners` (plain, or TLS when flagged) until `stop` changes.
pub async fn serve(
    listeners: Vec<(TcpListener, bool)>,
    state: Arc<BrokerState>,
    stop: watch::Receiver<bool>,
) {
    let every = std::time::Duration::from_millis(
        state
            .config
            .management
            .as_ref()
            .map_or(5000, |m| m.collect_statistics_interval),
    );
    let sampler = tokio::spawn(rates::sample(state.clone(), every, stop.clone()));
    let app = api::router(state.clone());
    serve_router(listeners, app, &state, stop, "management API").await;
    sampler.abort();
}

/// Serves `app` on every listener until `stop` changes (the management API and
/// the metrics endpoint alike). TLS listeners use the `[tls]` certificate in
/// force when a client connects (SIGHUP renews it, as for AMQP).
pub(crate) async fn serve_router(
    listeners: Vec<(TcpListener, bool)>,
    app: axum::Router,
    state: &Arc<BrokerState>,
    stop: watch::Receiver<bool>,
    what: &'static str,
) {
    let mut servers = tokio::task::JoinSet::new();
    // Routing sees the path without its trailing slash, so that the whole service
    // must be wrapped: a layer on the router would run after routing.
    let app = tower::ServiceExt::<axum::extract::Request>::map_request(app, trim_trailing_slash);
    for (listener, tls) in listeners {
        let service =
            axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
                SocketAddr,
            >(app.clone());
        let mut stop_serving = stop.clone();
        let shutdown = async move {
            let _ = stop_serving.changed().await;
        };
        if tls {
            let listener = https::TlsListener::new(listener, state.clone(), stop.clone());
            servers.spawn(async move {
                // tap_io: axum gives the peer's address (ConnectInfo) to tapped listeners.
                let served = axum::serve(listener.tap_io(|_| {}), service)
                    .with_graceful_shutdown(shutdown)
                    .await;
                if let Err(e) = served {
                    tracing::error!("{what} (TLS) stopped: {e}");
                }
            });
        } else {
            servers.spawn(async move {
                let served = axum::serve(listener, service)
                    .with_graceful_shutdown(shutdown)
                    .await;
                if let Err(e) = served {
                    tracing::error!("{what} stopped: {e}");
                }
            });
        }
    }
    while servers.join_next().await.is_some() {}
}

/// RabbitMQ's management API ignores one trailing slash (`/api/queues/` is
/// `/api/queues`; Celery Flower asks for the former), so this one does too.
fn trim_trailing_slash(mut req: axum::extract::Request) -> axum::extract::Request {
    let uri = req.uri();
    let path = uri.path();
    if path.len() > 1 && path.ends_with('/') {
        let mut trimmed = path[..path.len() - 1].to_string();
        if let Some(q) = uri.query() {
            trimmed.push('?');
            trimmed.push_str(q);
        }
        let mut parts = uri.clone().into_parts();
        if let Ok(pq) = trimmed.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(new) = axum::http::Uri::from_parts(parts) {
                *req.uri_mut() = new;
            }
        }
    }
    req
}

/// An error as RabbitMQ's management plugin gives it: a status and
/// `{"error": ..., "reason": ...}`.
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    reason: String,
    /// 401s ask for basic credentials.
    challenge: bool,
}

impl ApiError {
    pub fn not_found() -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            error: "Object Not Found",
            reason: "Not Found".into(),
            challenge: false,
        }
    }

    pub fn login_failed() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            error: "not_authorized",
            reason: "Login failed".into(),
            challenge: true,
        }
    }

    pub fn not_authorised(reason: &str) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            error: "not_authorised",
            reason: reason.into(),
            challenge: true,
        }
    }

    pub fn bad_request(reason: String) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "bad_request",
            reason,
            challenge: false,
        }
    }

    pub fn forbidden(reason: String) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            error: "access_refused",
            reason,
            challenge: false,
        }
    }

    pub fn internal(reason: String) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: "internal_error",
            reason,
            challenge: false,
        }
    }

    pub fn unavailable(reason: String) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "failed",
            reason,
            challenge: false,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.error, "reason": self.reason }));
        let mut r = (self.status, body).into_response();
        if self.challenge {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Basic realm=\"WarrenMQ Management\""),
            );
        }
        r
    }
}

/// What a caller's tags let it do, as RabbitMQ's management plugin reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Its own vhosts' objects and its own connections.
    Management,
    /// As management, and policies and parameters of its vhosts.
    Policymaker,
    /// Everything, read-only, in every vhost; the node's figures.
    Monitoring,
    Administrator,
}

/// An authenticated caller.
pub struct Caller {
    pub user: User,
    pub role: Role,
}

impl Caller {
    /// Whether the caller may see objects of `vhost`: monitoring and administrators
    /// see every vhost; others the vhosts they have permissions in.
    pub fn sees_vhost(&self, state: &BrokerState, vhost: &str) -> bool {
        self.role >= Role::Monitoring || state.permissions_for(&self.user, vhost).is_some()
    }

    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::not_authorised("Not administrator user"))
        }
    }
}

/// Every API handler takes its caller as an argument: authentication runs before
/// the path, query or body are looked at, so a request without valid credentials
/// gets 401 whatever else is wrong with it, as from RabbitMQ.
impl axum::extract::FromRequestParts<Arc<BrokerState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<BrokerState>,
    ) -> Result<Caller, ApiError> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .ok_or_else(|| ApiError::internal("no peer address".into()))?;
        authenticate(state, &parts.headers, peer).await
    }
}

/// HTTP basic authentication against the broker's users (loopback-only users only
/// from loopback, failures paced as AMQP logins are), then the tags.
async fn authenticate(
    state: &BrokerState,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Caller, ApiError> {
    use base64::Engine;
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            error: "not_authorized",
            reason: "Not authorized".into(),
            challenge: true,
        });
    };
    let creds = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok());
    let Some((name, password)) = creds.as_deref().and_then(|c| c.split_once(':')) else {
        return Err(ApiError::login_failed());
    };
    let mut response = vec![0u8];
    response.extend_from_slice(name.as_bytes());
    response.push(0);
    response.extend_from_slice(password.as_bytes());
    let users = state.users.load();
    let user = match crate::auth::authenticate(&users, "PLAIN", &response, peer.ip()) {
        Ok(u) => u.clone(),
        Err(_) => {
            tokio::time::sleep(state.login_throttle.failed(peer.ip())).await;
            return Err(ApiError::login_failed());
        }
    };
    let has = |t: &str| user.tags.iter().any(|x| x == t);
    let role = if has("administrator") {
        Role::Administrator
    } else if has("monitoring") {
        Role::Monitoring
    } else if has("policymaker") {
        Role::Policymaker
    } else if has("management") {
        Role::Management
    } else {
        return Err(ApiError::not_authorised("Not management user"));
    };
    Ok(Caller { user, role })
}
