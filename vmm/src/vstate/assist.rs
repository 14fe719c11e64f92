//! Emulation assists for hosts whose KVM emulates guest ring 0 (nested PVM,
//! see shared/HOST.md and docs/linux.md).
//!
//! That emulator refuses a few instructions with KVM_EXIT_INTERNAL_ERROR
//! (suberror 1, emulation failure) and reports the instruction bytes. Two of
//! them are needed by Linux and have a simple exact meaning the VMM can
//! complete by itself:
//!
//! - `int3` (0xcc): advance RIP past it and inject #BP (vector 3) with
//!   KVM_SET_VCPU_EVENTS, as the CPU would (the pushed RIP is the next
//!   instruction, like for a software exception).
//! - `fwait` (0x9b): no pending unmasked x87 exception exists in the guests
//!   that need this (Linux runs with x87 exceptions masked), so it is a no-op:
//!   advance RIP by 1.
//!
//! Anything else stays a crash report. Assists are only switched on where
//! the host needs them (`--emulation-assists auto`, the default, asks
//! [`super::probe`]); on hardware KVM these instructions never exit.

use std::sync::atomic::{AtomicU64, Ordering};

use kvm_ioctls::VcpuFd;

/// `--emulation-assists`: when to complete the instructions the host's
/// ring-0 emulator refuses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AssistMode {
    /// On when the host probe finds an emulated ring 0, off otherwise.
    #[default]
    Auto,
    /// Always on.
    On,
    /// Always off (a refused instruction is a guest crash, status 71).
    Off,
}

impl AssistMode {
    /// Whether assists are active for this mode on this host. `auto` runs
    /// the host probe (once per process); if the probe fails, assists stay
    /// off and the reason is logged.
    pub fn resolve(self) -> bool {
        match self {
            AssistMode::On => true,
            AssistMode::Off => false,
            AssistMode::Auto => match super::probe::host_class() {
                Ok(c) => c == super::probe::HostClass::EmulatedRing0,
                Err(e) => {
                    log::warn!("host probe failed ({e}); emulation assists off");
                    false
                }
            },
        }
    }
}

/// Which instruction an assist completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssistKind {
    /// `int3`: RIP + 1 and #BP injected.
    Int3,
    /// `fwait`: skipped.
    Fwait,
}

/// Whether assists are active, and how often each one was used.
#[derive(Debug, Default)]
pub struct Assists {
    enabled: bool,
    int3: AtomicU64,
    fwait: AtomicU64,
}

/// Counters reported by `GET /vm`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AssistCounts {
    /// Whether assists are active for this VM.
    pub enabled: bool,
    /// `int3` completed (#BP injected).
    pub int3: u64,
    /// `fwait` skipped.
    pub fwait: u64,
}

const EMULATION_FAILURE: u32 = 1;
const INSN_BYTES_PRESENT: u64 = 1;
const BP_VECTOR: u8 = 3;

/// Errors completing an instruction.
#[derive(Debug, thiserror::Error)]
#[error("emulation assist for {kind:?}: KVM {what} failed: {err}")]
pub struct AssistError {
    kind: AssistKind,
    what: &'static str,
    err: kvm_ioctls::Error,
}

/// The instruction bytes of an emulation-failure internal error, if KVM
/// reported them (`data[0]` flags, then a length byte and the bytes).
pub fn failed_instruction(suberror: u32, data: &[u64]) -> Option<Vec<u8>> {
    if suberror != EMULATION_FAILURE || data.first()? & INSN_BYTES_PRESENT == 0 {
        return None;
    }
    let bytes: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
    let (&len, rest) = bytes.split_first()?;
    Some(rest[..(len as usize).min(rest.len())].to_vec())
}

/// The assist for these instruction bytes, if there is one.
pub fn classify(insn: &[u8]) -> Option<AssistKind> {
    match insn.first()? {
        0xcc => Some(AssistKind::Int3),
        0x9b => Some(AssistKind::Fwait),
        _ => None,
    }
}

impl Assists {
    /// Assists on or off.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Default::default()
        }
    }

    /// Whether assists are active.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The counters.
    pub fn counts(&self) -> AssistCounts {
        AssistCounts {
            enabled: self.enabled,
            int3: self.int3.load(Ordering::Relaxed),
            fwait: self.fwait.load(Ordering::Relaxed),
        }
    }

    /// Complete the failed instruction `insn` on `vcpu` if assists are on
    /// and it is one they handle. `Ok(None)`: not handled (a crash).
    pub fn complete(&self, vcpu: &VcpuFd, insn: &[u8]) -> Result<Option<AssistKind>, AssistError> {
        if !self.enabled {
            return Ok(None);
        }
        let Some(kind) = classify(insn) else {
            return Ok(None);
        };
        let err = |what| move |err| AssistError { kind, what, err };
        let mut regs = vcpu.get_regs().map_err(err("get registers"))?;
        regs.rip = regs.rip.wrapping_add(1);
        vcpu.set_regs(&regs).map_err(err("set registers"))?;
        match kind {
            AssistKind::Int3 => {
                let mut ev = vcpu.get_vcpu_events().map_err(err("get vCPU events"))?;
                ev.exception.injected = 1;
                ev.exception.nr = BP_VECTOR;
                ev.exception.has_error_code = 0;
                ev.exception.error_code = 0;
                ev.exception.pending = 0;
                // Leave NMI, SIPI, SMM and the other optional state alone.
                ev.flags = 0;
                vcpu.set_vcpu_events(&ev).map_err(err("set vCPU events"))?;
                self.int3.fetch_add(1, Ordering::Relaxed);
            }
            AssistKind::Fwait => {
                self.fwait.fetch_add(1, Ordering::Relaxed);
            }
        }
        log::debug!("emulation assist: {kind:?} at rip {:#x}", regs.rip - 1);
        Ok(Some(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_instruction_bytes() {
        // What KVM reported for Linux's int3 self-test here.
        let data = [1, 0x7c83_9090_9090_cc0f, 0x480b_0f02_7401_0424, 0x1000];
        let insn = failed_instruction(1, &data).unwrap();
        assert_eq!(insn.len(), 15);
        assert_eq!(&insn[..3], &[0xcc, 0x90, 0x90]);
        assert_eq!(classify(&insn), Some(AssistKind::Int3));
        assert_eq!(classify(&[0x9b, 0xdb, 0xe2]), Some(AssistKind::Fwait));
        assert_eq!(classify(&[0xf0, 0x48, 0x0f, 0xc7]), None);
        assert_eq!(classify(&[]), None);
        assert_eq!(failed_instruction(2, &data), None);
        assert_eq!(failed_instruction(1, &[0, 0xcc01]), None);
        assert_eq!(failed_instruction(1, &[1]), None);
    }
}
