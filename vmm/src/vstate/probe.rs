//! Host detection: does this host's KVM run guest ring 0 at hardware speed,
//! or does it emulate it (nested PVM, see shared/HOST.md)?
//!
//! A tiny probe VM (one vCPU, one 64 KiB memslot, no irqchip) runs a
//! counted loop in real mode (CPL 0) and ends with `hlt`, which exits to
//! user space because there is no in-kernel LAPIC. The wall time of the
//! KVM_RUN calls gives ring-0 iterations per second: hardware KVM runs
//! hundreds of millions, an emulated ring 0 about one million (~1.7 M
//! instructions/s). The result is computed once per process
//! ([`host_class`]) and used by `vmm host-info`, by
//! `--emulation-assists auto` and by the tests.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, Kvm, VcpuExit};

/// Ring-0 loop iterations per second above which ring 0 counts as
/// hardware speed. Emulated: ~0.85 M/s here; hardware: > 100 M/s.
pub const HARDWARE_THRESHOLD: f64 = 20e6;
/// Iterations of the first (short) probe run.
const SHORT_ITERATIONS: u32 = 20_000;
/// Iterations of the second run on a fast host (a better estimate).
const LONG_ITERATIONS: u32 = 20_000_000;
const CODE_GPA: u64 = 0x1000;
const MEM_SIZE: usize = 0x10000;

/// How this host's KVM runs guest ring 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostClass {
    /// Guest ring 0 runs natively (hardware-assisted KVM).
    HardwareRing0,
    /// Guest ring 0 is emulated instruction by instruction (e.g. nested PVM):
    /// slow, with emulator gaps that need the VMM's emulation assists.
    EmulatedRing0,
}

/// The probe's measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProbeResult {
    /// The classification.
    pub class: HostClass,
    /// Ring-0 loop iterations per second (best run).
    pub ring0_iterations_per_s: f64,
    /// Iterations of the measured run.
    pub iterations: u32,
    /// Wall time of the measured run in nanoseconds.
    pub elapsed_ns: u64,
}

/// Errors of the probe VM.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// KVM could not be opened.
    #[error(transparent)]
    Kvm(#[from] super::vm::VmError),
    /// A KVM ioctl failed.
    #[error("probe VM: KVM {what} failed: {err}")]
    Ioctl {
        /// Which operation.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// Host memory for the probe could not be mapped.
    #[error("probe VM: cannot map guest memory: {0}")]
    Mmap(std::io::Error),
    /// The probe loop ended in something other than `hlt`.
    #[error("probe VM: unexpected exit {0}")]
    Exit(String),
}

fn io(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ProbeError {
    move |err| ProbeError::Ioctl { what, err }
}

/// The probe code (16-bit real mode at CS:IP = 0:0x1000):
/// `mov ecx, N; 1: dec ecx; jnz 1b; hlt`.
fn probe_code(iterations: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xb9];
    c.extend_from_slice(&iterations.to_le_bytes());
    c.extend_from_slice(&[0x66, 0x49, 0x75, 0xfc, 0xf4]);
    c
}

struct GuestPage(*mut libc::c_void);

impl Drop for GuestPage {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by mmap with MEM_SIZE bytes and the
        // VM that used it is dropped before this (declared after it).
        unsafe { libc::munmap(self.0, MEM_SIZE) };
    }
}

/// Run the loop with `iterations` once; returns the wall time of KVM_RUN.
fn run_loop(kvm: &Kvm, iterations: u32) -> Result<Duration, ProbeError> {
    // SAFETY: anonymous private mapping, checked for failure below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(ProbeError::Mmap(std::io::Error::last_os_error()));
    }
    let page = GuestPage(addr);
    let code = probe_code(iterations);
    // SAFETY: the mapping is MEM_SIZE bytes; the code fits at CODE_GPA.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            page.0.cast::<u8>().add(CODE_GPA as usize),
            code.len(),
        )
    };
    let vm = kvm.create_vm().map_err(io("create VM"))?;
    // Intel without unrestricted guest runs real mode through vm86 and needs it.
    vm.set_tss_address(0xfffb_d000)
        .map_err(io("set TSS address"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: page.0 as u64,
        flags: 0,
    };
    // SAFETY: `page` outlives `vm` (dropped after it: declared before).
    unsafe { vm.set_user_memory_region(region) }.map_err(io("set memory slot"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(io("create vCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(io("get sregs"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(io("set sregs"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: CODE_GPA,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(io("set regs"))?;
    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(other) => return Err(ProbeError::Exit(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(io("run")(e)),
        }
    }
    let t = start.elapsed();
    drop(vcpu);
    drop(vm);
    drop(page);
    Ok(t)
}

/// Short-loop runs before a host is called emulated: a run on a loaded
/// hardware host can be preempted for milliseconds (20 us of work), so one
/// slow run proves nothing; the fastest of these counts.
const SHORT_RUNS: u32 = 3;

/// Run the probe: a short loop (the fastest of up to [`SHORT_RUNS`]), and
/// on a fast host a longer one for a better number. Takes ~40 ms on an
/// emulated-ring-0 host.
pub fn probe(kvm: &Kvm) -> Result<ProbeResult, ProbeError> {
    let rate = |n: u32, t: Duration| f64::from(n) / t.as_secs_f64().max(1e-9);
    let mut n = SHORT_ITERATIONS;
    let mut t = run_loop(kvm, n)?;
    for _ in 1..SHORT_RUNS {
        if rate(n, t) >= HARDWARE_THRESHOLD {
            break;
        }
        t = t.min(run_loop(kvm, n)?);
    }
    if rate(n, t) >= HARDWARE_THRESHOLD {
        n = LONG_ITERATIONS;
        t = run_loop(kvm, n)?;
    }
    let r = rate(n, t);
    Ok(ProbeResult {
        class: if r >= HARDWARE_THRESHOLD {
            HostClass::HardwareRing0
        } else {
            HostClass::EmulatedRing0
        },
        ring0_iterations_per_s: r.round(),
        iterations: n,
        elapsed_ns: t.as_nanos() as u64,
    })
}

/// The probe result for this host, measured once per process.
pub fn host_probe() -> Result<ProbeResult, String> {
    static RESULT: OnceLock<Result<ProbeResult, String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            let kvm = super::vm::open_kvm().map_err(|e| e.to_string())?;
            probe(&kvm).map_err(|e| e.to_string())
        })
        .clone()
}

/// The host class (measured once per process).
pub fn host_class() -> Result<HostClass, String> {
    host_probe().map(|r| r.class)
}

/// `vmm host-info`: the probe plus the KVM capabilities the VMM cares about.
pub fn host_info() -> Result<serde_json::Value, String> {
    let kvm = super::vm::open_kvm().map_err(|e| e.to_string())?;
    let p = host_probe()?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM get supported CPUID failed: {e}"))?;
    let vendor = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map(|e| {
            let mut b = Vec::new();
            for r in [e.ebx, e.edx, e.ecx] {
                b.extend_from_slice(&r.to_le_bytes());
            }
            String::from_utf8_lossy(&b).into_owned()
        })
        .unwrap_or_default();
    let caps: serde_json::Map<String, serde_json::Value> = [
        ("irqchip", Cap::Irqchip),
        ("pit2", Cap::Pit2),
        ("irqfd", Cap::Irqfd),
        ("ioeventfd", Cap::Ioeventfd),
        ("mce", Cap::Mce),
        ("readonly_mem", Cap::ReadonlyMem),
        ("immediate_exit", Cap::ImmediateExit),
    ]
    .into_iter()
    .map(|(n, c)| (n.to_string(), kvm.check_extension(c).into()))
    .collect();
    let mcg_cap = super::mce::guest_mcg_cap(&kvm);
    Ok(serde_json::json!({
        "class": p.class,
        "ring0_iterations_per_s": p.ring0_iterations_per_s,
        "probe_iterations": p.iterations,
        "probe_elapsed_ns": p.elapsed_ns,
        "hardware_threshold_iterations_per_s": HARDWARE_THRESHOLD,
        "emulation_assists_auto": p.class == HostClass::EmulatedRing0,
        "kvm": {
            "api_version": kvm.get_api_version(),
            "nr_vcpus": kvm.get_nr_vcpus(),
            "max_vcpus": kvm.get_max_vcpus(),
            "nr_memslots": kvm.get_nr_memslots(),
            "cpu_vendor": vendor,
            "guest_mcg_cap": mcg_cap.map(|c| format!("{c:#x}")),
            "caps": caps,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_encodes_the_loop() {
        let c = probe_code(0x1234);
        assert_eq!(
            c,
            [0x66, 0xb9, 0x34, 0x12, 0, 0, 0x66, 0x49, 0x75, 0xfc, 0xf4]
        );
    }
}
