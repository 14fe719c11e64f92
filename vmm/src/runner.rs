//! Builds a VM from a [`VmConfig`], runs it on the event loop and returns the
//! exit status.
//!
//! Threads: the main thread runs the event loop (stdin → UART, the API
//! socket, the exit event); one thread per vCPU runs KVM_RUN and dispatches
//! exits to the device buses.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootSpec, KernelImage};
use crate::config::{KernelSource, OnReset, VmConfig};
use crate::devices::{self, Bus};
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::GuestRam;
use crate::preboot::PreBoot;
use crate::vstate::control::{self, VcpuControl};
use crate::vstate::vcpu::{MceState, Vcpu, VcpuShared};
use crate::vstate::vm::Vm;

/// Errors that stop the VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// KVM unavailable or refused.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// vCPU setup failed.
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// Loading the guest failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Guest memory setup failed.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The API socket cannot be served.
    #[error("API socket: {0}")]
    Api(String),
    /// Anything else the host refused (eventfds, threads, epoll).
    #[error("{what}: {err}")]
    Host {
        /// What failed.
        what: &'static str,
        /// The error.
        err: std::io::Error,
    },
}

impl RunError {
    /// The process exit status for this error.
    pub fn status(&self) -> i32 {
        use crate::exit::*;
        match self {
            RunError::Config(_) => EXIT_USAGE,
            RunError::Vm(crate::vstate::vm::VmError::TooManyVcpus { .. }) => EXIT_USAGE,
            RunError::Vm(_) => EXIT_UNAVAILABLE,
            RunError::Boot(boot::BootError::Cmdline(_)) => EXIT_USAGE,
            RunError::Boot(boot::BootError::MpTable(_)) => EXIT_USAGE,
            RunError::Boot(_) => EXIT_DATAERR,
            RunError::Api(_) => EXIT_USAGE,
            _ => EXIT_SOFTWARE,
        }
    }
}

fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> RunError {
    move |err| RunError::Host { what, err }
}

/// The vCPU threads of a running VM, shared by the runner and the API.
#[derive(Default)]
pub struct VcpuThreads(Mutex<Vec<JoinHandle<Vcpu>>>);

impl VcpuThreads {
    /// Pause all vCPUs (returns when every one is out of KVM_RUN).
    pub fn pause(&self, control: &VcpuControl) {
        control.pause(&self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Kick vCPU `index` out of KVM_RUN (to deliver queued work).
    pub fn kick(&self, index: usize) {
        if let Some(t) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(index) {
            use vmm_sys_util::signal::Killable;
            let _ = t.kill(crate::vstate::control::kick_signal());
        }
    }

    /// Start one thread per vCPU.
    fn spawn(&self, vcpus: Vec<Vcpu>) -> Result<(), RunError> {
        for (i, v) in vcpus.into_iter().enumerate() {
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || v.run())
                .map_err(host("spawn a vCPU thread"))?;
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        }
        Ok(())
    }

    /// Stop and join every vCPU thread; returns the vCPUs (all of them, or
    /// None if a thread panicked).
    fn stop(&self, control: &VcpuControl) -> Option<Vec<Vcpu>> {
        let threads = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = Vec::new();
        for r in control.stop(threads) {
            match r {
                Ok(v) => out.push(v),
                Err(_) => {
                    log::error!("a vCPU thread panicked");
                    return None;
                }
            }
        }
        Some(out)
    }
}

/// State the control API needs to act on the running VM.
pub struct VmHandle {
    /// Run/pause control.
    pub control: Arc<VcpuControl>,
    /// The vCPU threads.
    pub threads: Arc<VcpuThreads>,
    /// vCPU count.
    pub vcpus: u32,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// Guest memory.
    pub ram: Arc<GuestRam>,
    /// Machine-check queues.
    pub mce: Arc<MceState>,
    /// The virtio balloon, when configured.
    pub balloon: Option<crate::devices::virtio::balloon::BalloonHandle>,
    /// Emulation assists and their counters.
    pub assists: Arc<crate::vstate::assist::Assists>,
}

struct ExitWatcher(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            log::error!("cannot watch the exit event: {e:?}");
        }
    }
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.event().read();
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Build and run the VM; returns why it ended.
pub fn run(cfg: &VmConfig) -> Result<ExitReason, RunError> {
    cfg.validate()?;
    control::install_kick_handler().map_err(host("install the vCPU kick signal handler"))?;
    crate::vstate::mce::install_sigbus_handler().map_err(host("install the SIGBUS handler"))?;
    let exit = Arc::new(ExitSignal::new().map_err(host("create the exit eventfd"))?);
    let mut em: EventManager<Subscriber> = EventManager::new()
        .map_err(|e| host("create the event loop")(std::io::Error::other(format!("{e:?}"))))?;
    em.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit.clone()))));
    // `--wait-for-start`: serve the API first; it may still configure the
    // balloon until InstanceStart.
    let mut api = None;
    let mut started_cfg;
    let cfg = if cfg.wait_for_start {
        let path = cfg.api_sock.as_deref().expect("validated");
        let (preboot, pending) = PreBoot::new(cfg.vcpus, cfg.mem_mib, cfg.balloon.clone());
        let server = crate::api_glue::serve(&mut em, path, Box::new(preboot))?;
        log::info!(
            "waiting for PUT /actions InstanceStart on {}",
            path.display()
        );
        started_cfg = cfg.clone();
        loop {
            if let Err(e) = em.run() {
                return Err(host("run the event loop")(std::io::Error::other(format!(
                    "{e:?}"
                ))));
            }
            if exit.reason().is_some() {
                return Ok(exit.reason().expect("checked"));
            }
            let p = pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.start {
                started_cfg.balloon = p.balloon.clone();
                break;
            }
        }
        api = Some(server);
        &started_cfg
    } else {
        cfg
    };
    let vm = Vm::new(cfg.vcpus)?;
    let mem_bytes = cfg.mem_mib << 20;
    let ram = Arc::new(GuestRam::new(
        mem_bytes,
        cfg.vcpus,
        cfg.mem_backing,
        crate::memory::Overcommit {
            pool_mib: cfg.mem_pool_mib,
            on_oom: cfg.on_oom,
        },
        exit.clone(),
    )?);
    ram.register_memslots(&vm)?;

    // Devices.
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host("create the serial irqfd"))?;
    vm.fd
        .register_irqfd(&serial_irq, devices::serial::COM1_IRQ)
        .map_err(|e| {
            host("register the serial irqfd")(std::io::Error::from_raw_os_error(e.errno()))
        })?;
    let drained =
        EventFd::new(libc::EFD_NONBLOCK).map_err(host("create the serial input eventfd"))?;
    let serial = Arc::new(Mutex::new(devices::serial::SerialDevice::new(
        serial_irq,
        drained.try_clone().map_err(host("clone an eventfd"))?,
        Box::new(std::io::stdout()),
    )));
    let mut io = Bus::new();
    let bus_err = |e: devices::bus::BusError| RunError::Host {
        what: "device layout",
        err: std::io::Error::other(e),
    };
    io.insert(devices::serial::COM1_PORT, 8, serial.clone())
        .map_err(bus_err)?;
    io.insert(
        devices::legacy::I8042_PORT,
        5,
        Arc::new(Mutex::new(devices::legacy::I8042::new(exit.clone()))),
    )
    .map_err(bus_err)?;
    io.insert(
        devices::debug_exit::DEBUG_EXIT_PORT,
        1,
        Arc::new(Mutex::new(devices::debug_exit::DebugExit::new(
            exit.clone(),
        ))),
    )
    .map_err(bus_err)?;
    let mut mmio = Bus::new();
    let balloon = crate::devices::virtio::balloon::worker::attach_to(&vm, &ram, cfg, &mut mmio)
        .map_err(|e| RunError::Host {
            what: "virtio balloon",
            err: std::io::Error::other(e),
        })?;
    let cmdline = crate::devices::virtio::balloon::worker::boot_cmdline(cfg);
    let assists = Arc::new(crate::vstate::assist::Assists::new(
        cfg.emulation_assists.resolve(),
    ));
    let cmdline = if assists.enabled() && matches!(cfg.kernel, KernelSource::File(_)) {
        boot::cpuid::with_emulated_ring0_words(&cmdline)
    } else {
        cmdline
    };
    log::info!(
        "emulation assists {}",
        if assists.enabled() { "on" } else { "off" }
    );

    // Guest image.
    let embedded;
    let kernel = match &cfg.kernel {
        KernelSource::File(p) => KernelImage::File(p),
        KernelSource::Embedded(name) => {
            embedded = crate::guests::find(name).expect("validated");
            KernelImage::Embedded(name, embedded)
        }
    };
    let spec = BootSpec {
        kernel,
        initrd: cfg.initrd.as_deref(),
        cmdline: &cmdline,
        mem_bytes,
        vcpus: cfg.vcpus,
        force_linux64: false,
    };
    let entry = boot::load(ram.mem(), &spec)?;
    log::info!(
        "guest entry {:#x} ({:?}), {} vCPUs, {} MiB",
        entry.entry,
        entry.mode,
        cfg.vcpus,
        cfg.mem_mib
    );

    // vCPUs.
    let control = Arc::new(VcpuControl::new());
    let supported = Vcpu::supported_cpuid(&vm.kvm)?;
    let vendor = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map(|e| crate::vstate::mce::vendor_of(e.ebx, e.edx, e.ecx))
        .unwrap_or(crate::vstate::mce::McaVendor::Intel);
    let mce = Arc::new(MceState::new(
        crate::vstate::mce::guest_mcg_cap(&vm.kvm),
        vendor,
        cfg.vcpus,
    ));
    let shared = VcpuShared {
        io: Arc::new(io),
        mmio: Arc::new(mmio),
        exit: exit.clone(),
        control: control.clone(),
        ram: ram.clone(),
        mce: mce.clone(),
        assists: assists.clone(),
    };
    let mut vcpus = Vec::new();
    for i in 0..cfg.vcpus {
        let v = Vcpu::new(&vm, &supported, i, cfg.vcpus, shared.clone())?;
        if i == 0 {
            v.setup_boot(ram.mem(), entry)?;
        }
        vcpus.push(v);
    }

    // Event loop.
    let stdin = std::io::stdin();
    let _raw = crate::terminal::RawMode::enter(stdin.as_raw_fd());
    em.add_subscriber(Arc::new(Mutex::new(crate::stdin::SerialInput::new(
        stdin,
        serial.clone(),
        drained,
    ))));

    let balloon = balloon.map(|(worker, handle)| {
        em.add_subscriber(Arc::new(Mutex::new(worker)));
        handle
    });
    let threads = Arc::new(VcpuThreads::default());
    let handle = VmHandle {
        control: control.clone(),
        threads: threads.clone(),
        vcpus: cfg.vcpus,
        mem_mib: cfg.mem_mib,
        ram: ram.clone(),
        mce,
        balloon,
        assists: assists.clone(),
    };
    let controller = Box::new(crate::api_glue::VmApi(handle));
    match (&api, &cfg.api_sock) {
        (Some(server), _) => {
            *server
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .controller_mut() = controller;
        }
        (None, Some(path)) => {
            crate::api_glue::serve(&mut em, path, controller)?;
        }
        (None, None) => {}
    }

    threads.spawn(vcpus)?;
    let mut resets = 0u32;
    loop {
        while exit.reason().is_none() {
            if let Err(e) = em.run() {
                exit.request(ExitReason::Internal(format!("event loop failed: {e:?}")));
            }
        }
        let vcpus = threads.stop(&control);
        let (Some(ExitReason::Reset), OnReset::Restart, Some(mut vcpus)) =
            (exit.reason(), cfg.on_reset, vcpus)
        else {
            break;
        };
        // Guest reset (QEMU's behaviour with --on-reset restart): fresh RAM
        // (poisoned guest frames get new frames; retired frames stay
        // retired), the image loaded again, vCPUs at power-on state.
        resets += 1;
        log::warn!("guest reset #{resets}: restarting the guest");
        ram.reset();
        vm.reset_platform()?;
        let entry = boot::load(ram.mem(), &spec)?;
        for (i, v) in vcpus.iter_mut().enumerate() {
            v.reset(ram.mem(), (i == 0).then_some(entry))?;
        }
        exit.clear();
        control.restart();
        threads.spawn(vcpus)?;
    }
    ram.stop_pager();
    if assists.enabled() {
        log::info!("emulation assists used: {:?}", assists.counts());
    }
    let _ = std::io::stdout().flush();
    drop(vm);
    Ok(exit.reason().expect("loop ends only with a reason"))
}

/// Keep `GuestMemoryBackend` in scope for `ram.mem()` users.
#[allow(dead_code)]
fn _assert_backend<M: GuestMemoryBackend>(_: &M) {}
