//! Captures the device and system state CRIU does not carry by itself:
//! interfaces and routes (from `ip -json`), the hostname, an RNG seed, and
//! the workloads' runtime state on tmpfs mounts ([`runstate`]).

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use contract::devstate::{Address, DeviceState, Family, Interface, Route, TmpfsMount};
use serde_json::Value;

use crate::child::{self, Limits, TOOL_DEADLINE};
use crate::proc::Proc;
use crate::runstate;
use crate::workload::Workload;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`ip -json {args}`")]
    Ip {
        args: String,
        #[source]
        source: child::Error,
    },
    #[error("`ip -json {args}` failed or printed no JSON: {message}")]
    IpOutput { args: String, message: String },
    #[error("runtime state on tmpfs")]
    Runtime(#[from] runstate::Error),
}

/// `ip -json ARGS`, killed at its deadline or when a signal asks `go` to
/// stop: the workloads are frozen while it runs.
fn ip_json(args: &[&str], stop: &AtomicBool) -> Result<Value, Error> {
    json_of(
        Command::new("ip").arg("-json").args(args),
        &args.join(" "),
        Limits::deadline(TOOL_DEADLINE).stopped_by(stop),
    )
}

fn json_of(cmd: &mut Command, args: &str, limits: Limits) -> Result<Value, Error> {
    let out = child::run(cmd, None, limits).map_err(|source| Error::Ip {
        args: args.into(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::IpOutput {
            args: args.into(),
            message: out.stderr().trim().into(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| Error::IpOutput {
        args: args.into(),
        message: e.to_string(),
    })
}

/// Interfaces from `ip -json addr show`, without loopback and without the
/// link-local IPv6 addresses the kernel makes by itself.
pub fn parse_interfaces(v: &Value) -> Vec<Interface> {
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or_default().to_string();
        let flags: Vec<&str> = link["flags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .collect();
        if name.is_empty() || flags.contains(&"LOOPBACK") {
            continue;
        }
        let addresses = link["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["scope"].as_str() != Some("link") || a["family"].as_str() == Some("inet"))
            .filter_map(|a| {
                Some(Address {
                    family: if a["family"].as_str()? == "inet6" {
                        Family::Inet6
                    } else {
                        Family::Inet
                    },
                    local: a["local"].as_str()?.to_string(),
                    prefix_len: a["prefixlen"].as_u64()? as u8,
                    broadcast: a["broadcast"].as_str().map(str::to_string),
                })
            })
            .collect();
        out.push(Interface {
            mac: link["address"].as_str().map(str::to_string),
            mtu: link["mtu"].as_u64().unwrap_or(1500) as u32,
            up: flags.contains(&"UP"),
            name,
            addresses,
        });
    }
    out
}

/// Routes from `ip -json route show`, without those the kernel adds itself
/// when an address is configured (`proto kernel`).
pub fn parse_routes(v: &Value, family: Family) -> Vec<Route> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["protocol"].as_str() != Some("kernel"))
        .filter(|r| r["type"].as_str().is_none_or(|t| t == "unicast"))
        .filter_map(|r| {
            Some(Route {
                family,
                dst: r["dst"].as_str()?.to_string(),
                gateway: r["gateway"].as_str().map(str::to_string),
                dev: r["dev"].as_str().map(str::to_string),
                metric: r["metric"].as_u64().map(|m| m as u32),
                scope: r["scope"]
                    .as_str()
                    .filter(|s| *s != "global")
                    .map(str::to_string),
                prefsrc: r["prefsrc"].as_str().map(str::to_string),
                protocol: r["protocol"]
                    .as_str()
                    .filter(|p| *p != "boot")
                    .map(str::to_string),
            })
        })
        .collect()
}

/// Copies the workloads' runtime state on tmpfs mounts into `dest` (at
/// its absolute path below it) and returns the tmpfs mounts it needs (see
/// [`runstate`]). `skip` is kupgrade's own scratch space.
pub fn tmpfs_files(
    workloads: &[Workload],
    dest: &Path,
    skip: &Path,
) -> Result<Vec<TmpfsMount>, Error> {
    let proc = Proc::host();
    let places = runstate::Places {
        run_dir: Path::new("/run"),
        skip,
    };
    let plan = runstate::plan(&proc, workloads, &places);
    runstate::copy(&proc, &plan, dest)?;
    Ok(plan.mounts)
}

/// The options of the devpts the terminals live on, `/dev/pts`.
pub fn devpts_options(mountinfo: &str) -> Option<String> {
    let mounts = runstate::mounts(mountinfo);
    runstate::mount_of("/dev/pts/0", &mounts)
        .filter(|m| m.fstype == "devpts")
        .map(|m| m.options.clone())
}

pub fn rng_seed() -> Vec<u8> {
    let mut seed = vec![0u8; 512];
    match fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed)) {
        Ok(()) => seed,
        Err(_) => Vec::new(),
    }
}

/// Everything but the network locks (known only after the dump) and the
/// tmpfs files (copied by [`tmpfs_files`]).
pub fn system_state(stop: &AtomicBool) -> Result<DeviceState, Error> {
    let interfaces = parse_interfaces(&ip_json(&["addr", "show"], stop)?);
    let mut routes = parse_routes(
        &ip_json(&["-4", "route", "show", "table", "main"], stop)?,
        Family::Inet,
    );
    routes.extend(parse_routes(
        &ip_json(&["-6", "route", "show", "table", "main"], stop)?,
        Family::Inet6,
    ));
    Ok(DeviceState {
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        interfaces,
        routes,
        network_locks: Vec::new(),
        tmpfs_mounts: Vec::new(),
        devpts_options: devpts_options(&Proc::host().mountinfo()),
        rng_seed: rng_seed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workloads are frozen while `ip` runs: a hung one is killed at
    /// its deadline or on a signal, and the step fails saying so.
    #[test]
    fn a_hung_ip_is_killed_at_its_deadline_or_on_a_signal() {
        let hung = || {
            let mut c = Command::new("sh");
            c.args(["-c", "sleep 30"]);
            c
        };
        let started = std::time::Instant::now();
        let e = json_of(
            &mut hung(),
            "addr show",
            Limits::deadline(std::time::Duration::from_millis(300)),
        )
        .unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert!(
            matches!(
                &e,
                Error::Ip {
                    source: child::Error::Timeout { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            child::chain(&e).contains("did not finish within 0.3 s"),
            "{}",
            child::chain(&e)
        );
        let stop = AtomicBool::new(true);
        let e = json_of(
            &mut hung(),
            "addr show",
            Limits::deadline(TOOL_DEADLINE).stopped_by(&stop),
        )
        .unwrap_err();
        assert!(
            matches!(
                &e,
                Error::Ip {
                    source: child::Error::Interrupted { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        let ok = json_of(
            Command::new("sh").args(["-c", "echo '[1]'"]),
            "x",
            Limits::deadline(TOOL_DEADLINE),
        )
        .unwrap();
        assert_eq!(ok, serde_json::json!([1]));
    }

    #[test]
    fn interfaces_skip_loopback_and_ipv6_link_local() {
        let v: Value = serde_json::from_str(r#"[
          {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"],"mtu":65536,"address":"00:00:00:00:00:00",
           "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
          {"ifindex":2,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,
           "address":"52:54:00:12:34:56","addr_info":[
             {"family":"inet","local":"10.0.2.15","prefixlen":24,"broadcast":"10.0.2.255","scope":"global"},
             {"family":"inet6","local":"fe80::5054:ff:fe12:3456","prefixlen":64,"scope":"link"}]}]"#)
        .unwrap();
        let ifs = parse_interfaces(&v);
        assert_eq!(ifs.len(), 1);
        assert_eq!(ifs[0].name, "eth0");
        assert!(ifs[0].up);
        assert_eq!(ifs[0].mac.as_deref(), Some("52:54:00:12:34:56"));
        assert_eq!(ifs[0].addresses.len(), 1);
        assert_eq!(ifs[0].addresses[0].broadcast.as_deref(), Some("10.0.2.255"));
    }

    #[test]
    fn devpts_options_are_those_of_the_visible_devpts() {
        let mi = "24 27 0:6 / /dev rw - devtmpfs devtmpfs rw,mode=755\n\
                  26 24 0:24 / /dev/pts rw - devpts devpts rw,mode=600,ptmxmode=000\n\
                  29 26 0:26 / /dev/pts rw - devpts devpts rw,gid=5,mode=620,ptmxmode=666\n";
        assert_eq!(
            devpts_options(mi).as_deref(),
            Some("gid=5,mode=620,ptmxmode=666")
        );
        assert_eq!(
            devpts_options("24 27 0:6 / /dev rw - devtmpfs devtmpfs rw\n"),
            None
        );
    }

    #[test]
    fn routes_skip_kernel_made_ones() {
        let v: Value = serde_json::from_str(r#"[
          {"dst":"default","gateway":"10.0.2.2","dev":"eth0","flags":[]},
          {"dst":"10.0.2.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.0.2.15","flags":[]}]"#)
        .unwrap();
        let r = parse_routes(&v, Family::Inet);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].dst, "default");
        assert_eq!(r[0].gateway.as_deref(), Some("10.0.2.2"));
    }
}
