//! What a [`TcpProxy`](super::TcpProxy) has armed, shared between its handle
//! (which arms and clears faults) and its accept loop and connections (which
//! obey them).

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
};

use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub(super) struct State {
    pub(super) upstream: String,
    pub(super) refusing: AtomicBool,
    pub(super) cut: Mutex<CancellationToken>,
    /// One-shot: the first watched connection to send a declare clears it.
    pub(super) stall_armed: AtomicBool,
    pub(super) stalls: AtomicUsize,
    /// Milliseconds each client chunk waits, for connections opened after it was set.
    pub(super) client_delay_ms: AtomicU64,
}

impl State {
    /// Takes the armed stall, if any, and counts it: true for exactly one caller.
    pub(super) fn claim_stall(&self) -> bool {
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
