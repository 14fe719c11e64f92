//! Guest RAM as the VM sees it (see docs/memory.md).
//!
//! Two backings:
//! - `guestmem` (default): RAM is owned by [`guestmem::GuestMemory`] and
//!   mirrored by the [`mmu::ShadowEpt`]; the guest's view is demand-paged
//!   through userfaultfd by the [`pager`], 2 MiB at a time where it can.
//! - `anon`: plain anonymous memory that KVM faults in itself (what
//!   Firecracker and QEMU do); kept as the baseline for benchmarks.

pub mod check;
pub mod dma;
pub mod maplimit;
pub mod pager;
pub mod poison;
pub mod uffd;
pub mod view;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use guestmem::notifier::GpaRange;
use guestmem::{GuestMemory, GuestMemoryConfig};
use mmu::ShadowEpt;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::ExitSignal;
use crate::layout::{ram_ranges, HIMEM_START, MMIO_HOLE_START};
use crate::vstate::vm::Vm;
use pager::{OomControl, Pager, PagerStats};
use view::{GuestView, KvmMapping};

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RamBacking {
    /// guestmem frames, demand-paged through the shadow EPT (the default).
    #[default]
    Guestmem,
    /// Plain anonymous memory faulted in by KVM (benchmark baseline).
    Anon,
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused a mapping.
    #[error("cannot map {mib} MiB of guest RAM: {err}")]
    Map {
        /// Size.
        mib: u64,
        /// Error.
        err: String,
    },
    /// guestmem refused the configuration.
    #[error("guest memory: {0}")]
    Guestmem(#[from] guestmem::CreateError),
    /// The shadow EPT could not be created.
    #[error("shadow EPT: {0}")]
    Ept(#[from] mmu::EptError),
    /// The guest view could not be set up.
    #[error(transparent)]
    View(#[from] view::ViewError),
    /// KVM refused a memory slot.
    #[error(transparent)]
    Slot(#[from] crate::vstate::vm::VmError),
    /// The pager thread could not start.
    #[error("cannot start the pager thread: {0}")]
    Thread(std::io::Error),
}

/// Overcommit settings (`--mem-pool`, `--on-oom`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Overcommit {
    /// Frame pool in MiB (`None`: as large as guest RAM).
    pub pool_mib: Option<u64>,
    /// What happens when the pool runs dry after reclaim.
    pub on_oom: crate::config::OnOom,
}

/// Why `PATCH /memory` refused a pool size.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// guestmem refused it (shrink, larger than RAM).
    #[error(transparent)]
    Resize(#[from] guestmem::PoolResizeError),
    /// Anonymous RAM has no frame pool.
    #[error(
        "this VM's RAM is anonymous memory (--mem-backing anon): it has no frame pool to resize"
    )]
    Anon,
    /// More than guest RAM.
    #[error(
        "cannot grow the frame pool to {asked} MiB: guest RAM is {ram} MiB, a larger pool would \
         never be used"
    )]
    TooLarge {
        /// Asked for.
        asked: u64,
        /// Guest RAM in MiB.
        ram: u64,
    },
}

struct Managed {
    gm: Arc<GuestMemory>,
    ept: Arc<ShadowEpt>,
    view: Arc<GuestView>,
    tlb: Arc<dma::DeviceTlb>,
    pager: Arc<Pager>,
    thread: Mutex<Option<JoinHandle<()>>>,
    poison: poison::PoisonLog,
    maps: maplimit::MapBudget,
}

/// Guest RAM.
pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    bytes: u64,
    managed: Option<Managed>,
}

fn view_regions(view_base: u64, bytes: u64) -> Result<GuestMemoryMmap<()>, MemoryError> {
    let mut regions = Vec::new();
    for r in ram_ranges(bytes) {
        // The range lies inside the guest view, which outlives this collection
        // (GuestRam drops `mem` before `managed`, which owns the view).
        // SAFETY: see above; the mapping stays valid while `m` lives.
        let m = unsafe {
            MmapRegion::build_raw(
                (view_base + r.start) as *mut u8,
                r.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(|e| MemoryError::Map {
            mib: bytes >> 20,
            err: e.to_string(),
        })?;
        let region =
            GuestRegionMmap::new(m, GuestAddress(r.start)).ok_or_else(|| MemoryError::Map {
                mib: bytes >> 20,
                err: "region overflows the address space".into(),
            })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
        mib: bytes >> 20,
        err: e.to_string(),
    })
}

impl GuestRam {
    /// Whether one more 4 KiB change may split the guest view's host
    /// mappings ([`maplimit`]); always Ok with the anonymous backing.
    pub fn check_map_budget(&self) -> Result<(), String> {
        self.managed.as_ref().map_or(Ok(()), |m| m.maps.check())
    }

    /// Guest RAM of `bytes` for `vcpus` vCPUs. With the guestmem backing a
    /// pager thread starts; it reports fatal errors through `exit`.
    pub fn new(
        bytes: u64,
        vcpus: u32,
        backing: RamBacking,
        overcommit: Overcommit,
        exit: Arc<ExitSignal>,
    ) -> Result<Self, MemoryError> {
        if backing == RamBacking::Anon {
            let ranges: Vec<(GuestAddress, usize)> = ram_ranges(bytes)
                .iter()
                .map(|r| (GuestAddress(r.start), r.len as usize))
                .collect();
            let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map {
                mib: bytes >> 20,
                err: e.to_string(),
            })?;
            return Ok(Self {
                mem,
                bytes,
                managed: None,
            });
        }
        let mut cfg = GuestMemoryConfig::x86(bytes, vcpus as usize);
        cfg.pool_frames = overcommit
            .pool_mib
            .map(|mib| (mib << 20) >> guestmem::PAGE_SHIFT);
        let ram: Vec<GpaRange> = cfg.ram.clone();
        let gm = Arc::new(GuestMemory::new(cfg)?);
        let span = ram.iter().map(|r| r.end).max().unwrap_or(0);
        // The legacy area [640 KiB, 1 MiB) (VGA, option ROMs, BIOS) is plain
        // zero memory so guests scanning it (e.g. for an MP table) read zeros.
        let legacy = GpaRange {
            start: crate::layout::EBDA_END,
            end: HIMEM_START.min(span),
        };
        let view = Arc::new(GuestView::new(span, &ram, &[legacy], gm.pool().fd())?);
        let ept = Arc::new(ShadowEpt::new()?);
        let kvm = Arc::new(KvmMapping::new(view.clone()));
        let tlb = Arc::new(dma::DeviceTlb::new(gm.clone(), ept.clone()));
        // Subscribers: the shadow EPT, the KVM mapping, the device
        // translation cache. Order matters only for tracing: all of them
        // drop their translations before the change. They stay registered
        // until `Drop` releases them all.
        gm.notifiers().register(ept.clone());
        gm.notifiers().register(kvm.clone());
        gm.notifiers().register(tlb.clone());
        // guestmem's OOM path: give zero pages back (the guest refaults
        // fresh zero frames), a 2 MiB worth at a time.
        let weak = Arc::downgrade(&gm);
        gm.register_reclaim(Arc::new(move |req: &guestmem::ReclaimRequest| {
            weak.upgrade().map_or(0, |gm| {
                gm.reclaim_zero_pages(512u64.max(1 << req.order))
                    .freed_frames
            })
        }));
        // Overcommit: frames coming back wake the pager's parked faults.
        let oom = Arc::new(OomControl::new(overcommit.on_oom).map_err(MemoryError::Thread)?);
        let o = oom.clone();
        gm.set_free_notify(Some(Arc::new(move || {
            let _ = o.freed.write(1);
        })));
        let pager = Arc::new(Pager {
            gm: gm.clone(),
            ept: ept.clone(),
            view: view.clone(),
            kvm,
            exit,
            vcpu_tids: Mutex::new(HashMap::new()),
            stats: Mutex::new(PagerStats::default()),
            stop: EventFd::new(libc::EFD_NONBLOCK).map_err(MemoryError::Thread)?,
            oom,
        });
        let p = pager.clone();
        let thread = std::thread::Builder::new()
            .name("pager".into())
            .spawn(move || p.run())
            .map_err(MemoryError::Thread)?;
        let mem = view_regions(view.base(), bytes)?;
        Ok(Self {
            mem,
            bytes,
            managed: Some(Managed {
                gm,
                ept,
                view,
                tlb,
                pager,
                thread: Mutex::new(Some(thread)),
                poison: poison::PoisonLog::default(),
                maps: maplimit::MapBudget::from_host(),
            }),
        })
    }

    /// The memory as a vm-memory backend (loader, virtqueues). With the
    /// guestmem backing, accesses go through the guest view and are
    /// demand-paged like the guest's own.
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// guestmem, when it backs the RAM.
    pub fn guest_memory(&self) -> Option<&Arc<GuestMemory>> {
        self.managed.as_ref().map(|m| &m.gm)
    }

    /// The device translation cache, when guestmem backs the RAM: device
    /// emulation reads and writes guest buffers through it (a poisoned page
    /// is an error, never a SIGBUS).
    pub fn device_tlb(&self) -> Option<&Arc<dma::DeviceTlb>> {
        self.managed.as_ref().map(|m| &m.tlb)
    }

    /// The shadow EPT, when guestmem backs the RAM.
    pub fn shadow_ept(&self) -> Option<&Arc<ShadowEpt>> {
        self.managed.as_ref().map(|m| &m.ept)
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes
    }

    /// The backing in use.
    pub fn backing(&self) -> RamBacking {
        if self.managed.is_some() {
            RamBacking::Guestmem
        } else {
            RamBacking::Anon
        }
    }

    /// Record that the calling thread is vCPU `index` (its faults use that
    /// vCPU's frame list).
    pub fn register_vcpu_thread(&self, index: u32) {
        if let Some(m) = &self.managed {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() } as u32;
            m.pager
                .vcpu_tids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(tid, index as usize);
        }
    }

    /// The GPA of a host address in the guest view (for SIGBUS addresses).
    pub fn gpa_of_host(&self, host: u64) -> Option<u64> {
        match &self.managed {
            Some(m) => m.view.gpa_of(host),
            None => {
                use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
                self.mem.iter().find_map(|r| {
                    let start = r.as_ptr() as u64;
                    (host >= start && host < start + r.len())
                        .then(|| r.start_addr().0 + (host - start))
                })
            }
        }
    }

    /// Map back, through the normal fault path, every page of `range` that
    /// guestmem maps but the shadow EPT does not (poisoned pages stay out).
    pub fn prefault(&self, range: GpaRange) {
        let Some(m) = &self.managed else { return };
        let mut gpa = range.start;
        while gpa < range.end {
            let wanted = m.ept.peek(gpa).is_none()
                && m.gm.lookup(gpa).is_some()
                && !m.gm.is_poisoned_gfn(gpa >> guestmem::PAGE_SHIFT);
            if wanted {
                if let Err(e) = m.pager.handle(m.view.base() + gpa, true, 0) {
                    log::warn!("prefault of {gpa:#x} failed: {e}");
                }
            }
            gpa += guestmem::PAGE_SIZE;
        }
    }

    /// Zap counter of the guest view (odd while a zap is under way); 0 for
    /// anonymous RAM. See [`view::GuestView::zap_window`].
    pub fn zap_window(&self) -> u64 {
        self.managed.as_ref().map_or(0, |m| m.view.zap_window())
    }

    /// True when `gpa` is guest RAM.
    pub fn is_ram(&self, gpa: u64) -> bool {
        use vm_memory::GuestMemoryBackend;
        self.mem.address_in_range(GuestAddress(gpa))
    }

    /// Pager counters.
    pub fn pager_stats(&self) -> Option<PagerStats> {
        self.managed
            .as_ref()
            .map(|m| *m.pager.stats.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Register the RAM with KVM: one slot below the 32-bit MMIO hole, one
    /// above it.
    pub fn register_memslots(&self, vm: &Vm) -> Result<(), MemoryError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        for (slot, r) in self.mem.iter().enumerate() {
            // The mapping (the view, or anonymous memory) lives as long as
            // `self`, which the runner keeps alive until the VM is dropped.
            // SAFETY: see above.
            unsafe { vm.set_memslot(slot as u32, r.start_addr().0, r.len(), r.as_ptr() as u64) }?;
        }
        Ok(())
    }

    /// What `GET /memory` reports.
    pub fn info(&self) -> serde_json::Value {
        let Some(m) = &self.managed else {
            return serde_json::json!({ "backing": "anon", "size_mib": self.bytes >> 20 });
        };
        let s = m.gm.stats();
        let e = m.ept.stats();
        let p = *m.pager.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mib = |frames: u64| (frames * guestmem::PAGE_SIZE) >> 20;
        serde_json::json!({
            "backing": "guestmem",
            "size_mib": self.bytes >> 20,
            // A full pool is reported as the RAM size (RAM MiB include
            // the legacy hole, which has no frames).
            "pool_mib": if m.gm.pool_frames() >= m.gm.max_pool_frames() {
                self.bytes >> 20
            } else {
                mib(m.gm.pool_frames())
            },
            "max_pool_mib": self.bytes >> 20,
            "oom": m.pager.oom.report(),
            "frames": {
                "total": s.total, "free": s.free, "pcp_cached": s.pcp_cached,
                "allocated": s.allocated, "mapped": s.mapped, "poisoned": s.poisoned,
                "retired": s.retired, "soft_offlined": s.soft_offlined,
                "poisoned_gfns": s.poisoned_gfns, "released": s.released, "zeroed": s.zeroed,
                "oom_events": s.oom_events, "oom_failures": s.oom_failures,
            },
            "resident_bytes": s.resident_bytes,
            "shadow_ept": {
                "faults": e.faults, "installs_4k": e.installs_4k, "installs_2m": e.installs_2m,
                "retries": e.retries, "invalidations": e.invalidations, "zapped_leaves": e.zapped_leaves,
            },
            "pager": p,
            "device_tlb": m.tlb.stats(),
            "poison": m.poison.snapshot(),
        })
    }

    /// Grow the frame pool to `pool_mib` (`PATCH /memory`); parked faults
    /// retry at once. Returns the MiB added.
    pub fn grow_pool(&self, pool_mib: u64) -> Result<u64, PoolError> {
        let m = self.managed.as_ref().ok_or(PoolError::Anon)?;
        // Guest RAM in MiB counts the legacy hole [640 KiB, 1 MiB), which
        // has no frames: a pool of the RAM size is all frames.
        if pool_mib > self.bytes >> 20 {
            return Err(PoolError::TooLarge {
                asked: pool_mib,
                ram: self.bytes >> 20,
            });
        }
        let mut frames = (pool_mib << 20) >> guestmem::PAGE_SHIFT;
        if pool_mib == self.bytes >> 20 {
            frames = frames.min(m.gm.max_pool_frames());
        }
        let added = m.gm.grow_pool(frames)?;
        if added > 0 {
            log::info!("frame pool grown to {pool_mib} MiB");
        }
        Ok((added * guestmem::PAGE_SIZE) >> 20)
    }

    /// Guest reset: every page unpopulated again. With guestmem, all
    /// mappings are invalidated and frames freed; GFN poison marks are
    /// forgotten (the poisoned frames stay retired), so a GPA that was
    /// poisoned gets a fresh frame. With anonymous memory, the RAM is zeroed.
    pub fn reset(&self) {
        match &self.managed {
            Some(m) => m.gm.reset(),
            None => {
                use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
                for r in self.mem.iter() {
                    // SAFETY: dropping the pages of our own anonymous
                    // mapping; they read back as zero.
                    unsafe {
                        libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_DONTNEED)
                    };
                }
            }
        }
    }

    /// Stop the pager (before the VM is torn down).
    pub fn stop_pager(&self) {
        if let Some(m) = &self.managed {
            let _ = m.pager.stop.write(1);
            if let Some(t) = m.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = t.join();
                // Nobody resolves faults any more: release their waiters
                // before the VM is destroyed (see GuestView::release_faults).
                if let Err(e) = m.view.release_faults() {
                    log::warn!("releasing waiting guest faults at teardown: {e}");
                }
            }
        }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        self.stop_pager();
        // Teardown (mmu_notifier_release): every subscriber drops its
        // translations; the shadow EPT refuses faults from now on.
        if let Some(m) = &self.managed {
            m.gm.notifiers().release_all();
        }
    }
}

/// End of low RAM (below the MMIO hole) for `bytes` of RAM.
pub fn low_ram_end(bytes: u64) -> u64 {
    bytes.min(MMIO_HOLE_START)
}
