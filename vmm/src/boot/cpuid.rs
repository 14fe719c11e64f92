//! Per-vCPU CPUID: KVM's supported CPUID with topology and APIC ids fixed so
//! the guest sees `vcpus` single-thread cores in one package.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `n` ids.
fn id_bits(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

/// Adjust `cpuid` (KVM_GET_SUPPORTED_CPUID) for vCPU `index` of `count`.
pub fn fix_for_vcpu(cpuid: &mut CpuId, index: u32, count: u32) {
    let apic_id = index;
    let core_bits = id_bits(count);
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count.min(255)) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // Cores per package - 1 in EAX[31:26]; one thread shares each cache.
                e.eax = (e.eax & 0x03ff_ffff & !(0xfff << 14)) | ((count - 1).min(63) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level: `count` cores in the package.
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            LEAF_AMD_SIZES => {
                e.ecx = (e.ecx & !0xf0ff) | (count - 1) | (core_bits << 12);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = apic_id;
                e.ebx = index & 0xff; // core id, one thread per core
                e.ecx = 0; // node 0
            }
            _ => {}
        }
    }
}

const LEAF_EXT_MAX: u32 = 0x8000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_RAS: u32 = 0x8000_0007;
const LEAF_STRUCTURED: u32 = 0x7;
/// CPUID 0x80000007 EBX: McaOverflowRecov (bit 0) and SUCCOR (bit 1).
const EBX_MCA_OVERFLOW_RECOV_SUCCOR: u32 = 0b11;

/// For AMD-vendor guests, advertise MCA overflow recovery and SUCCOR
/// (CPUID 0x80000007 EBX bits 0-1): without SUCCOR Linux's AMD severity
/// grading panics on every uncorrected error ("Uncorrected error without
/// MCA Recovery"), including the recoverable ones the VMM injects for
/// poisoned guest memory. KVM reports EBX 0 here. No-op for other vendors.
pub fn set_mca_recovery(cpuid: &mut CpuId) {
    let Some(v) = cpuid.as_slice().iter().find(|e| e.function == 0) else {
        return;
    };
    if crate::vstate::mce::vendor_of(v.ebx, v.edx, v.ecx) != crate::vstate::mce::McaVendor::Amd {
        return;
    }
    let ext_max = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_EXT_MAX)
        .map_or(0, |e| e.eax);
    if let Some(e) = cpuid
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == LEAF_RAS)
    {
        e.ebx |= EBX_MCA_OVERFLOW_RECOV_SUCCOR;
    } else if ext_max >= LEAF_RAS {
        let _ = cpuid.push(kvm_bindings::kvm_cpuid_entry2 {
            function: LEAF_RAS,
            ebx: EBX_MCA_OVERFLOW_RECOV_SUCCOR,
            ..Default::default()
        });
    }
}

/// Features hidden from guests on hosts that emulate guest ring 0 (with
/// emulation assists on): instructions the host's ring-0 emulator cannot
/// execute (`cmpxchg16b`, `xsave`/`xrstor`, ...) or that a guest kernel
/// would patch in (alternatives) and then run in ring 0. The list is
/// shared/HOST.md's (what Linux's `clearcpuid=` needs on that host) plus
/// what depends on XSAVE/AVX. (leaf, subleaf, register, bit, name).
pub const HIDDEN_ON_EMULATED_RING0: &[(u32, u32, Reg, u32, &str)] = &[
    (1, 0, Reg::Ecx, 1, "pclmulqdq"),
    (1, 0, Reg::Ecx, 9, "ssse3"),
    (1, 0, Reg::Ecx, 12, "fma"),
    (1, 0, Reg::Ecx, 13, "cx16"),
    (1, 0, Reg::Ecx, 19, "sse4_1"),
    (1, 0, Reg::Ecx, 20, "sse4_2"),
    (1, 0, Reg::Ecx, 22, "movbe"),
    (1, 0, Reg::Ecx, 23, "popcnt"),
    (1, 0, Reg::Ecx, 25, "aes"),
    (1, 0, Reg::Ecx, 26, "xsave"),
    (1, 0, Reg::Ecx, 27, "osxsave"),
    (1, 0, Reg::Ecx, 28, "avx"),
    (1, 0, Reg::Ecx, 29, "f16c"),
    (1, 0, Reg::Ecx, 30, "rdrand"),
    (7, 0, Reg::Ebx, 0, "fsgsbase"),
    (7, 0, Reg::Ebx, 3, "bmi1"),
    (7, 0, Reg::Ebx, 5, "avx2"),
    (7, 0, Reg::Ebx, 8, "bmi2"),
    (7, 0, Reg::Ebx, 9, "erms"),
    (7, 0, Reg::Ebx, 10, "invpcid"),
    (7, 0, Reg::Ebx, 16, "avx512f"),
    (7, 0, Reg::Ebx, 18, "rdseed"),
    (7, 0, Reg::Ebx, 20, "smap"),
    (7, 0, Reg::Ebx, 23, "clflushopt"),
    (7, 0, Reg::Ebx, 24, "clwb"),
    (7, 0, Reg::Ecx, 2, "umip"),
    (7, 0, Reg::Ecx, 3, "pku"),
    (7, 0, Reg::Ecx, 4, "ospke"),
    (7, 0, Reg::Ecx, 9, "vaes"),
    (7, 0, Reg::Ecx, 10, "vpclmulqdq"),
    (7, 0, Reg::Ecx, 22, "rdpid"),
    (7, 0, Reg::Edx, 4, "fsrm"),
    (LEAF_EXT_FEATURES, 0, Reg::Ecx, 5, "abm"),
    // KVM paravirtual features that work through `vmcall` (KVM_HC_*): the
    // ring-0 emulator re-executes a `vmcall` forever (seen with Linux's PV
    // IPIs, KVM_HC_SEND_IPI, on the first IPI to a second vCPU).
    (LEAF_KVM_FEATURES, 0, Reg::Eax, 7, "kvm-pv-unhalt"),
    (LEAF_KVM_FEATURES, 0, Reg::Eax, 11, "kvm-pv-send-ipi"),
    (LEAF_KVM_FEATURES, 0, Reg::Eax, 13, "kvm-pv-sched-yield"),
    // Asynchronous page faults: this host's KVM injects "page not present"
    // into a guest that is in kernel mode (seen: a Linux guest touching
    // guest RAM the pager had not resolved yet while handling a machine
    // check panicked "Host injected async #PF in kernel mode"). Without
    // the feature the vCPU waits in KVM_RUN until the fault is resolved.
    (LEAF_KVM_FEATURES, 0, Reg::Eax, 4, "kvm-async-pf"),
    (LEAF_KVM_FEATURES, 0, Reg::Eax, 10, "kvm-async-pf-vmexit"),
    (LEAF_KVM_FEATURES, 0, Reg::Eax, 14, "kvm-async-pf-int"),
];

const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// Clear [`HIDDEN_ON_EMULATED_RING0`] (only called with emulation assists on).
pub fn hide_for_emulated_ring0(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        for &(leaf, sub, reg, bit, _) in HIDDEN_ON_EMULATED_RING0 {
            let indexed = leaf == LEAF_STRUCTURED;
            if e.function != leaf || (indexed && e.index != sub) {
                continue;
            }
            let r = match reg {
                Reg::Eax => &mut e.eax,
                Reg::Ebx => &mut e.ebx,
                Reg::Ecx => &mut e.ecx,
                Reg::Edx => &mut e.edx,
            };
            *r &= !(1 << bit);
        }
    }
}

/// Linux command-line words for hosts that emulate ring 0 (from
/// resources/linux/README.md): `noxsave` and a `clearcpuid=` list of 124
/// characters (Linux 6.1 keeps only 127 and honours only the last
/// `clearcpuid=`). Linux's own feature detection also reads CPUID bits the
/// VMM cannot hide on every host, and its alternatives are patched from
/// the boot CPU's view, so the command line is the reliable switch.
pub const EMULATED_RING0_CMDLINE: &str = "noxsave clearcpuid=popcnt,cx16,bmi1,bmi2,movbe,sse4_1,sse4_2,ssse3,rdrand,rdseed,fsgsbase,smap,abm,erms,fsrm,clflushopt,clwb,rdpid,invpcid,umip";

/// Switch of resources/linux's kernel patch: complete a ring-3 `syscall`
/// that faulted at the entry address (this host class runs `syscall`
/// without the privilege change; docs/linux.md). Kernels without the
/// patch ignore the unknown word (it ends up in init's environment).
pub const RING3_SYSCALL_COMPLETION: &str = "ring3_syscall_completion";

/// `cmdline` with the words an emulated-ring-0 host needs appended:
/// [`RING3_SYSCALL_COMPLETION`] and [`EMULATED_RING0_CMDLINE`] (the
/// `clearcpuid=` list only when the user gave none: Linux honours only the
/// last one). Words already present are not repeated.
pub fn with_emulated_ring0_words(cmdline: &str) -> String {
    let own_clearcpuid = cmdline
        .split_whitespace()
        .any(|w| w.starts_with("clearcpuid="));
    if own_clearcpuid {
        log::warn!("--cmdline has its own clearcpuid=: not adding the emulation-assist list");
    }
    let mut s = cmdline.to_string();
    let words = EMULATED_RING0_CMDLINE
        .split_whitespace()
        .filter(|w| !(own_clearcpuid && w.starts_with("clearcpuid=")))
        .chain([RING3_SYSCALL_COMPLETION]);
    for w in words {
        if !cmdline.split_whitespace().any(|x| x == w) {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(w);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_ids_and_counts() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_001e,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        fix_for_vcpu(&mut c, 3, 4);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[0].ebx & 0xffff, 0x0800);
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!((s[1].eax, s[1].ebx, s[1].edx), (2, 4, 3));
        assert_eq!(s[2].eax, 3);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(5), 3);
    }

    #[test]
    fn emulated_ring0_baseline() {
        let amd = |f| kvm_cpuid_entry2 {
            function: f,
            ebx: 0x6874_7541,
            edx: 0x6974_6e65,
            ecx: 0x444d_4163,
            eax: 0x8000_0008,
            ..Default::default()
        };
        let entries = [
            amd(0),
            amd(LEAF_EXT_MAX),
            kvm_cpuid_entry2 {
                function: 1,
                ecx: !0,
                edx: !0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                ebx: !0,
                ecx: !0,
                edx: !0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 1,
                ebx: !0,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        hide_for_emulated_ring0(&mut c);
        set_mca_recovery(&mut c);
        let s = c.as_slice();
        assert_eq!(
            s[2].ecx & (1 << 13 | 1 << 23 | 1 << 26),
            0,
            "cx16, popcnt, xsave"
        );
        assert_ne!(s[2].ecx & 1, 0, "sse3 stays");
        assert_eq!(s[2].edx, !0);
        assert_eq!(s[3].ebx & (1 << 0 | 1 << 20), 0, "fsgsbase, smap");
        assert_eq!(s[3].edx & (1 << 4), 0, "fsrm");
        assert_eq!(s[4].ebx, !0, "leaf 7 subleaf 1 untouched");
        let ras = s.iter().find(|e| e.function == LEAF_RAS).unwrap();
        assert_eq!(ras.ebx & 3, 3, "SUCCOR + overflow recovery added");
        assert_eq!(
            EMULATED_RING0_CMDLINE
                .split_once("clearcpuid=")
                .unwrap()
                .1
                .len(),
            124
        );
        assert_eq!(
            with_emulated_ring0_words("console=ttyS0 noxsave"),
            format!(
                "console=ttyS0 noxsave {} {RING3_SYSCALL_COMPLETION}",
                EMULATED_RING0_CMDLINE.trim_start_matches("noxsave ")
            )
        );
        assert_eq!(
            with_emulated_ring0_words("a clearcpuid=pku ring3_syscall_completion"),
            "a clearcpuid=pku ring3_syscall_completion noxsave"
        );
    }
}
