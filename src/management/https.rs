//! HTTPS for the management API and the metrics endpoint: a listener that hands
//! axum only connections whose TLS handshake is done. Handshakes run in their own
//! tasks, at most a bounded number at once and each within the handshake timeout,
//! so a slow or silent client never holds up the accept loop or other clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::session::context::BrokerState;

/// Handshakes in progress at once, per listener; beyond, accepting waits.
const HANDSHAKES: usize = 64;

pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: std::io::Result<SocketAddr>,
}

impl TlsListener {
    /// Starts accepting on `listener` until `stop` changes.
    pub fn new(
        listener: TcpListener,
        state: Arc<BrokerState>,
        stop: watch::Receiver<bool>,
    ) -> TlsListener {
        let local = listener.local_addr();
        let (tx, ready) = mpsc::channel(HANDSHAKES);
        tokio::spawn(accept(listener, state, tx, stop));
        TlsListener { ready, local }
    }
}

async fn accept(
    listener: TcpListener,
    state: Arc<BrokerState>,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(HANDSHAKES));
    let limit = Duration::from_secs(state.config.limits.handshake_timeout.max(1));
    loop {
        let slot = tokio::select! {
            _ = stop.changed() => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let (sock, peer) = tokio::select! {
            _ = stop.changed() => return,
            _ = ready.closed() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!("HTTPS accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(server) = state.tls.load_full() else {
            continue;
        };
        // HTTP/1.1 only, as the plain listener serves; said in ALPN for clients that ask.
        let mut config = (*server).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let ready = ready.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(limit, acceptor.accept(sock)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!("HTTPS handshake with {peer} failed: {e}"),
                Err(_) => tracing::debug!("HTTPS handshake with {peer} timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task stopped (the broker is stopping): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}
