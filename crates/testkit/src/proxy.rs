//! A TCP proxy between a client and a server that a test can cut: `sever` drops
//! every open connection (the client sees the socket close mid-stream), `block`
//! also refuses new ones until `restore`, and `stall_next_declare` freezes the
//! next AMQP connection at its next exchange or queue declare (a peer that died
//! mid-declare without a FIN). `delay_client` holds every chunk the client sends
//! for a while before forwarding it (a slow link, so a test can act between
//! two of a client's requests).
//!
//! Connections opened while nothing is armed are plain byte copies; only those
//! opened while a stall is armed follow the client's AMQP frames.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    upstream: String,
    refusing: AtomicBool,
    cut: Mutex<CancellationToken>,
    /// One-shot: the first watched connection to send a declare clears it.
    stall_armed: AtomicBool,
    stalls: AtomicUsize,
    /// Milliseconds each client chunk waits, for connections opened after it was set.
    client_delay_ms: AtomicU64,
}

impl State {
    /// Takes the armed stall, if any, and counts it: true for exactly one caller.
    fn claim_stall(&self) -> bool {
        let claimed = self
            .stall_armed
            .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if claimed {
            self.stalls.fetch_add(1, Ordering::SeqCst);
        }
        claimed
    }
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

/// Copies both directions, holding each chunk from the client for `delay`.
async fn relay_delayed(client: &mut TcpStream, server: &mut TcpStream, delay: std::time::Duration) {
    let (mut client_rx, mut client_tx) = client.split();
    let (mut server_rx, mut server_tx) = server.split();
    let upstream = async {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let n = match client_rx.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            tokio::time::sleep(delay).await;
            if server_tx.write_all(&chunk[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_tx.shutdown().await;
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// How a watched connection's relay ended.
enum Relay {
    /// Both directions finished (a side closed or failed).
    Closed,
    /// The armed stall fired: nothing more may be forwarded.
    Stalled,
}

/// Copies both directions as `copy_bidirectional` does, following the client's
/// frames so that the armed stall can stop everything at a declare.
async fn relay_watching_declares(
    client: &mut TcpStream,
    server: &mut TcpStream,
    state: &State,
) -> Relay {
    let (mut client_rx, mut client_tx) = client.split();
    let (mut server_rx, mut server_tx) = server.split();
    let upstream = async {
        let mut watch = DeclareWatch::default();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut out = Vec::with_capacity(chunk.len());
        loop {
            let n = match client_rx.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            out.clear();
            let verdict = watch.feed(&chunk[..n], &mut out, || state.claim_stall());
            if server_tx.write_all(&out).await.is_err() {
                break;
            }
            if let Verdict::Stall = verdict {
                return Relay::Stalled;
            }
        }
        let _ = server_tx.shutdown().await;
        Relay::Closed
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    };
    tokio::pin!(upstream, downstream);
    let mut downstream_done = false;
    loop {
        tokio::select! {
            relay = &mut upstream => {
                if let Relay::Closed = relay
                    && !downstream_done
                {
                    downstream.await;
                }
                return relay;
            }
            () = &mut downstream, if !downstream_done => downstream_done = true,
        }
    }
}

const PROTOCOL_HEADER_LEN: usize = 8;
/// Type (1), channel (2), payload size (4).
const FRAME_HEADER_LEN: usize = 7;
const FRAME_METHOD: u8 = 1;
/// Class and method id at the start of a method frame's payload.
const METHOD_IDS_LEN: usize = 4;
const EXCHANGE_DECLARE: (u16, u16) = (40, 10);
const QUEUE_DECLARE: (u16, u16) = (50, 10);

/// What [`DeclareWatch::feed`] decided about a chunk.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Everything up to the end of the chunk may pass (a frame's head may be held back).
    Pass,
    /// A declare claimed the stall: `out` holds what came before it, nothing after.
    Stall,
}

/// Follows the client's side of an AMQP 0-9-1 connection (protocol header, then
/// frames) across reads, holding back only the bytes of a frame's head until
/// it shows whether the frame is a declare; payloads pass through unread.
#[derive(Debug, Default)]
struct DeclareWatch {
    greeted: bool,
    /// The incomplete protocol header or head of the current frame.
    head: Vec<u8>,
    /// Bytes of the current frame (payload and frame end) still to pass unread.
    rest: usize,
}

impl DeclareWatch {
    /// Appends to `out` the bytes of `chunk` that may be forwarded. At a declare
    /// it asks `claim_stall`: when that returns true it stops there (the declare
    /// is not forwarded); otherwise the declare passes like any frame.
    fn feed(
        &mut self,
        mut chunk: &[u8],
        out: &mut Vec<u8>,
        mut claim_stall: impl FnMut() -> bool,
    ) -> Verdict {
        while !chunk.is_empty() {
            if self.rest > 0 {
                let n = self.rest.min(chunk.len());
                out.extend_from_slice(&chunk[..n]);
                self.rest -= n;
                chunk = &chunk[n..];
                continue;
            }
            let n = (self.head_len() - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
            if self.head.len() < self.head_len() {
                continue;
            }
            if !self.greeted {
                self.greeted = true;
            } else {
                if self.is_declare() && claim_stall() {
                    return Verdict::Stall;
                }
                // Payload plus frame end, less what the head already took of the payload.
                self.rest =
                    self.payload_size().saturating_add(1) - (self.head.len() - FRAME_HEADER_LEN);
            }
            out.append(&mut self.head);
        }
        Verdict::Pass
    }

    /// How long the head being collected is once complete: the protocol header,
    /// a frame header, or for a method frame the header plus class and method id.
    fn head_len(&self) -> usize {
        if !self.greeted {
            PROTOCOL_HEADER_LEN
        } else if self.head.len() < FRAME_HEADER_LEN {
            FRAME_HEADER_LEN
        } else if self.head[0] == FRAME_METHOD && self.payload_size() >= METHOD_IDS_LEN {
            FRAME_HEADER_LEN + METHOD_IDS_LEN
        } else {
            FRAME_HEADER_LEN
        }
    }

    fn payload_size(&self) -> usize {
        let size = u32::from_be_bytes([self.head[3], self.head[4], self.head[5], self.head[6]]);
        usize::try_from(size).unwrap_or(usize::MAX)
    }

    fn is_declare(&self) -> bool {
        if self.head.len() < FRAME_HEADER_LEN + METHOD_IDS_LEN || self.head[0] != FRAME_METHOD {
            return false;
        }
        let class = u16::from_be_bytes([self.head[7], self.head[8]]);
        let method = u16::from_be_bytes([self.head[9], self.head[10]]);
        matches!((class, method), EXCHANGE_DECLARE | QUEUE_DECLARE)
    }
}

/// A TLS-terminating proxy: clients speak TLS to it (certificate for
/// `localhost`/`127.0.0.1` signed by a CA generated per proxy), it speaks plain
/// TCP to the upstream. Lets tests prove `amqps://` and CA-file handling against
/// a broker without a TLS listener.
#[derive(Debug)]
pub struct TlsProxy {
    addr: SocketAddr,
    ca_pem: String,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    pub async fn start(upstream: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "shop test CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        let cert = params.signed_by(&key, &issuer)?;

        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let upstream = upstream.to_owned();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut client) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Ok(Self {
            addr,
            ca_pem: ca.pem(),
            accept,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The PEM of the CA that signed the proxy's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.accept.abort();
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

    use super::*;

    const GREETING: &[u8] = b"AMQP\x00\x00\x09\x01";

    fn method_frame(channel: u16, (class, method): (u16, u16), args: &[u8]) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&class.to_be_bytes());
        payload.extend_from_slice(&method.to_be_bytes());
        payload.extend_from_slice(args);
        frame(FRAME_METHOD, channel, &payload)
    }

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&u32::try_from(payload.len()).expect("size").to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        f
    }

    /// Feeds `stream` in chunks of `size` with the stall armed; returns what was
    /// forwarded and whether it stalled.
    fn feed_in_chunks(stream: &[u8], size: usize) -> (Vec<u8>, bool) {
        let mut watch = DeclareWatch::default();
        let mut out = Vec::new();
        for chunk in stream.chunks(size) {
            if watch.feed(chunk, &mut out, || true) == Verdict::Stall {
                return (out, true);
            }
        }
        (out, false)
    }

    /// The client's side up to a declare: greeting, start-ok, a heartbeat, a
    /// content body whose bytes look like a declare, channel.open.
    fn before_declare() -> Vec<u8> {
        let mut stream = GREETING.to_vec();
        stream.extend(method_frame(0, (10, 11), b"start-ok arguments"));
        stream.extend(frame(8, 0, &[]));
        stream.extend(frame(3, 1, &method_frame(1, EXCHANGE_DECLARE, b"")));
        stream.extend(method_frame(1, (20, 10), b"\x00"));
        stream
    }

    #[test]
    fn a_declare_is_held_back_and_everything_before_it_passes_however_the_bytes_are_split() {
        for declare in [EXCHANGE_DECLARE, QUEUE_DECLARE] {
            let before = before_declare();
            let mut stream = before.clone();
            stream.extend(method_frame(1, declare, b"\x00\x00\x05topic"));
            stream.extend(method_frame(1, (20, 40), b"after"));
            for size in [1, 2, 3, 7, 11, 13, stream.len()] {
                let (out, stalled) = feed_in_chunks(&stream, size);
                assert!(stalled, "chunks of {size}");
                assert_eq!(out, before, "chunks of {size}");
            }
        }
    }

    #[test]
    fn frames_other_than_declares_pass_unchanged() {
        let mut stream = before_declare();
        stream.extend(method_frame(1, (50, 20), b"queue.bind"));
        stream.extend(method_frame(1, (40, 20), b"exchange.delete"));
        for size in [1, 5, stream.len()] {
            assert_eq!(feed_in_chunks(&stream, size), (stream.clone(), false));
        }
    }

    #[test]
    fn a_declare_passes_when_the_stall_is_already_taken() {
        let mut stream = before_declare();
        stream.extend(method_frame(1, EXCHANGE_DECLARE, b"args"));
        let mut watch = DeclareWatch::default();
        let mut out = Vec::new();
        assert_eq!(watch.feed(&stream, &mut out, || false), Verdict::Pass);
        assert_eq!(out, stream);
    }

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
