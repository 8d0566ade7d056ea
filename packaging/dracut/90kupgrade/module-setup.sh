#!/bin/bash
# kupgrade's dracut module: on the boot that `kupgrade go` kexecs into
# (kupgrade.resume on the command line), the pre-pivot hook loads the
# modules of the restore and has the switch to the real root execute
# kupgrade-init, on that root, as the init: it restores the workloads as
# PID 1 in the final root, then executes the real init. With systemd in the
# initramfs the switch is initrd-switch-root.service's: a drop-in runs it
# through kupgrade-switch-root, which names kupgrade-init when the hook
# asked for it (systemd would SIGTERM anything restored before the switch).

kupgrade_init=/usr/lib/kupgrade/kupgrade-init

# The restore's modules and the drivers of this machine's interfaces.
kupgrade_modules() {
    local driver
    "$kupgrade_init" --restore-modules || return 1
    for driver in /sys/class/net/*/device/driver/module; do
        [[ -e $driver ]] || continue
        basename "$(readlink -f "$driver")"
    done
    return 0
}

check() {
    [[ -x $kupgrade_init ]] || return 1
    return 0
}

depends() {
    return 0
}

installkernel() {
    local modules
    modules=$(kupgrade_modules) || return 0
    # Not only the modules loaded now: the store's appear after the kexec.
    # shellcheck disable=SC2086
    hostonly='' instmods $modules
}

install() {
    local modules
    modules=$(kupgrade_modules) || return 0
    inst_hook pre-pivot 90 "$moddir/kupgrade-pre-pivot.sh"
    inst_multiple modprobe
    if dracut_module_included "systemd"; then
        inst_simple "$moddir/kupgrade-switch-root" /usr/lib/kupgrade/kupgrade-switch-root
        inst_simple "$moddir/initrd-switch-root.conf" \
            "$systemdsystemunitdir/initrd-switch-root.service.d/kupgrade.conf"
    fi
    mkdir -p "$initdir/usr/lib/kupgrade"
    {
        echo "# kupgrade's initramfs hook was here; kupgrade stage looks for this file."
        echo "generator=dracut"
        echo "version=$("$kupgrade_init" --version)"
        # One line, names apart by single spaces.
        # shellcheck disable=SC2086
        printf 'modules=%s\n' "$(printf '%s ' $modules)"
    } > "$initdir/usr/lib/kupgrade/initramfs-hook"
}
