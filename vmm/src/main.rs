//! The `vmm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::config::{KernelSource, VmConfig, DEFAULT_MEM_MIB};
use vmm::exit::{ExitReason, DEBUG_EXIT_MAX, EXIT_DEBUG_OUT_OF_RANGE, EXIT_SOFTWARE, EXIT_USAGE};

/// A minimal KVM VMM whose guest RAM is managed like Linux's page allocator.
#[derive(Parser)]
#[command(name = "vmm", version, about)]
struct Cli {
    /// Log level: error, warn, info, debug, trace (default: warn, or $VMM_LOG).
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest. Without --kernel or --guest, boots the embedded demo guest.
    Run(RunArgs),
    /// Talk to a running vmm through its API socket.
    Ctl(vmm::api::CtlArgs),
    /// Probe this host's KVM (ring-0 speed, capabilities) and print JSON.
    HostInfo,
    /// List or extract the embedded test guests.
    Guests {
        /// Write every guest as DIR/<name>.elf instead of listing them.
        #[arg(long, value_name = "DIR")]
        extract: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel image: ELF vmlinux (PVH note honoured) or bzImage.
    #[arg(long, conflicts_with = "guest")]
    kernel: Option<PathBuf>,
    /// Boot an embedded test guest by name (see `vmm guests`).
    #[arg(long)]
    guest: Option<String>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (default for --kernel: "console=ttyS0 reboot=k panic=1").
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Build nothing guest-visible until `PUT /actions {"action_type":
    /// "InstanceStart"}` on the API socket (Firecracker's flow); until then
    /// `PUT /balloon` may still create or change the balloon.
    #[arg(long, requires = "api_sock")]
    wait_for_start: bool,
    /// What backs guest RAM: guestmem frames demand-paged through the shadow
    /// EPT, or plain anonymous memory faulted in by KVM (benchmark baseline).
    #[arg(long, value_enum, default_value_t = vmm::memory::RamBacking::Guestmem)]
    mem_backing: vmm::memory::RamBacking,
    /// Overcommit: frames for guest RAM in MiB (default: as large as --mem).
    /// When they run out, zero pages are reclaimed first, then --on-oom applies.
    #[arg(long, value_name = "MIB")]
    mem_pool: Option<u64>,
    /// When the frame pool runs dry after reclaim: pause the faulting vCPUs
    /// until frames come back (balloon, free page reporting, PATCH /memory
    /// {"pool_mib": N}), or fail (exit status 73).
    #[arg(long, value_enum, default_value_t = vmm::config::OnOom::Pause)]
    on_oom: vmm::config::OnOom,
    /// Virtio balloon: amount_mib=N,deflate_on_oom=BOOL[,stats_polling_interval_s=N][,free_page_reporting=BOOL].
    #[arg(long, value_name = "ITEMS", value_parser = vmm::devices::virtio::balloon::BalloonConfig::parse_cli)]
    balloon: Option<vmm::devices::virtio::balloon::BalloonConfig>,
    /// What a guest reset does: exit (status 0), or restart the guest with fresh RAM.
    #[arg(long, value_enum, default_value_t = vmm::config::OnReset::Exit)]
    on_reset: vmm::config::OnReset,
    /// Complete the instructions an emulated guest ring 0 refuses (int3,
    /// fwait) and give Linux guests a CPUID baseline: auto = only on hosts
    /// whose KVM emulates ring 0 (probed, see `vmm host-info`).
    #[arg(long, value_enum, default_value_t = vmm::vstate::assist::AssistMode::Auto)]
    emulation_assists: vmm::vstate::assist::AssistMode,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmm::logger::init(cli.log_level.as_deref());
    let status = match cli.cmd {
        Command::Run(a) => run(a),
        Command::Guests { extract } => guests(extract),
        Command::HostInfo => host_info(),
        Command::Ctl(a) => match vmm::api::cli::run(&a.api_sock, &a.cmd) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("vmm: error: {e}");
                e.exit_status()
            }
        },
    };
    ExitCode::from(status as u8)
}

fn run(a: RunArgs) -> i32 {
    let kernel = match (&a.kernel, &a.guest) {
        (Some(p), _) => KernelSource::File(p.clone()),
        (None, Some(g)) => KernelSource::Embedded(g.clone()),
        (None, None) => KernelSource::Embedded("demo".into()),
    };
    let cmdline = a.cmdline.unwrap_or_else(|| match kernel {
        KernelSource::File(_) => "console=ttyS0 reboot=k panic=1".into(),
        KernelSource::Embedded(_) => String::new(),
    });
    let cfg = VmConfig {
        kernel,
        initrd: a.initrd,
        cmdline,
        mem_mib: a.mem,
        vcpus: a.vcpus,
        api_sock: a.api_sock,
        wait_for_start: a.wait_for_start,
        mem_backing: a.mem_backing,
        mem_pool_mib: a.mem_pool,
        on_oom: a.on_oom,
        on_reset: a.on_reset,
        balloon: a.balloon,
        emulation_assists: a.emulation_assists,
    };
    match vmm::runner::run(&cfg) {
        Ok(reason) => {
            match &reason {
                ExitReason::Crash(s) => eprintln!("vmm: guest crashed: {s}"),
                ExitReason::Internal(s) => eprintln!("vmm: internal error: {s}"),
                ExitReason::OutOfMemory(s) => eprintln!("vmm: out of guest memory: {s}"),
                ExitReason::DebugExit(v) if *v > DEBUG_EXIT_MAX => eprintln!(
                    "vmm: the guest wrote {v} (0x{v:02x}) to the debug-exit port; values above \
                     {DEBUG_EXIT_MAX} would collide with vmm's own exit statuses, so vmm exits \
                     with {EXIT_DEBUG_OUT_OF_RANGE}"
                ),
                other => log::info!("guest exit: {other:?}"),
            }
            reason.status()
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            e.status()
        }
    }
}

fn host_info() -> i32 {
    match vmm::vstate::probe::host_info() {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            0
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            vmm::exit::EXIT_UNAVAILABLE
        }
    }
}

fn guests(extract: Option<PathBuf>) -> i32 {
    match extract {
        None => {
            for n in vmm::guests::names() {
                println!("{n}");
            }
            0
        }
        Some(dir) => match vmm::guests::extract(&dir) {
            Ok(paths) => {
                for p in paths {
                    println!("{}", p.display());
                }
                0
            }
            Err(e) => {
                eprintln!("vmm: error: cannot write guests to {}: {e}", dir.display());
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    EXIT_USAGE
                } else {
                    EXIT_SOFTWARE
                }
            }
        },
    }
}
