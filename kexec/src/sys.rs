//! Kernel ABI: the x86 boot protocol's `setup_header` and the kexec and
//! reboot constants (Documentation/arch/x86/boot.rst, include/uapi/linux/kexec.h).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

/// Offset of [`SetupHeader`] in a bzImage.
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// `boot_flag`: the boot sector signature.
pub const BOOT_FLAG: u16 = 0xaa55;
/// `header`: "HdrS".
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// `loadflags`: protected-mode code is loaded at 0x100000.
pub const LOADED_HIGH: u8 = 1 << 0;
/// `xloadflags`: the kernel has a 64-bit entry point at 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// `xloadflags`: the kernel, boot_params, cmdline and ramdisk can be above 4 GiB.
pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// The first protocol with `xloadflags`, which a 64-bit kexec needs.
pub const MIN_PROTOCOL: u16 = 0x020c;

pub const KEXEC_FILE_UNLOAD: libc::c_ulong = 0x1;
pub const KEXEC_FILE_ON_CRASH: libc::c_ulong = 0x2;
pub const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 0x4;

/// The x86 `struct setup_header`, as found at 0x1f1 of a bzImage.
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

/// Offsets inside the header, to patch fixtures in tests.
pub const VERSION_OFFSET: usize = 0x206;
pub const XLOADFLAGS_OFFSET: usize = 0x236;
pub const RELOCATABLE_OFFSET: usize = 0x234;

const _: () = assert!(SETUP_HEADER_OFFSET + std::mem::size_of::<SetupHeader>() == 0x26c);
