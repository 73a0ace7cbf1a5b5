//! How a connection through a [`TcpProxy`](super::TcpProxy) copies bytes once
//! it is accepted: with every client chunk held for a delay, or following the
//! client's frames so that an armed stall can freeze it at a declare. (Plain
//! connections are a `copy_bidirectional` in the accept loop.)

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    declare_watch::{DeclareWatch, Verdict},
    faults::State,
};

/// Copies both directions, holding each chunk from the client for `delay`.
pub(super) async fn relay_delayed(
    client: &mut TcpStream,
    server: &mut TcpStream,
    delay: std::time::Duration,
) {
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
pub(super) enum Relay {
    /// Both directions finished (a side closed or failed).
    Closed,
    /// The armed stall fired: nothing more may be forwarded.
    Stalled,
}

/// Copies both directions as `copy_bidirectional` does, following the client's
/// frames so that the armed stall can stop everything at a declare.
pub(super) async fn relay_watching_declares(
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
