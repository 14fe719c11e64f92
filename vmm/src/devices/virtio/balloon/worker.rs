//! Wiring of the balloon into the VM: irqfd, one ioeventfd per queue on
//! `QueueNotify`, the statistics timer, the event-loop subscriber that
//! processes the queues ([`BalloonWorker`]) and the API's view
//! ([`BalloonHandle`]).
//!
//! Threads: vCPU threads access registers through the MMIO bus; the
//! event-loop thread runs the worker and the API. Both take the one
//! transport mutex; guestmem's locks nest inside it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::IoEventAddress;
use serde::Serialize;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::device::{Balloon, BalloonCounters, GuestStats, QueueRole};
use super::queues::{self, PageReleaser, Released};
use super::{BalloonConfig, BalloonConfigError, PAGES_PER_MIB, PFN_SHIFT};
use crate::devices::virtio::mmio::{TransportCounters, MAX_QUEUES, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::regs::VIRTIO_MMIO_INT_VRING;
use crate::devices::virtio::{Interrupt, MmioTransport};
use crate::memory::GuestRam;
use crate::vstate::vm::Vm;

/// The transport + balloon, shared by the MMIO bus and the worker.
pub type SharedBalloon = Arc<Mutex<MmioTransport<Balloon>>>;

/// Errors wiring the balloon.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// An eventfd or timerfd could not be created.
    #[error("balloon: cannot create {what}: {err}")]
    Host {
        /// What.
        what: &'static str,
        /// The error.
        err: std::io::Error,
    },
    /// KVM refused an irqfd or ioeventfd.
    #[error("balloon: KVM refused {what}: {err}")]
    Kvm {
        /// What.
        what: &'static str,
        /// The error.
        err: std::io::Error,
    },
    /// The MMIO window is taken.
    #[error("balloon: {0}")]
    Bus(#[from] crate::devices::bus::BusError),
}

/// Why an API request on the balloon was refused (HTTP 400, as Firecracker).
#[derive(Debug, thiserror::Error)]
pub enum BalloonApiError {
    /// No device.
    #[error("no balloon device: configure it on the command line (vmm run --balloon amount_mib=N,deflate_on_oom=true|false[,stats_polling_interval_s=N][,free_page_reporting=true|false]) or, with vmm run --wait-for-start, by PUT /balloon before InstanceStart")]
    NotConfigured,
    /// PUT after the guest driver negotiated features.
    #[error("the balloon device cannot be reconfigured after the guest driver started (it negotiated features); use PATCH /balloon to change the target")]
    AfterBoot,
    /// Statistics requested but disabled.
    #[error("statistics for the balloon device are not enabled; start with stats_polling_interval_s > 0")]
    StatsDisabled,
    /// Statistics switched on or off after boot.
    #[error("cannot enable or disable balloon statistics after boot (interval {from} -> {to}); only a non-zero interval can be changed to another non-zero interval")]
    StatsToggle {
        /// Current interval.
        from: u16,
        /// Requested interval.
        to: u16,
    },
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] BalloonConfigError),
}

/// Body of `GET /balloon/statistics`.
#[derive(Clone, Debug, Serialize)]
pub struct BalloonStatsReport {
    /// Target in 4 KiB pages.
    pub target_pages: u32,
    /// Pages the guest reports in the balloon (config `actual`).
    pub actual_pages: u32,
    /// Target in MiB.
    pub target_mib: u32,
    /// Actual in MiB.
    pub actual_mib: u32,
    /// The guest's statistics (Firecracker's names).
    #[serde(flatten)]
    pub guest: GuestStats,
    /// Device counters (activity and refused guest input); not in
    /// Firecracker's schema.
    pub counters: BalloonCounters,
    /// Transport counters (refused register accesses).
    pub transport: TransportCounters,
    /// PFNs currently in the device's balloon bitmap.
    pub ballooned_pages: u64,
    /// Negotiated features (0 before the driver set DRIVER_OK).
    pub negotiated_features: u64,
}

fn lock(d: &SharedBalloon) -> MutexGuard<'_, MmioTransport<Balloon>> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// The API's handle on the balloon.
#[derive(Clone)]
pub struct BalloonHandle {
    dev: SharedBalloon,
    rearm: Arc<EventFd>,
    mem_mib: u64,
}

impl BalloonHandle {
    /// Current configuration (`GET /balloon`).
    pub fn config(&self) -> BalloonConfig {
        lock(&self.dev).device.cfg.clone()
    }

    /// Replace the configuration (`PUT /balloon`); only before the guest
    /// driver negotiated features.
    pub fn put(&self, cfg: BalloonConfig) -> Result<(), BalloonApiError> {
        cfg.validate(self.mem_mib)?;
        let mut t = lock(&self.dev);
        if t.features_ok() {
            return Err(BalloonApiError::AfterBoot);
        }
        t.device.reconfigure(cfg);
        drop(t);
        let _ = self.rearm.write(1);
        Ok(())
    }

    /// New target (`PATCH /balloon`): config change interrupt.
    pub fn set_target(&self, amount_mib: u32) -> Result<(), BalloonApiError> {
        if u64::from(amount_mib) > self.mem_mib {
            return Err(BalloonConfigError::TooLarge {
                amount: amount_mib.into(),
                mem: self.mem_mib,
            }
            .into());
        }
        let mut t = lock(&self.dev);
        t.device.cfg.amount_mib = amount_mib;
        t.config_changed();
        Ok(())
    }

    /// `GET /balloon/statistics`.
    pub fn stats(&self) -> Result<BalloonStatsReport, BalloonApiError> {
        let t = lock(&self.dev);
        let b = &t.device;
        if b.cfg.stats_polling_interval_s == 0 {
            return Err(BalloonApiError::StatsDisabled);
        }
        let per_mib = PAGES_PER_MIB as u32;
        Ok(BalloonStatsReport {
            target_pages: b.target_pages(),
            actual_pages: b.actual_pages,
            target_mib: b.target_pages() / per_mib,
            actual_mib: b.actual_pages / per_mib,
            guest: b.stats,
            counters: b.counters,
            transport: t.counters,
            ballooned_pages: b.ballooned.count(),
            negotiated_features: b.active.unwrap_or(0),
        })
    }

    /// `PATCH /balloon/statistics`.
    pub fn set_stats_interval(&self, secs: u16) -> Result<(), BalloonApiError> {
        let mut t = lock(&self.dev);
        let from = t.device.cfg.stats_polling_interval_s;
        if (from == 0) != (secs == 0) && t.features_ok() {
            return Err(BalloonApiError::StatsToggle { from, to: secs });
        }
        t.device.cfg.stats_polling_interval_s = secs;
        drop(t);
        let _ = self.rearm.write(1);
        Ok(())
    }
}

/// guestmem's `release_range` behind the balloon's [`PageReleaser`]; with
/// the anonymous baseline backing, `madvise(MADV_DONTNEED)` (what
/// Firecracker does).
struct RamReleaser<'a>(&'a GuestRam);

impl PageReleaser for RamReleaser<'_> {
    fn release(&self, gpa: u64, len: u64) -> Result<Released, String> {
        if let Some(gm) = self.0.guest_memory() {
            self.0.check_map_budget()?;
            return gm
                .release_range(guestmem::GpaRange::new(gpa, len))
                .map(|r| Released {
                    freed: r.freed_frames,
                    unpopulated: r.unpopulated,
                    split_huge: r.split_huge,
                })
                .map_err(|e| e.to_string());
        }
        let mem = self.0.mem();
        let host = mem
            .get_slice(vm_memory::GuestAddress(gpa), len as usize)
            .map_err(|e| e.to_string())?
            .ptr_guard_mut()
            .as_ptr();
        // `host..host + len` is inside one region of the guest RAM mapping
        // (get_slice checked it); MADV_DONTNEED on this private anonymous
        // mapping only drops its contents (the guest then reads zeros).
        // SAFETY: it never unmaps memory Rust code holds references to.
        let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(Released {
            freed: len >> PFN_SHIFT,
            ..Default::default()
        })
    }
}

/// Whether queue `idx` may be processed: its ring pages are RAM and not
/// poisoned ([`queues::ring_pages_ok`], counted and logged otherwise) and
/// `more` holds. If not, the device needs a reset.
fn queue_usable(
    t: &mut MmioTransport<Balloon>,
    idx: usize,
    more: impl FnOnce(&mut Balloon, &virtio_queue::Queue) -> bool,
) -> bool {
    let MmioTransport { device, queues, .. } = &mut *t;
    let ok = match queues::ring_pages_ok(device, &queues[idx]) {
        Ok(()) => more(device, &queues[idx]),
        Err(e) => {
            device.counters.bad_ring_pages += 1;
            log::error!("balloon: queue {idx} not processed, device needs a reset: {e}");
            false
        }
    };
    if !ok {
        t.needs_reset();
    }
    ok
}

const TIMER: u32 = MAX_QUEUES as u32;
const REARM: u32 = TIMER + 1;

/// Event-loop subscriber: queue notifications (ioeventfds), the statistics
/// timer and timer re-arming requests from the API.
pub struct BalloonWorker {
    dev: SharedBalloon,
    ram: Arc<GuestRam>,
    notify: Vec<EventFd>,
    timer: TimerFd,
    rearm: Arc<EventFd>,
}

impl BalloonWorker {
    fn process_queue(&mut self, idx: usize) {
        let mut t = lock(&self.dev);
        let acked = t.acked_features();
        if !t.driver_ok() {
            return;
        }
        let Some(role) = t.device.role(idx, acked) else {
            return;
        };
        let mem = self.ram.mem();
        let rel = RamReleaser(&self.ram);
        if !t.queues[idx].ready() {
            return;
        }
        if !queue_usable(&mut t, idx, |d, q| queues::avail_index_ok(d, q, mem)) {
            return;
        }
        let MmioTransport {
            device,
            queues,
            interrupt,
            ..
        } = &mut *t;
        let q = &mut queues[idx];
        let used = match role {
            QueueRole::Inflate => queues::process_pfn_queue(device, q, mem, &rel, true),
            QueueRole::Deflate => queues::process_pfn_queue(device, q, mem, &rel, false),
            QueueRole::Stats => queues::process_stats_queue(device, q, mem),
            QueueRole::Reporting => queues::process_reporting_queue(device, q, mem, &rel),
        };
        if used > 0 {
            interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
    }

    fn stats_tick(&mut self) {
        let mut t = lock(&self.dev);
        let acked = t.acked_features();
        if !t.driver_ok() {
            return;
        }
        let Some(idx) =
            (0..MAX_QUEUES).find(|&i| t.device.role(i, acked) == Some(QueueRole::Stats))
        else {
            return;
        };
        let mem = self.ram.mem();
        if !queue_usable(&mut t, idx, |_, _| true) {
            return;
        }
        let MmioTransport {
            device,
            queues,
            interrupt,
            ..
        } = &mut *t;
        if queues::stats_tick(device, &mut queues[idx], mem) > 0 {
            interrupt.trigger(VIRTIO_MMIO_INT_VRING);
        }
    }

    fn arm_timer(&mut self) {
        let secs = lock(&self.dev).device.cfg.stats_polling_interval_s;
        let r = if secs == 0 {
            self.timer.clear()
        } else {
            let d = Duration::from_secs(secs.into());
            self.timer.reset(d, Some(d))
        };
        if let Err(e) = r {
            log::error!("balloon: cannot arm the statistics timer: {e}");
        }
    }
}

impl MutEventSubscriber for BalloonWorker {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in self.notify.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(e, i as u32, EventSet::IN)) {
                log::error!("balloon: cannot watch queue {i} notifications: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.timer, TIMER, EventSet::IN)) {
            log::error!("balloon: cannot watch the statistics timer: {e:?}");
        }
        if let Err(e) = ops.add(Events::with_data(&*self.rearm, REARM, EventSet::IN)) {
            log::error!("balloon: cannot watch timer changes: {e:?}");
        }
        self.arm_timer();
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            i if (i as usize) < self.notify.len() => {
                let _ = self.notify[i as usize].read();
                self.process_queue(i as usize);
            }
            TIMER => {
                let _ = self.timer.wait();
                self.stats_tick();
            }
            REARM => {
                let _ = self.rearm.read();
                self.arm_timer();
            }
            other => log::warn!("balloon: event with unknown data {other}"),
        }
    }
}

/// The pieces [`attach`] returns.
pub struct Attached {
    /// The bus device (map it at `base`, length `VIRTIO_MMIO_SIZE`).
    pub device: SharedBalloon,
    /// The event-loop subscriber.
    pub worker: BalloonWorker,
    /// The API handle.
    pub handle: BalloonHandle,
}

/// Create the balloon at MMIO `base` with interrupt `gsi`: irqfd, one
/// ioeventfd per queue (datamatch = queue index on `QueueNotify`), timer.
pub fn attach(
    vm: &Vm,
    ram: Arc<GuestRam>,
    cfg: BalloonConfig,
    mem_mib: u64,
    base: u64,
    gsi: u32,
) -> Result<Attached, BalloonError> {
    let efd =
        |what| EventFd::new(libc::EFD_NONBLOCK).map_err(|err| BalloonError::Host { what, err });
    let irqfd = efd("the interrupt eventfd")?;
    vm.fd
        .register_irqfd(&irqfd, gsi)
        .map_err(|e| BalloonError::Kvm {
            what: "the balloon irqfd",
            err: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    let mut notify = Vec::new();
    for i in 0..MAX_QUEUES as u32 {
        let e = efd("a queue notification eventfd")?;
        vm.fd
            .register_ioevent(&e, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), i)
            .map_err(|e| BalloonError::Kvm {
                what: "a queue notification ioeventfd",
                err: std::io::Error::from_raw_os_error(e.errno()),
            })?;
        notify.push(e);
    }
    let timer = TimerFd::new().map_err(|e| BalloonError::Host {
        what: "the statistics timer",
        err: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let rearm = Arc::new(efd("the timer re-arm eventfd")?);
    let pfn_limit = (ram.mem().last_addr().0 >> PFN_SHIFT) + 1;
    let mut balloon = Balloon::new(cfg, pfn_limit);
    balloon.dma = ram.device_tlb().cloned();
    let transport = MmioTransport::new(balloon, ram.mem().clone(), Arc::new(Interrupt::new(irqfd)));
    let device = Arc::new(Mutex::new(transport));
    Ok(Attached {
        device: device.clone(),
        worker: BalloonWorker {
            dev: device.clone(),
            ram,
            notify,
            timer,
            rearm: rearm.clone(),
        },
        handle: BalloonHandle {
            dev: device,
            rearm,
            mem_mib,
        },
    })
}

/// The runner's hook: when `cfg` has a balloon, create it at
/// [`VIRTIO_MMIO_START`](crate::layout::VIRTIO_MMIO_START) with GSI
/// [`BALLOON_GSI`] and map it on `mmio`.
pub fn attach_to(
    vm: &Vm,
    ram: &Arc<GuestRam>,
    cfg: &crate::config::VmConfig,
    mmio: &mut crate::devices::Bus,
) -> Result<Option<(BalloonWorker, BalloonHandle)>, BalloonError> {
    let Some(b) = &cfg.balloon else {
        return Ok(None);
    };
    let base = crate::layout::VIRTIO_MMIO_START;
    let a = attach(vm, ram.clone(), b.clone(), cfg.mem_mib, base, BALLOON_GSI)?;
    mmio.insert(base, crate::layout::VIRTIO_MMIO_SIZE, a.device)?;
    Ok(Some((a.worker, a.handle)))
}

/// GSI (ISA IRQ) of the balloon.
pub const BALLOON_GSI: u32 = 5;

/// The kernel command line to boot with: for a Linux kernel (`--kernel`)
/// with a balloon, the device is announced with `virtio_mmio.device=`.
pub fn boot_cmdline(cfg: &crate::config::VmConfig) -> String {
    let linux = matches!(cfg.kernel, crate::config::KernelSource::File(_));
    if cfg.balloon.is_none() || !linux {
        return cfg.cmdline.clone();
    }
    let dev = super::linux_cmdline_fragment(crate::layout::VIRTIO_MMIO_START, BALLOON_GSI);
    if cfg.cmdline.is_empty() {
        dev
    } else {
        format!("{} {dev}", cfg.cmdline)
    }
}
