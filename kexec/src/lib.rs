//! kexec: load a kernel with `kexec_file_load`, unload it, reboot into it,
//! and validate a bzImage before asking the kernel to load it.
