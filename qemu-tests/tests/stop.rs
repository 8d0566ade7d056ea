//! Stopping the harness stops its guest: a harness sent SIGTERM, SIGINT or
//! SIGHUP while its (stand-in) QEMU runs leaves no QEMU behind, exits with
//! 128 + the signal, keeps the serial log and says why the run failed.
//!
//! The harness is this test binary run again with `HARNESS_DIR` set, so
//! that the signal goes to a process of its own, as a user's would.

// The harness side runs outside a #[test] function, in its own process.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kupgrade_vm::report::{Report, Verdict};
use kupgrade_vm::run::{self, Options, Prepared};
use kupgrade_vm::scenario::Scenario;
use kupgrade_vm::stop;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const HARNESS_DIR: &str = "KUPGRADE_VM_STOP_TEST_DIR";
const TEST: &str = "a_stopped_harness_stops_its_guest_and_keeps_the_serial_log";

/// The harness side: one run with a QEMU that prints a line and hangs.
fn harness(dir: &Path) -> ! {
    stop::install(Duration::from_secs(20)).unwrap();
    let fake_qemu = dir.join("qemu");
    fs::write(
        &fake_qemu,
        format!(
            "#!/bin/sh\necho $$ > {}/qemu.pid\necho 'early boot line'\nexec sleep 600\n",
            dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&fake_qemu, fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["root.img", "initrd.img"] {
        fs::write(dir.join(f), b"x").unwrap();
    }
    let mut scenario = Scenario::parse(
        "name = \"stopped\"\n[[workload]]\nname = \"w\"\ncommand = [\"/bin/true\"]\n",
    )
    .unwrap();
    scenario.guest.timeout_secs = 300;
    let p = Prepared {
        scenario,
        from: "a".into(),
        to: "b".into(),
        bin_dir: dir.into(),
        rootfs: dir.join("root.img"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    };
    let opts = Options {
        cache: dir.join("cache"),
        workspace: dir.into(),
        bin_dir: None,
        accel: "tcg".into(),
        qemu: fake_qemu.display().to_string(),
        keep: false,
        verbose: false,
    };
    let rep = run::run_prepared(&p, dir, &opts).unwrap();
    fs::write(dir.join("report.json"), serde_json::to_vec(&rep).unwrap()).unwrap();
    std::process::exit(stop::exit_status().map_or(0, i32::from));
}

fn wait_for(what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !ready() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn serial_logs(cache: &Path) -> Vec<PathBuf> {
    fs::read_dir(cache.join("runs"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("serial.log"))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

#[test]
fn a_stopped_harness_stops_its_guest_and_keeps_the_serial_log() {
    if let Some(dir) = std::env::var_os(HARNESS_DIR) {
        harness(Path::new(&dir));
    }
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        let dir = tempfile::tempdir().unwrap();
        let log = fs::File::create(dir.path().join("harness.log")).unwrap();
        let mut harness = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST, "--nocapture"])
            .env(HARNESS_DIR, dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid_file = dir.path().join("qemu.pid");
        let cache = dir.path().join("cache");
        wait_for("the stand-in QEMU", Duration::from_secs(30), || {
            pid_file.exists()
                && serial_logs(&cache)
                    .iter()
                    .any(|l| fs::read_to_string(l).is_ok_and(|t| t.contains("early boot line")))
        });
        let qemu: i32 = fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(alive(qemu));

        kill(Pid::from_raw(harness.id() as i32), sig).unwrap();
        let mut status = None;
        wait_for("the harness to exit", Duration::from_secs(30), || {
            status = harness.try_wait().unwrap();
            status.is_some()
        });
        let qemu_left = alive(qemu);
        if qemu_left {
            let _ = kill(Pid::from_raw(qemu), Signal::SIGKILL);
        }
        let said = fs::read_to_string(dir.path().join("harness.log")).unwrap_or_default();
        assert!(
            !qemu_left,
            "{sig}: the harness left its QEMU running\n{said}"
        );
        assert_eq!(
            status.unwrap().code(),
            Some(128 + sig as i32),
            "{sig}: exit status\n{said}"
        );
        let rep: Report =
            serde_json::from_slice(&fs::read(dir.path().join("report.json")).unwrap()).unwrap();
        assert_eq!(rep.verdict, Verdict::Fail);
        let c = rep
            .checks
            .iter()
            .find(|c| c.name == "guest finished in time")
            .unwrap();
        assert!(!c.ok && c.detail.contains(sig.as_str()), "{c:?}");
        let serial = fs::read_to_string(&rep.artifacts.serial_log).unwrap();
        assert!(serial.contains("early boot line"), "{serial}");
        assert!(
            rep.artifacts.disk_image.is_some(),
            "a stopped run keeps its disk"
        );
    }
}
