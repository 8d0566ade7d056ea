//! Device and system state that CRIU does not carry across the kexec by
//! itself: written by the agent as the `devstate` section (JSON), applied by
//! `kupgrade-init` before `criu restore`.

use serde::{Deserialize, Serialize};

/// Name of the section holding [`DeviceState`] as JSON.
pub const SECTION: &str = "devstate";
/// Name of the section holding the tmpfs files workloads had open, as a tree
/// rooted at `/` (e.g. `dev/shm/seg`, `run/app.sock`).
pub const TMPFS_SECTION: &str = "tmpfs";
/// Prefix of each workload's CRIU image directory section: `criu/<name>`.
pub const CRIU_SECTION_PREFIX: &str = "criu/";

pub fn criu_section(workload: &str) -> String {
    format!("{CRIU_SECTION_PREFIX}{workload}")
}

/// The name of a lock table in `nft list table` output, as
/// `table inet CRIU-123 {` -> `CRIU-123`; None when no line names a table.
pub fn lock_table_name(nft: &str) -> Option<String> {
    let line = nft.lines().find(|l| l.trim_start().starts_with("table "))?;
    let mut words = line.split_whitespace().skip(1);
    let first = words.next()?;
    let name = if ["ip", "ip6", "inet", "arp", "bridge", "netdev"].contains(&first) {
        words.next()?
    } else {
        first
    };
    Some(name.trim_end_matches('{').trim().to_string())
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub hostname: String,
    /// Interfaces other than loopback, which the new kernel brings up itself.
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    /// CRIU's network-lock tables (`nft list table inet CRIU-<pid>` output):
    /// installed before any interface gets its address, so that the new
    /// kernel never answers a peer of a checkpointed connection with a reset.
    pub network_locks: Vec<String>,
    /// tmpfs mounts the workloads use, mounted again before the restore,
    /// in this order (a mount's parents first).
    pub tmpfs_mounts: Vec<TmpfsMount>,
    /// The options of the devpts at `/dev/pts`, so that terminals get the
    /// same modes in the new boot. Absent in older images.
    #[serde(default)]
    pub devpts_options: Option<String>,
    /// Entropy from the old kernel, credited to the new one's pool.
    pub rng_seed: Vec<u8>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    pub mtu: u32,
    pub up: bool,
    pub addresses: Vec<Address>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Inet,
    Inet6,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub family: Family,
    pub local: String,
    pub prefix_len: u8,
    pub broadcast: Option<String>,
}

/// A route as `ip route` shows it; `dst` is `default` or a prefix.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub family: Family,
    pub dst: String,
    pub gateway: Option<String>,
    pub dev: Option<String>,
    pub metric: Option<u32>,
    pub scope: Option<String>,
    pub prefsrc: Option<String>,
    pub protocol: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TmpfsMount {
    pub path: String,
    pub options: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_table_names_are_read_from_nft_output() {
        assert_eq!(
            lock_table_name("table inet CRIU-4242 {\n chain x {}\n}\n").as_deref(),
            Some("CRIU-4242")
        );
        assert_eq!(lock_table_name("table CRIU-1 {").as_deref(), Some("CRIU-1"));
        assert_eq!(lock_table_name("nothing"), None);
    }
}
