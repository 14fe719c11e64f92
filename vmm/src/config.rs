//! Validated VM configuration from the command line.

use std::path::PathBuf;

/// Smallest RAM size accepted (room for boot structures, a kernel and its heap).
pub const MIN_MEM_MIB: u64 = 16;
/// Smallest frame pool accepted (`--mem-pool`): the test guests' image,
/// page tables and stack, with room to spare.
pub const MIN_POOL_MIB: u64 = 4;
/// Default RAM size (as Firecracker).
pub const DEFAULT_MEM_MIB: u64 = 128;

/// Where the kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// A file (ELF vmlinux or bzImage).
    File(PathBuf),
    /// A guest of the embedded test-guest kit.
    Embedded(String),
}

/// What happens when the guest resets the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OnReset {
    /// `vmm` exits with status 0 (Firecracker's behaviour).
    #[default]
    Exit,
    /// The guest boots again with fresh RAM (QEMU's behaviour).
    Restart,
}

/// What happens when the frame pool runs dry after reclaim (`--on-oom`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOom {
    /// The faulting vCPUs wait until frames come back (balloon inflate,
    /// free page reporting, `PATCH /memory {"pool_mib": N}`).
    #[default]
    Pause,
    /// `vmm` exits with status 73 ([`crate::exit::EXIT_OUT_OF_MEMORY`]).
    Fail,
}

/// Everything `vmm run` needs.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The kernel.
    pub kernel: KernelSource,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// API socket path.
    pub api_sock: Option<PathBuf>,
    /// Build nothing guest-visible until `PUT /actions InstanceStart`
    /// (`--wait-for-start`; needs `api_sock`).
    pub wait_for_start: bool,
    /// What backs guest RAM.
    pub mem_backing: crate::memory::RamBacking,
    /// Frame pool size in MiB (`--mem-pool`; `None`: as large as RAM).
    pub mem_pool_mib: Option<u64>,
    /// What happens when the pool runs dry (`--on-oom`).
    pub on_oom: OnOom,
    /// What a guest reset does.
    pub on_reset: OnReset,
    /// Virtio balloon (`--balloon`), if any.
    pub balloon: Option<crate::devices::virtio::balloon::BalloonConfig>,
    /// When to complete instructions an emulated ring 0 refuses (`--emulation-assists`).
    pub emulation_assists: crate::vstate::assist::AssistMode,
}

/// Configuration errors (exit status 64).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--wait-for-start` without an API socket.
    #[error("--wait-for-start waits for PUT /actions on the API socket; add --api-sock PATH")]
    WaitWithoutApi,
    /// RAM too small.
    #[error("--mem {0} MiB is too small: the guest needs at least {MIN_MEM_MIB} MiB")]
    MemTooSmall(u64),
    /// RAM larger than the host has.
    #[error("--mem {asked} MiB is more than this host's RAM ({host} MiB); choose a smaller size")]
    MemTooLarge {
        /// Requested.
        asked: u64,
        /// Host MemTotal.
        host: u64,
    },
    /// Zero vCPUs.
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    /// More vCPUs than the MP table holds.
    #[error("--vcpus {asked} is more than this VMM supports ({max}, limited by the MP table)")]
    TooManyVcpus {
        /// Requested.
        asked: u32,
        /// Maximum.
        max: u32,
    },
    /// Unknown embedded guest.
    #[error("no embedded guest named {name:?}; available: {available}")]
    UnknownGuest {
        /// Requested name.
        name: String,
        /// Known names.
        available: String,
    },
    /// Command line too long.
    #[error("--cmdline is {0} bytes; at most {max} bytes are accepted", max = crate::layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// Bad `--mem-pool`.
    #[error(
        "--mem-pool {pool} MiB: the frame pool must hold at least {MIN_POOL_MIB} MiB and at most \
         the guest RAM (--mem {mem} MiB)"
    )]
    BadPool {
        /// Requested pool.
        pool: u64,
        /// Guest RAM.
        mem: u64,
    },
    /// `--mem-pool` with `--mem-backing anon`.
    #[error(
        "--mem-pool needs --mem-backing guestmem (anonymous memory is not overcommitted by vmm)"
    )]
    PoolWithAnon,
    /// Bad `--balloon`.
    #[error(transparent)]
    Balloon(#[from] crate::devices::virtio::balloon::BalloonConfigError),
}

/// Host RAM in MiB (MemTotal), if /proc/meminfo can be read.
pub fn host_mem_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl VmConfig {
    /// Check sizes and names; KVM-specific limits are checked when the VM is created.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall(self.mem_mib));
        }
        if let Some(host) = host_mem_mib() {
            if self.mem_mib > host {
                return Err(ConfigError::MemTooLarge {
                    asked: self.mem_mib,
                    host,
                });
            }
        }
        if let Some(pool) = self.mem_pool_mib {
            if pool < MIN_POOL_MIB || pool > self.mem_mib {
                return Err(ConfigError::BadPool {
                    pool,
                    mem: self.mem_mib,
                });
            }
            if self.mem_backing == crate::memory::RamBacking::Anon {
                return Err(ConfigError::PoolWithAnon);
            }
        }
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        let max = crate::boot::mptable::MAX_VCPUS;
        if self.vcpus > max {
            return Err(ConfigError::TooManyVcpus {
                asked: self.vcpus,
                max,
            });
        }
        if self.cmdline.len() >= crate::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if let Some(b) = &self.balloon {
            b.validate(self.mem_mib)?;
        }
        if self.wait_for_start && self.api_sock.is_none() {
            return Err(ConfigError::WaitWithoutApi);
        }
        if let KernelSource::Embedded(name) = &self.kernel {
            if crate::guests::find(name).is_none() {
                return Err(ConfigError::UnknownGuest {
                    name: name.clone(),
                    available: crate::guests::names().join(", "),
                });
            }
        }
        Ok(())
    }
}
