//! The man pages, shell completions and `docs/cli.md`, all made from the
//! clap definitions, the exit code table ([`Exit`]) and the JSON schema
//! ([`json::SCHEMA`]), so that none of them can drift from the program.
//! `kupgrade __docs DIR` writes them; `scripts/package` puts them into the
//! package, and a test keeps the committed `docs/cli.md` current.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;
use kupgrade_agent::exit::Exit;
use kupgrade_agent::json;
use roff::{bold, roman, Inline, Roff};

use crate::Cli;

/// kupgrade is run by root from /usr/sbin: section 8.
const SECTION: &str = "8";

/// How the new kernel boots, for the man page and `docs/cli.md`.
const BOOT: &str = r#"`kupgrade stage` loads the new kernel with the distribution's own initramfs of
that release, so that the root is assembled and mounted as on any boot (LVM,
LUKS, RAID): `/boot/initrd.img-RELEASE`, else `/boot/initramfs-RELEASE.img`,
when it carries kupgrade's hook (the file `usr/lib/kupgrade/initramfs-hook`
in the image, which the initramfs-tools hook and the dracut module `90kupgrade`
write). When the image in `/boot` has no hook (it was made before kupgrade was
installed), `stage` builds one with `mkinitramfs` or `dracut` into
`/run/kupgrade/` and leaves `/boot` alone. A machine with neither a
distribution initramfs for the release nor a generator gets kupgrade's own
minimal initramfs, which `--own-initramfs` also asks for: there `kupgrade-init`
is `/init` and mounts `root=` itself (a plain block device by path, `LABEL=` or
`UUID=`).

On the boot `kupgrade go` kexecs into, the command line carries
`kupgrade.resume`. kupgrade's boot script in the distribution's initramfs
(initramfs-tools: `scripts/init-bottom/kupgrade`; dracut: a pre-pivot hook)
then loads the modules of the restore and makes the switch to the real root
execute `/usr/lib/kupgrade/kupgrade-init` as the init: initramfs-tools through
`/conf/param.conf`, dracut through `real_init=`, or with systemd in the
initramfs through a drop-in of `initrd-switch-root.service`. `kupgrade-init`
runs as PID 1 in the final root, with `/dev`, `/proc`, `/sys` and `/run` where
the real system keeps them, remounts the root read-write if it was mounted
read-only, restores the workloads, and executes the real init (`init=`, else
`/sbin/init`), whose children they become. It does not restore inside the
initramfs: initramfs-tools moves its `/run`, `/proc` and `/sys` into the root
only after its last boot script, and a systemd initramfs sends SIGTERM to every
process it does not know when it switches root. On any other boot the hook
does nothing.

The new kernel's command line is the running one (so `root=`, `rd.lvm.lv=`,
`rd.luks.uuid=`, `resume=` and the rest that the initramfs needs stay), without
the keys of one boot (`BOOT_IMAGE=`, `initrd=`, `kupgrade.*`), with `--append`
added, plus `kupgrade.resume` and `kupgrade.store=`. With the distribution's
initramfs it also gets `kupgrade.modules=`, the drivers of the network
interfaces (from sysfs, e.g. `virtio_net,virtio_pci`): `kupgrade-init` loads
them with the root's `modprobe` before it configures the interfaces, since the
distribution's initramfs need not have (dracut leaves network drivers out
unless it boots from the network) and udev only runs after the restore."#;

/// What happens to systemd services, for the man page and `docs/cli.md`.
const SYSTEMD: &str = r#"A service is preserved when `/etc/kupgrade/config.toml` declares it by unit
(`unit = "NAME.service"`): its cgroup is the workload. `kupgrade check` says for
every running service whether it is preserved, refused (and why), or not
declared, in which case systemd starts it again after the upgrade.

A service's stdout and stderr are a stream socket to journald, which is no part
of the workload. kupgrade finds such a stream by journald's record of it
(`/run/systemd/journal/streams/`), and CRIU dumps the service's end as an
external socket. On the new kernel `kupgrade-init` restores that end as one
end of a new socket pair, and starts a relay (`kupgrade-init __journal-relay`)
on the other end once every workload is restored. The relay waits for the new
journald's socket, introduces the stream as systemd did (identifier, unit,
priority), and forwards what the service writes until the service closes its
end. It sends with the credentials of the service's main process (journald
takes the sender, and from it the unit, from each message's credentials), so
`journalctl -u NAME.service` shows the lines as the service's own. A stream
that several processes of the service write to (workers that inherited the
main process's stderr) is one stream: after the upgrade all its lines carry the
main process's PID (`_PID=`), as journald gave them the PID of the stream's
first holder before; once the main process has exited, they go on as the
relay's own. Each relay records its stream in
`/run/kupgrade/journal/` for the next upgrade.

systemd would start a preserved unit a second time. `kupgrade-init` leaves a
runtime drop-in, `/run/systemd/system/NAME.service.d/zz-kupgrade-adopt.conf`,
and a PID file in `/run/kupgrade/adopt/`: the unit's first start in that boot
runs nothing (`Type=forking`, `ExecStart=/bin/true`) and takes the restored
process as its main PID, so `systemctl status`, `systemctl stop`, the unit's
cgroup limits and its watchdog (with the unit's `NotifyAccess=`, at least
`main`) apply to it. A second
drop-in, in `/run/systemd/system/multi-user.target.d/`, wants the unit, so that
one started by hand (not enabled) is adopted at boot too. The unit's first stop
removes both and reloads systemd, so that `systemctl restart` starts the unit as
written.

On systemd, `kupgrade launch NAME` starts the workload as a transient unit,
`kupgrade-NAME.service` (`systemd-run`, described as `kupgrade workload NAME`):
`systemctl` shows it, its output is in `journalctl -u kupgrade-NAME.service`,
and its cgroup is the unit's. With `--pid-namespace` the unit is
`Type=forking` and the namespace's init its main process. The new systemd
empties its directory of transient units when it starts, so the image carries
the unit's file (also for a declared unit that is transient), and
`kupgrade-init` writes it back as a runtime unit in `/run/systemd/system/`,
headed by a comment that says so: the unit then adopts the restored process as
above, can be stopped and started again, and is carried by the next upgrade
too. A later `kupgrade launch` of that name replaces it.

A service's notifications (`sd_notify`) need nothing carried: each is a datagram
sent on its own to `/run/systemd/notify`, which the new systemd has too. Sockets
systemd passed to a service (socket activation) are refused: PID 1 holds them
too, and the new systemd makes its sockets again at boot while the restored
service would hold the old one's address."#;

/// Writes everything into `dir`: `man/`, `completions/` and `cli.md`.
pub fn write(dir: &Path) -> Result<()> {
    let man_dir = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man_dir, &completions] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    for (name, page) in man_pages()? {
        let path = man_dir.join(name);
        fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    }
    for (name, shell) in [
        ("kupgrade", Shell::Bash),
        ("_kupgrade", Shell::Zsh),
        ("kupgrade.fish", Shell::Fish),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut completed(), "kupgrade", &mut out);
        let path = completions.join(name);
        fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let path = dir.join("cli.md");
    fs::write(&path, cli_markdown()).with_context(|| format!("cannot write {}", path.display()))
}

/// The command line without its hidden commands, which completions would
/// offer (clap_complete lists them all).
fn completed() -> clap::Command {
    let full = Cli::command();
    let visible: Vec<clap::Command> = full
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    clap::Command::new("kupgrade")
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(visible)
}

/// `(file name, roff)` of `kupgrade.8` and one page per command.
pub fn man_pages() -> Result<Vec<(String, Vec<u8>)>> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let version = env!("CARGO_PKG_VERSION");
    let man = |c: clap::Command| {
        Man::new(c)
            .section(SECTION)
            .source(format!("kupgrade {version}"))
            .manual("kupgrade manual")
    };
    let mut pages = Vec::new();
    let top = man(cmd.clone());
    let mut page = Vec::new();
    top.render_title(&mut page)?;
    top.render_name_section(&mut page)?;
    top.render_synopsis_section(&mut page)?;
    top.render_description_section(&mut page)?;
    top.render_options_section(&mut page)?;
    top.render_subcommands_section(&mut page)?;
    let mut extra = Roff::new();
    markdown_section(&mut extra, "BOOTING THE NEW KERNEL", BOOT);
    markdown_section(&mut extra, "SYSTEMD SERVICES", SYSTEMD);
    exit_status_section(&mut extra);
    markdown_section(&mut extra, "JSON OUTPUT", json::SCHEMA);
    files_section(&mut extra);
    extra.control("SH", ["SEE ALSO"]);
    let mut see_also: Vec<Inline> = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if !see_also.is_empty() {
            see_also.push(roman(", "));
        }
        see_also.push(bold(format!("kupgrade-{}", sub.get_name())));
        see_also.push(roman(format!("({SECTION})")));
    }
    see_also.push(roman(", criu(8), kexec(8), initramfs-tools(7), dracut(8)"));
    extra.text(see_also);
    page.extend(extra.to_roff().into_bytes());
    top.render_version_section(&mut page)?;
    pages.push((top.get_filename(), page));

    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let m = man(sub.clone());
        let mut page = Vec::new();
        m.render(&mut page)?;
        let mut more = Roff::new();
        more.control("SH", ["EXIT STATUS"]);
        more.text([
            roman("As for every command: see "),
            bold("EXIT STATUS"),
            roman(" in "),
            bold("kupgrade"),
            roman(format!("({SECTION})")),
            roman("."),
        ]);
        page.extend(more.to_roff().into_bytes());
        pages.push((m.get_filename(), page));
    }
    Ok(pages)
}

fn exit_status_section(r: &mut Roff) {
    r.control("SH", ["EXIT STATUS"]);
    for e in Exit::ALL {
        r.control("TP", []);
        r.text([bold(e.code().to_string())]);
        r.text(inline(e.meaning()));
    }
}

fn files_section(r: &mut Roff) {
    r.control("SH", ["FILES"]);
    let files = [
        ("/etc/kupgrade/config.toml", "the configuration (every key commented out at its default)"),
        ("/run/kupgrade/staged.json", "what is staged"),
        ("/var/lib/kupgrade/last-upgrade.json", "the record of the last upgrade, which report prints"),
        ("/usr/lib/kupgrade/kupgrade-init", "the restore, run as PID 1 on the new kernel"),
        ("/usr/share/initramfs-tools/hooks/kupgrade, /usr/share/initramfs-tools/scripts/init-bottom/kupgrade", "the initramfs-tools hook and boot script"),
        ("/usr/lib/dracut/modules.d/90kupgrade", "the dracut module"),
        ("/run/kupgrade/journal/", "each journal relay's record of its stream, read by the next upgrade"),
        ("/run/systemd/system/UNIT.d/zz-kupgrade-adopt.conf, /run/kupgrade/adopt/UNIT.pid", "the drop-in and PID file with which a preserved unit adopts its restored process"),
        ("/run/systemd/system/UNIT", "a transient unit's file, written back after the upgrade"),
        ("/etc/kernel/postinst.d/zz-kupgrade", "stages a newly installed kernel when stage_new_kernels = true; logs to /var/log/kupgrade/kernel-hook.log"),
    ];
    for (path, what) in files {
        r.control("TP", []);
        r.text([bold(path)]);
        r.text([roman(what)]);
    }
}

/// The small Markdown of [`BOOT`] and [`json::SCHEMA`] as roff: paragraphs,
/// `- ` lists, fenced examples, `code` in bold.
fn markdown_section(r: &mut Roff, title: &str, text: &str) {
    r.control("SH", [title]);
    let mut in_code = false;
    let mut para: Vec<String> = Vec::new();
    let flush = |r: &mut Roff, para: &mut Vec<String>| {
        if para.is_empty() {
            return;
        }
        let joined = para.join(" ");
        if let Some(item) = joined.strip_prefix("- ") {
            r.control("IP", ["\\(bu", "2"]);
            r.text(inline(item));
        } else {
            r.control("PP", []);
            r.text(inline(&joined));
        }
        para.clear();
    };
    for line in text.lines() {
        if line.starts_with("```") {
            if in_code {
                r.control("fi", []);
                r.control("RE", []);
            } else {
                flush(r, &mut para);
                r.control("RS", ["4"]);
                r.control("nf", []);
            }
            in_code = !in_code;
        } else if in_code {
            r.text([roman(line)]);
        } else if line.trim().is_empty() {
            flush(r, &mut para);
        } else if line.starts_with("- ") {
            flush(r, &mut para);
            para.push(line.to_string());
        } else {
            para.push(line.trim().to_string());
        }
    }
    flush(r, &mut para);
}

/// `code` spans in bold, the rest roman.
fn inline(text: &str) -> Vec<Inline> {
    text.split('`')
        .enumerate()
        .filter(|(_, s)| !s.is_empty())
        .map(|(i, s)| if i % 2 == 1 { bold(s) } else { roman(s) })
        .collect()
}

/// `docs/cli.md`.
pub fn cli_markdown() -> String {
    format!(
        "# kupgrade's command line: booting, exit codes, JSON\n\n\
         <!-- Made by `kupgrade __docs DIR` from the program (src/docs.rs, src/exit.rs,\n\
         src/json.rs); the man page kupgrade(8) says the same. Do not edit by hand. -->\n\n\
         ## Booting the new kernel\n\n{BOOT}\n\n\
         ## systemd services\n\n{SYSTEMD}\n\n\
         ## Exit status\n\n{}\n\
         ## JSON output\n\n{}",
        Exit::markdown_table(),
        json::SCHEMA
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_docs_are_what_the_program_says() {
        let committed = include_str!("../../docs/cli.md");
        assert!(
            committed == cli_markdown(),
            "docs/cli.md is stale: run `cargo run -p kupgrade-agent --bin kupgrade -- __docs target/docs && cp target/docs/cli.md docs/`"
        );
    }

    #[test]
    fn every_command_has_a_page_and_the_main_page_every_exit_code() {
        let pages = man_pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for n in [
            "kupgrade.8",
            "kupgrade-check.8",
            "kupgrade-stage.8",
            "kupgrade-go.8",
            "kupgrade-report.8",
            "kupgrade-image.8",
        ] {
            assert!(names.contains(&n), "{names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("__")), "{names:?}");
        let top = String::from_utf8(pages[0].1.clone()).unwrap();
        assert!(top.contains(".SH \"EXIT STATUS\""), "{top}");
        for e in Exit::ALL {
            assert!(top.contains(&format!(".TP\n\\fB{}\\fR", e.code())), "{e:?}");
        }
        assert!(top.contains(".SH \"JSON OUTPUT\""));
        assert!(top.contains("image_estimate_bytes"));
        assert!(top.contains("\\-\\-own\\-initramfs"), "the stage options");
    }

    #[test]
    fn completions_name_the_commands_but_not_the_hidden_ones() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut completed(), "kupgrade", &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.contains("stage") && text.contains("own-initramfs"),
                "{shell}"
            );
            assert!(!text.contains("__docs"), "{shell}");
        }
    }
}
