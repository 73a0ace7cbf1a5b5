//! A TCP proxy between a client and a server that a test can cut: `sever` drops
//! every open connection (the client sees the socket close mid-stream), `block`
//! also refuses new ones until `restore`, and `stall_next_declare` freezes the
//! next AMQP connection at its next exchange or queue declare (a peer that died
//! mid-declare without a FIN). `delay_client` holds every chunk the client sends
//! for a while before forwarding it (a slow link, so a test can act between
//! two of a client's requests).
//!
//! How a connection copies is fixed when it opens: with a client delay armed,
//! a delayed copy (a stall armed as well never fires on it); else, with a stall
//! armed, a copy that follows the client's AMQP frames; else a plain byte copy.
//!
//! [`TlsProxy`] is the other proxy here: it terminates TLS for a plain upstream.
//!
//! One job per file: `tcp` (the [`TcpProxy`] handle and its accept loop),
//! `faults` (what the handle has armed, shared with the connections), `relay`
//! (the delayed and the declare-watching copies), `declare_watch` (spotting a
//! declare in the client's AMQP frames), `tls` (the [`TlsProxy`]).

mod declare_watch;
mod faults;
mod relay;
mod tcp;
mod tls;

pub use tcp::TcpProxy;
pub use tls::TlsProxy;
