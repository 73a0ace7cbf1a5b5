//! What the cluster kit needs of the host: process groups to kill, orphans
//! of killed test processes to sweep, bounded commands, free ports.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use super::PREFIX;

/// SIGKILL to process group `pgid`.
pub(super) fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Kills the nodes and removes the directory of every cluster whose owning
/// process is gone (a test process killed before it could drop its cluster).
pub(super) fn sweep_orphans() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let is_cluster = entry.file_name().to_string_lossy().starts_with(PREFIX);
        let owner = std::fs::read_to_string(dir.join("owner")).unwrap_or_default();
        let owner = owner.trim();
        if !is_cluster || owner.is_empty() || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        for node in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(pgid) = std::fs::read_to_string(node.path().join("pgid")) else {
                continue;
            };
            // Only if that process group is still this node's (pids are reused).
            let cmdline =
                std::fs::read(format!("/proc/{}/cmdline", pgid.trim())).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("rabbitmq-server")
                && let Ok(pgid) = pgid.trim().parse()
            {
                kill_group(pgid);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Runs `command` with its output captured, killing it after `limit`.
pub(super) fn output_within(mut command: Command, limit: Duration) -> Result<Output, String> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{e} (is RabbitMQ installed?)"))?;
    let pid = child.id();
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match result.recv_timeout(limit) {
        Ok(output) => output.map_err(|e| e.to_string()),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            Err(format!("no answer within {limit:?}"))
        }
    }
}

/// Ports for the nodes, free now, from 21000-31999: below the ephemeral range
/// (32768 on), where a client's outgoing connection could take a port between
/// this check and the node's bind, and away from the ports RabbitMQ's own CLI
/// tools bind (35672-35682) and the machine broker's distribution port (25672).
pub(super) fn free_ports(count: usize) -> Result<Vec<u16>, String> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    let start: u16 = 21_000 + (uuid::Uuid::new_v4().as_u128() % 11_000) as u16;
    for offset in 0..11_000u16 {
        if ports.len() == count {
            break;
        }
        let port = 21_000 + (start - 21_000 + offset) % 11_000;
        if port == 25_672 {
            continue;
        }
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
            ports.push(port);
        }
    }
    if ports.len() < count {
        return Err(format!("only {} free ports in 21000-31999", ports.len()));
    }
    Ok(ports)
}

pub(super) fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| e.to_string())
}
