//! The cuttable TCP proxy: the handle a test holds to arm faults, and the
//! accept loop that picks for each connection the copy its armed faults call for.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    faults::State,
    relay::{Relay, relay_delayed, relay_watching_declares},
};

#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream` (host:port).
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            upstream: upstream.to_owned(),
            refusing: AtomicBool::new(false),
            cut: Mutex::new(CancellationToken::new()),
            stall_armed: AtomicBool::new(false),
            stalls: AtomicUsize::new(0),
            client_delay_ms: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(Self {
            addr,
            state,
            accept,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes every open connection; new ones are still accepted.
    pub fn sever(&self) {
        let mut cut = self.state.cut.lock().unwrap_or_else(|e| e.into_inner());
        cut.cancel();
        *cut = CancellationToken::new();
    }

    /// Closes every open connection and refuses new ones until [`Self::restore`].
    pub fn block(&self) {
        self.state.refusing.store(true, Ordering::SeqCst);
        self.sever();
    }

    /// Delays every chunk a client sends by `delay` on connections opened from
    /// now on (zero turns it off).
    pub fn delay_client(&self, delay: std::time::Duration) {
        self.state.client_delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    pub fn restore(&self) {
        self.state.refusing.store(false, Ordering::SeqCst);
    }

    /// Arms a one-shot stall: the next AMQP 0-9-1 connection through the proxy
    /// that sends `exchange.declare` or `queue.declare` is frozen at that frame.
    /// The declare is not forwarded and nothing more passes in either direction,
    /// but both sockets stay open, so the client waits on a peer that never
    /// answers, until [`Self::sever`] or drop. Then the proxy is disarmed.
    ///
    /// Only connections opened after arming are watched (ones already open are
    /// plain copies): arm before the client connects, or arm and then `sever`
    /// to make it reconnect and declare its topology again.
    pub fn stall_next_declare(&self) {
        self.state.stall_armed.store(true, Ordering::SeqCst);
    }

    /// How many connections [`Self::stall_next_declare`] has frozen so far.
    pub fn stalls(&self) -> usize {
        self.state.stalls.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.sever();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    while let Ok((mut client, _)) = listener.accept().await {
        if state.refusing.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let cut = state.cut.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let watched = state.stall_armed.load(Ordering::SeqCst);
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(&state.upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let delay = state.client_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::select! {
                    () = cut.cancelled() => {}
                    () = relay_delayed(&mut client, &mut server, std::time::Duration::from_millis(delay)) => {}
                }
                return;
            }
            if !watched {
                tokio::select! {
                    () = cut.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                }
                return;
            }
            tokio::select! {
                () = cut.cancelled() => {}
                () = async {
                    if let Relay::Stalled = relay_watching_declares(&mut client, &mut server, &state).await {
                        // Both sockets stay open and unread until the cut.
                        std::future::pending::<()>().await;
                    }
                } => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lapin::{
        ExchangeKind,
        options::{ExchangeDeclareOptions, ExchangeDeleteOptions},
        types::FieldTable,
    };

    use super::TcpProxy;

    fn amqp_url_via(proxy: &TcpProxy) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port())
    }

    async fn declare(channel: &lapin::Channel, name: &str) -> lapin::Result<()> {
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_armed_stall_freezes_the_next_declare_once_and_later_connections_declare_fine() {
        let proxy = TcpProxy::start("127.0.0.1:5672").await.expect("proxy");
        proxy.stall_next_declare();
        let frozen = lapin::Connection::connect(&amqp_url_via(&proxy), Default::default())
            .await
            .expect("connect through the armed proxy");
        let channel = frozen.create_channel().await.expect("channel");
        let stalled_name = crate::unique("stalled");

        let outcome =
            tokio::time::timeout(Duration::from_secs(2), declare(&channel, &stalled_name)).await;

        assert!(outcome.is_err(), "the declare completed: {outcome:?}");
        assert_eq!(proxy.stalls(), 1);

        let healthy = lapin::Connection::connect(&amqp_url_via(&proxy), Default::default())
            .await
            .expect("connect after the stall");
        let channel = healthy.create_channel().await.expect("channel");
        let name = crate::unique("after_stall");
        tokio::time::timeout(Duration::from_secs(5), declare(&channel, &name))
            .await
            .expect("declare in time")
            .expect("declare");
        assert_eq!(proxy.stalls(), 1, "one-shot");
        let passive = tokio::time::timeout(
            Duration::from_secs(5),
            channel.exchange_declare(
                stalled_name.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .expect("passive declare in time");
        assert!(passive.is_err(), "the stalled declare reached the broker");

        proxy.sever();
        crate::wait_until(
            "the frozen connection to end at the cut",
            Duration::from_secs(10),
            || async { !frozen.status().connected() },
        )
        .await;
        let cleanup = lapin::Connection::connect(&crate::amqp_url(), Default::default())
            .await
            .expect("direct connection");
        if let Ok(channel) = cleanup.create_channel().await {
            let _ = channel
                .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = cleanup.close(200, "bye".into()).await;
    }
}
