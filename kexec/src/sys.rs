//! Kernel ABI, as data only: the x86 boot protocol's `struct setup_header`
//! (Documentation/arch/x86/boot.rst), its flag values, and the numbers that
//! `kexec_file_load(2)` and `reboot(2)` take. No logic lives here.
//!
//! ```text
//! bzImage offset  field              what kupgrade checks
//! 0x1f1           setup_sects        where the protected-mode kernel starts
//! 0x1f4           syssize            its length, in 16-byte paragraphs
//! 0x1fe           boot_flag          0xAA55
//! 0x202           header             "HdrS"
//! 0x206           version            boot protocol, >= 2.12
//! 0x20e           kernel_version     version string at 0x200 + this
//! 0x211           loadflags          LOADED_HIGH
//! 0x234           relocatable_kernel non-zero
//! 0x236           xloadflags         XLF_KERNEL_64, XLF_CAN_BE_LOADED_ABOVE_4G
//! 0x238           cmdline_size       longest command line, without its NUL
//! 0x260           init_size          memory the kernel needs to boot
//! 0x26c           end of the header (protocol 2.15)
//! ```

use std::mem::{offset_of, size_of};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

/// Where [`SetupHeader`] starts in a bzImage.
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Where [`SetupHeader`] ends: the file must hold at least this much.
pub const SETUP_HEADER_END: usize = SETUP_HEADER_OFFSET + size_of::<SetupHeader>();
/// `kernel_version` and the real-mode pointers count from here.
pub const REAL_MODE_BASE: usize = 0x200;
/// A sector of the real-mode setup code.
pub const SECTOR_SIZE: usize = 512;
/// `setup_sects == 0` means 4, for compatibility with ancient kernels.
pub const DEFAULT_SETUP_SECTS: u8 = 4;

/// `boot_flag`: the legacy boot sector signature.
pub const BOOT_FLAG: u16 = 0xaa55;
/// `header`: the bytes "HdrS", read as a little-endian u32.
pub const HDRS_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
/// The first boot protocol with `xloadflags`, which a 64-bit kexec needs
/// (and the oldest the kernel's bzImage64 loader takes).
pub const MIN_PROTOCOL: u16 = 0x020c;

/// `loadflags`: the protected-mode code loads at 0x100000 (a bzImage, not
/// a zImage).
pub const LOADED_HIGH: u8 = 1 << 0;
/// `loadflags`: the kernel may not reload segment registers at entry.
pub const KEEP_SEGMENTS: u8 = 1 << 6;
/// `loadflags`: the heap end pointer is valid.
pub const CAN_USE_HEAP: u8 = 1 << 7;

/// `xloadflags`: a 64-bit entry point at `0x200` past the load address.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `xloadflags`: kernel, boot_params, command line and initrd may sit above 4 GiB.
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// `xloadflags`: a 32-bit EFI handover entry point.
pub const XLF_EFI_HANDOVER_32: u16 = 1 << 2;
/// `xloadflags`: a 64-bit EFI handover entry point.
pub const XLF_EFI_HANDOVER_64: u16 = 1 << 3;
/// `xloadflags`: the kernel supports kexec to an EFI runtime.
pub const XLF_EFI_KEXEC: u16 = 1 << 4;
/// `xloadflags`: the kernel can boot with 5-level paging enabled.
pub const XLF_5LEVEL: u16 = 1 << 5;
/// `xloadflags`: the kernel can boot with 5-level paging, if the CPU has it.
pub const XLF_5LEVEL_ENABLED: u16 = 1 << 6;

/// The x86 `struct setup_header`, as found at [`SETUP_HEADER_OFFSET`] of a
/// bzImage (boot protocol 2.15 layout; older kernels leave the tail zero).
#[derive(FromBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub struct SetupHeader {
    pub setup_sects: u8,
    pub root_flags: U16,
    pub syssize: U32,
    pub ram_size: U16,
    pub vid_mode: U16,
    pub root_dev: U16,
    pub boot_flag: U16,
    pub jump: U16,
    pub header: U32,
    pub version: U16,
    pub realmode_swtch: U32,
    pub start_sys_seg: U16,
    pub kernel_version: U16,
    pub type_of_loader: u8,
    pub loadflags: u8,
    pub setup_move_size: U16,
    pub code32_start: U32,
    pub ramdisk_image: U32,
    pub ramdisk_size: U32,
    pub bootsect_kludge: U32,
    pub heap_end_ptr: U16,
    pub ext_loader_ver: u8,
    pub ext_loader_type: u8,
    pub cmd_line_ptr: U32,
    pub initrd_addr_max: U32,
    pub kernel_alignment: U32,
    pub relocatable_kernel: u8,
    pub min_alignment: u8,
    pub xloadflags: U16,
    pub cmdline_size: U32,
    pub hardware_subarch: U32,
    pub hardware_subarch_data: U64,
    pub payload_offset: U32,
    pub payload_length: U32,
    pub setup_data: U64,
    pub pref_address: U64,
    pub init_size: U32,
    pub handover_offset: U32,
    pub kernel_info_offset: U32,
}

// The struct must match the offsets that boot.rst gives.
const _: () = {
    assert!(SETUP_HEADER_OFFSET + offset_of!(SetupHeader, syssize) == 0x1f4);
    assert!(SETUP_HEADER_OFFSET + offset_of!(SetupHeader, boot_flag) == 0x1fe);
    assert!(SETUP_HEADER_OFFSET + offset_of!(SetupHeader, header) == 0x202);
    assert!(SETUP_HEADER_OFFSET + offset_of!(SetupHeader, version) == 0x206);
    assert!(SETUP_HEADER_OFFSET + offset_of!(SetupHeader, kernel_version) == 0x20e);
    assert!(SETUP_HEADER_OFFSET + offset_of!(SetupHeader, loadflags) == 0x211);
    assert!(SETUP_HEADER_OFFSET + offset_of!(SetupHeader, relocatable_kernel) == 0x234);
    assert!(SETUP_HEADER_OFFSET + offset_of!(SetupHeader, xloadflags) == 0x236);
    assert!(SETUP_HEADER_OFFSET + offset_of!(SetupHeader, cmdline_size) == 0x238);
    assert!(SETUP_HEADER_OFFSET + offset_of!(SetupHeader, init_size) == 0x260);
    assert!(SETUP_HEADER_END == 0x26c);
};

/// `kexec_file_load(int kernel_fd, int initrd_fd, unsigned long cmdline_len,
/// const char *cmdline, unsigned long flags)`.
pub const SYS_KEXEC_FILE_LOAD: libc::c_long = libc::SYS_kexec_file_load;

/// `flags`: unload the loaded kernel; the other arguments are ignored.
pub const KEXEC_FILE_UNLOAD: libc::c_ulong = 0x1;
/// `flags`: load the crash (kdump) kernel rather than the reboot kernel.
pub const KEXEC_FILE_ON_CRASH: libc::c_ulong = 0x2;
/// `flags`: there is no initramfs; `initrd_fd` is ignored.
pub const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 0x4;
/// `flags`: log the load's details to the kernel log (Linux 6.8+; older
/// kernels refuse the flag with EINVAL).
pub const KEXEC_FILE_DEBUG: libc::c_ulong = 0x8;

/// The x86-64 loader reserves this much of `cmdline_size` on every load, to
/// append `elfcorehdr=0x<address> ` for a crash kernel (`MAX_ELFCOREHDR_STR_LEN`
/// in arch/x86/kernel/kexec-bzimage64.c), and refuses with EINVAL a command
/// line that leaves less.
pub const ELFCOREHDR_RESERVE: usize = 30;

/// `reboot(2)`: jump to the kernel loaded with kexec.
pub const LINUX_REBOOT_CMD_KEXEC: libc::c_int = 0x4558_4543;
const _: () = assert!(LINUX_REBOOT_CMD_KEXEC == libc::LINUX_REBOOT_CMD_KEXEC);

/// Where the kernel says whether a kexec kernel is loaded ("0" or "1").
pub const KEXEC_LOADED_PATH: &str = "/sys/kernel/kexec_loaded";
/// The kernel lockdown mode, e.g. "none [integrity] confidentiality".
pub const LOCKDOWN_PATH: &str = "/sys/kernel/security/lockdown";
/// "1" once kexec has been disabled until the next boot.
pub const KEXEC_LOAD_DISABLED_PATH: &str = "/proc/sys/kernel/kexec_load_disabled";
/// How many more kexec_load/kexec_file_load calls (load or unload) the
/// kernel allows for a reboot kernel; -1 for no limit. Linux 6.7 and later.
pub const KEXEC_LOAD_LIMIT_PATH: &str = "/proc/sys/kernel/kexec_load_limit_reboot";
