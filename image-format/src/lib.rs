//! The kupgrade snapshot image and the types that both sides of a kexec
//! (the agent on the old kernel, `kupgrade-init` on the new one) agree on.

pub mod cmdline;
pub mod devstate;
pub mod events;
