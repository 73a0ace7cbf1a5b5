//! CPU time from `/proc`, sampled at the two ends of a measured window.
//!
//! A component is a process tree: its root's own time, the time of the children
//! it has reaped (`cutime` + `cstime`: a PostgreSQL backend that ended), and the
//! time of every live descendant (backends, `erl_child_setup`, `inet_gethost`).
//! A descendant that exits between the samples moves from the live sum into its
//! parent's reaped time, so the total never goes backwards and nothing is lost.

use std::{collections::BTreeMap, time::Instant};

/// What a component is, for the subtotals of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Service,
    Postgres,
    Rabbitmq,
}

/// A process tree to measure, named for the report.
#[derive(Clone, Debug)]
pub struct Component {
    pub name: String,
    pub group: Group,
    pub pid: u32,
}

/// The components of one run and the kernel's clock tick.
#[derive(Clone, Debug)]
pub struct Probe {
    pub components: Vec<Component>,
    pub ticks_per_s: f64,
}

/// CPU counters at one instant, in clock ticks.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    /// Component name → its tree's ticks; `None` when its root was not running.
    pub components: BTreeMap<String, Option<u64>>,
    /// This process (the load generator).
    pub own: Option<u64>,
    /// Every CPU's busy time (`/proc/stat`), whoever used it.
    pub machine: Option<u64>,
}

/// One line of `/proc/PID/stat`, the fields used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    pub ppid: u32,
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
}

impl Stat {
    /// The process's own time plus that of the children it has reaped.
    fn ticks(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// Parses `/proc/PID/stat`. The command name sits in parentheses and may itself
/// hold spaces and parentheses, so the fields are counted from the last `)`.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let (head, tail) = line.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    // Field 3 (state) is the first after the name; utime is field 14.
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        pid,
        ppid: u32::try_from(field(4)?).ok()?,
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

/// Every process now running; one that exits while the list is read is skipped.
pub fn processes() -> Vec<Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|line| parse_stat(&line))
        .collect()
}

/// Ticks of the tree rooted at `root`; `None` when `root` is not among `all`.
pub fn tree_ticks(root: u32, all: &[Stat]) -> Option<u64> {
    let mut total = all.iter().find(|s| s.pid == root)?.ticks();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for child in all.iter().filter(|s| s.ppid == parent && s.pid != root) {
            total += child.ticks();
            frontier.push(child.pid);
        }
    }
    Some(total)
}

/// Busy ticks of all CPUs: the first line of `/proc/stat` without idle and iowait.
pub fn parse_machine(proc_stat: &str) -> Option<u64> {
    let line = proc_stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal; guest time is inside user.
    Some(v.get(..8)?.iter().sum::<u64>() - v[3] - v[4])
}

/// The kernel's clock tick (`getconf CLK_TCK`). `sysconf` would need `unsafe`,
/// which the workspace forbids; 100 is what Linux uses on every common platform.
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

impl Probe {
    /// Fails when a component's root is not running, so a wrong pid shows at
    /// the start rather than as a missing figure at the end.
    pub fn new(components: Vec<Component>) -> Result<Self, String> {
        let all = processes();
        for c in &components {
            if tree_ticks(c.pid, &all).is_none() {
                return Err(format!("{} (pid {}) is not running", c.name, c.pid));
            }
        }
        Ok(Self {
            components,
            ticks_per_s: clock_ticks(),
        })
    }

    pub fn sample(&self) -> Sample {
        let all = processes();
        let own = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|line| parse_stat(&line))
            .map(|s| s.utime + s.stime);
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| parse_machine(&text));
        Sample {
            at: Instant::now(),
            components: self
                .components
                .iter()
                .map(|c| (c.name.clone(), tree_ticks(c.pid, &all)))
                .collect(),
            own,
            machine,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(pid: u32, ppid: u32, utime: u64, cutime: u64) -> Stat {
        Stat {
            pid,
            ppid,
            utime,
            stime: 1,
            cutime,
            cstime: 0,
        }
    }

    #[test]
    fn a_stat_line_is_read_from_after_the_command_name() {
        let line =
            "2978 (beam (smp) x) S 1 2977 2977 0 -1 4194304 32940 0 1 0 1134 949 7 3 20 0 20 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                pid: 2978,
                ppid: 1,
                utime: 1134,
                stime: 949,
                cutime: 7,
                cstime: 3
            })
        );
    }

    #[test]
    fn a_tree_counts_its_root_reaped_children_and_live_descendants_only() {
        let all = [
            stat(10, 1, 100, 50),  // root, with 50 ticks of reaped children
            stat(11, 10, 20, 0),   // child
            stat(12, 11, 5, 0),    // grandchild
            stat(13, 1, 1000, 0),  // unrelated
            stat(14, 13, 1000, 0), // unrelated child
        ];
        assert_eq!(tree_ticks(10, &all), Some(151 + 21 + 6));
        assert_eq!(tree_ticks(99, &all), None);
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_iowait() {
        let text = "cpu  47721 1 6915 1321180 545 2 430 248 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_machine(text), Some(47721 + 1 + 6915 + 2 + 430 + 248));
    }
}
