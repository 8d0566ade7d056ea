#!/bin/sh
# kupgrade: on the boot that `kupgrade go` kexecs into, load the modules of
# the restore and have the switch to $NEWROOT execute kupgrade-init as the
# init (it restores, then executes the real init). Sourced by dracut.

type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh

if getarg kupgrade.resume > /dev/null; then
    while read -r _kupgrade_line; do
        case "$_kupgrade_line" in
            modules=*)
                for _kupgrade_m in ${_kupgrade_line#modules=}; do
                    modprobe -q "$_kupgrade_m" || warn "kupgrade: module $_kupgrade_m did not load"
                done
                ;;
        esac
    done < /usr/lib/kupgrade/initramfs-hook
    unset _kupgrade_line _kupgrade_m
    if [ -x "$NEWROOT/usr/lib/kupgrade/kupgrade-init" ]; then
        # Notice level: on the console unless quiet, in the kernel log always.
        echo "<5>kupgrade: handing over to /usr/lib/kupgrade/kupgrade-init for the restore" > /dev/kmsg
        if [ -n "$DRACUT_SYSTEMD" ]; then
            # Read by kupgrade-switch-root (initrd-switch-root.service).
            echo /usr/lib/kupgrade/kupgrade-init > /etc/kupgrade-switch-root
        else
            # init.sh takes real_init= first, through getarg, which also
            # reads /etc/cmdline.d.
            mkdir -p /etc/cmdline.d
            echo "real_init=/usr/lib/kupgrade/kupgrade-init" > /etc/cmdline.d/99-kupgrade.conf
        fi
    else
        warn "kupgrade: /usr/lib/kupgrade/kupgrade-init is not on the root file system: booting without restoring the workloads"
    fi
fi
