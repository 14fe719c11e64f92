//! KVM state: the VM and its vCPUs. All KVM ioctls of the VMM live here
//! (besides the boot register setup in `boot::regs`).

pub mod assist;
pub mod control;
pub mod mce;
pub mod probe;
pub mod vcpu;
pub mod vm;
