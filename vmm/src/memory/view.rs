//! The guest's view of its RAM: one host virtual range in which offset `g`
//! is guest-physical address `g`. KVM's memory slots point into it.
//!
//! A populated extent of the view is a shared mapping of the pool's memfd at
//! the extent's frames; an unpopulated one is an anonymous mapping
//! registered with userfaultfd, so the first access (by a vCPU through KVM,
//! or by the VMM) blocks until the pager resolves it. Zapping an extent
//! (replacing it by a fresh registered anonymous mapping) is what removes it
//! from KVM: the host kernel's MMU notifier makes KVM drop its own entries.
//!
//! [`KvmMapping`] is the `MmuNotifier` subscriber for this mapping. It runs
//! KVM's protocol with its own [`MmuLock`]: the pager installs an extent only
//! under that lock and only if no invalidation overlapping it started since
//! the pager resolved the frame.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use guestmem::notifier::{GpaRange, Invalidation, MmuNotifier};
use mmu::fault::{FaultSeq, MmuGuard, MmuLock};

use super::uffd::{UffdError, Userfaultfd};

/// Errors of view operations.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// A host mapping call failed.
    #[error("guest view {what} at {gpa:#x}+{len:#x} failed: {err}{hint}", hint = map_hint(.err))]
    Map {
        /// Which call.
        what: &'static str,
        /// Guest-physical start.
        gpa: u64,
        /// Length.
        len: u64,
        /// The error.
        err: std::io::Error,
    },
    /// A userfaultfd call failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
}

/// Why an mmap of the view can fail with ENOMEM although memory is free:
/// 4 KiB changes split the view's mappings, and a process has at most
/// `vm.max_map_count` of them (docs/memory.md, "Known limit").
fn map_hint(err: &std::io::Error) -> String {
    if err.raw_os_error() != Some(libc::ENOMEM) {
        return String::new();
    }
    let max = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!(
        " (this process probably reached vm.max_map_count = {max} mappings: many 4 KiB \
         balloon releases or poisonings split the guest view; raise it, e.g. \
         `sysctl -w vm.max_map_count=1048576`)"
    )
}

/// The guest-physical view (see the module docs).
pub struct GuestView {
    base: u64,
    span: u64,
    /// The demand-paged ranges (guest RAM); invalidations are clipped to them.
    ram: Vec<GpaRange>,
    /// Zap counter (see [`GuestView::zap_window`]).
    zaps: AtomicU64,
    uffd: Userfaultfd,
    memfd: i32,
}

impl GuestView {
    /// Reserve `span` bytes of address space for GPAs `[0, span)`; every
    /// range in `ram` becomes demand-paged through a new userfaultfd; the
    /// rest stays inaccessible except `plain` ranges (anonymous zero memory,
    /// e.g. the legacy ROM area below 1 MiB).
    pub fn new(
        span: u64,
        ram: &[GpaRange],
        plain: &[GpaRange],
        memfd: i32,
    ) -> Result<Self, ViewError> {
        // SAFETY: a fresh PROT_NONE reservation chosen by the kernel.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(ViewError::Map {
                what: "reserve",
                gpa: 0,
                len: span,
                err: std::io::Error::last_os_error(),
            });
        }
        let view = Self {
            base: base as u64,
            span,
            ram: ram.to_vec(),
            zaps: AtomicU64::new(0),
            uffd: Userfaultfd::new()?,
            memfd,
        };
        for r in plain {
            view.map_anon(*r, libc::PROT_READ | libc::PROT_WRITE)?;
        }
        for r in ram {
            view.zap(*r)?;
        }
        Ok(view)
    }

    /// Teardown, once the pager has stopped: stop reporting faults in guest
    /// RAM, which wakes every fault still waiting (e.g. parked at OOM). A
    /// waiter can be a KVM work item (host-side async page fault) that VM
    /// destruction flushes: left waiting, it keeps the process in an
    /// unkillable sleep (seen: `kvm_clear_async_pf_completion_queue` in
    /// `__flush_work` after the pager had stopped with a fault parked).
    pub fn release_faults(&self) -> Result<(), ViewError> {
        for r in &self.ram {
            self.uffd.unregister(self.base + r.start, r.len())?;
        }
        Ok(())
    }

    /// Host address of GPA 0.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The userfaultfd of the view.
    pub fn uffd(&self) -> &Userfaultfd {
        &self.uffd
    }

    /// The GPA of a host address inside the view.
    pub fn gpa_of(&self, host: u64) -> Option<u64> {
        (host >= self.base && host < self.base + self.span).then(|| host - self.base)
    }

    fn map_anon(&self, r: GpaRange, prot: libc::c_int) -> Result<(), ViewError> {
        // SAFETY: `r` lies inside our own reservation (checked by the
        // callers' RAM layout), so MAP_FIXED replaces only view memory.
        let p = unsafe {
            libc::mmap(
                (self.base + r.start) as *mut libc::c_void,
                r.len() as usize,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(ViewError::Map {
                what: "zap",
                gpa: r.start,
                len: r.len(),
                err: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Make the RAM inside `r` unpopulated: fresh anonymous mappings
    /// registered for missing-page faults. The old pages are unmapped from
    /// the VMM and, through the host's MMU notifier, from KVM. Parts of `r`
    /// that are not RAM (legacy area, MMIO hole) are left alone.
    ///
    /// The replacement is created inaccessible, registered, and only then
    /// opened: an access in between must not fault in a plain zero page
    /// behind userfaultfd's back (that page would shadow the guest's frame).
    /// A vCPU that hits the short inaccessible window sees EFAULT (or an
    /// emulated access as MMIO) and retries; see [`GuestView::zap_window`].
    pub fn zap(&self, r: GpaRange) -> Result<(), ViewError> {
        assert!(r.end <= self.span, "zap {r:x?} outside the view");
        self.zaps.fetch_add(1, Ordering::SeqCst);
        let res = (|| {
            for ram in &self.ram {
                let part = GpaRange {
                    start: r.start.max(ram.start),
                    end: r.end.min(ram.end),
                };
                if part.is_empty() {
                    continue;
                }
                self.map_anon(part, libc::PROT_NONE)?;
                self.uffd.register(self.base + part.start, part.len())?;
                // SAFETY: `part` is inside our reservation.
                let rc = unsafe {
                    libc::mprotect(
                        (self.base + part.start) as *mut libc::c_void,
                        part.len() as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                    )
                };
                if rc != 0 {
                    return Err(ViewError::Map {
                        what: "open",
                        gpa: part.start,
                        len: part.len(),
                        err: std::io::Error::last_os_error(),
                    });
                }
            }
            Ok(())
        })();
        self.zaps.fetch_add(1, Ordering::SeqCst);
        res
    }

    /// A counter that is odd while a zap is under way and changes with every
    /// zap: a vCPU that got EFAULT (or an emulated access as MMIO) on guest
    /// RAM retries when the counter was odd or moved since it entered the
    /// guest.
    pub fn zap_window(&self) -> u64 {
        self.zaps.load(Ordering::SeqCst)
    }

    /// Map the pool's memfd at `file_offset` over `r` and populate the host
    /// page tables, so the guest's accesses need no further host faults.
    pub fn map_frames(&self, r: GpaRange, file_offset: u64) -> Result<(), ViewError> {
        assert!(r.end <= self.span, "map {r:x?} outside the view");
        // SAFETY: `r` is inside our reservation; the memfd outlives the view
        // (the pool is dropped after it).
        let p = unsafe {
            libc::mmap(
                (self.base + r.start) as *mut libc::c_void,
                r.len() as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                self.memfd,
                file_offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(ViewError::Map {
                what: "map",
                gpa: r.start,
                len: r.len(),
                err: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Wake whoever waits on faults in `r`.
    pub fn wake(&self, r: GpaRange) -> Result<(), ViewError> {
        Ok(self.uffd.wake(self.base + r.start, r.len())?)
    }

    /// Resolve faults in `r` with poison markers: the access raises a
    /// machine-check SIGBUS (KVM: on the vCPU thread).
    pub fn poison(&self, r: GpaRange) -> Result<(), ViewError> {
        Ok(self.uffd.poison(self.base + r.start, r.len())?)
    }
}

impl Drop for GuestView {
    fn drop(&mut self) {
        // SAFETY: unmapping our own reservation.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.span as usize) };
    }
}

/// The KVM mapping as an MMU-notifier subscriber.
pub struct KvmMapping {
    view: Arc<GuestView>,
    lock: MmuLock<()>,
}

impl KvmMapping {
    /// Subscriber for `view`.
    pub fn new(view: Arc<GuestView>) -> Self {
        Self {
            view,
            lock: MmuLock::new(()),
        }
    }

    /// Hold the view still until the guard drops: no fault installs into
    /// it and no invalidation zaps it meanwhile (both take this lock), so
    /// /proc/self/maps and pagemap read under it agree with each other.
    pub fn hold(&self) -> MmuGuard<'_, ()> {
        self.lock.lock()
    }

    /// Snapshot to take before resolving a frame for a fault.
    pub fn fault_begin(&self) -> FaultSeq {
        self.lock.fault_begin()
    }

    /// Install `r` (backed by the memfd at `file_offset`) unless an
    /// invalidation overlapping it ran or runs since `seq`. Returns false
    /// when the caller must retry.
    pub fn install(&self, seq: FaultSeq, r: GpaRange, file_offset: u64) -> Result<bool, ViewError> {
        let g = self.lock.lock();
        if g.retry_needed(seq, r) {
            return Ok(false);
        }
        self.view.map_frames(r, file_offset)?;
        drop(g);
        Ok(true)
    }

    /// Install a poison marker for `r` (the page resolved as poisoned)
    /// under the same rule as [`KvmMapping::install`]: not if an
    /// invalidation overlapping it ran or runs since `seq`, because the
    /// answer "poisoned" may be stale by then (a guest reset gives the page
    /// a fresh frame inside such an invalidation). Returns false when the
    /// caller must resolve again.
    pub fn install_poison(&self, seq: FaultSeq, r: GpaRange) -> Result<bool, ViewError> {
        let g = self.lock.lock();
        if g.retry_needed(seq, r) {
            return Ok(false);
        }
        self.view.poison(r)?;
        drop(g);
        Ok(true)
    }
}

impl MmuNotifier for KvmMapping {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        let mut g = self.lock.lock();
        g.invalidate_begin(inv.range);
        if let Err(e) = self.view.zap(inv.range) {
            // The guarantee cannot be kept: stop rather than let the guest
            // keep a translation to a frame that is about to be reused.
            log::error!("cannot unmap {:x?} from the guest: {e}", inv.range);
            std::process::abort();
        }
    }

    /// The view maps base pages (memfd 4 KiB pages, even inside a 2 MiB
    /// extent), so a split changes nothing for KVM outside `changed`: only
    /// those pages are zapped, the others stay reachable. (Zapping them too
    /// would be correct, but on nested-PVM hosts the guest's page tables and
    /// IDT briefly missing from the host makes KVM inject spurious faults.)
    fn invalidate_range_start_split(&self, inv: &Invalidation, changed: GpaRange) {
        let mut g = self.lock.lock();
        g.invalidate_begin(inv.range);
        if let Err(e) = self.view.zap(changed) {
            log::error!("cannot unmap {changed:x?} from the guest: {e}");
            std::process::abort();
        }
    }

    fn invalidate_range_end(&self, _inv: &Invalidation) {
        self.lock.lock().invalidate_end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enomem_from_the_view_names_max_map_count() {
        let e = ViewError::Map {
            what: "zap",
            gpa: 0x1000,
            len: 0x1000,
            err: std::io::Error::from_raw_os_error(libc::ENOMEM),
        };
        let msg = e.to_string();
        assert!(msg.contains("vm.max_map_count = "), "{msg}");
        assert!(msg.contains("sysctl -w vm.max_map_count"), "{msg}");
        let e = ViewError::Map {
            what: "zap",
            gpa: 0,
            len: 0x1000,
            err: std::io::Error::from_raw_os_error(libc::EINVAL),
        };
        assert!(!e.to_string().contains("max_map_count"));
    }

    /// A view of 2 MiB of RAM over a fresh 2 MiB memfd, and its subscriber.
    fn kvm_mapping() -> (Arc<GuestView>, KvmMapping, std::os::fd::OwnedFd) {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        // SAFETY: memfd_create with a NUL-terminated static name.
        let raw = unsafe { libc::memfd_create(c"view-test".as_ptr(), 0) };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: resizing our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 2 << 20) }, 0);
        let ram = [GpaRange::new(0, 2 << 20)];
        let view = Arc::new(GuestView::new(2 << 20, &ram, &[], fd.as_raw_fd()).unwrap());
        (view.clone(), KvmMapping::new(view), fd)
    }

    /// True when the view maps the test memfd at `gpa` (/proc/self/maps;
    /// touching an unpopulated page would block on the userfaultfd).
    fn maps_memfd(view: &GuestView, gpa: u64) -> bool {
        let addr = view.base() + gpa;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines().any(|l| {
            let (lo, hi) = l
                .split_whitespace()
                .next()
                .unwrap()
                .split_once('-')
                .unwrap();
            let lo = u64::from_str_radix(lo, 16).unwrap();
            let hi = u64::from_str_radix(hi, 16).unwrap();
            (lo..hi).contains(&addr) && l.contains("memfd:view-test")
        })
    }

    /// The pager's step 4: `install` must refuse when an invalidation
    /// overlapping the range ran, or still runs, since its `fault_begin` (the
    /// frame it resolved may be gone), and install otherwise.
    #[test]
    fn install_refused_after_an_invalidation_since_fault_begin() {
        use guestmem::notifier::InvalidateReason;
        let (view, kvm, _fd) = kvm_mapping();
        let page = GpaRange::new(0x1000, 0x1000);
        let inv = Invalidation {
            range: GpaRange::new(0, 0x4000),
            reason: InvalidateReason::Migrate,
        };
        // An invalidation that started and ended inside the window.
        let seq = kvm.fault_begin();
        kvm.invalidate_range_start(&inv);
        kvm.invalidate_range_end(&inv);
        assert!(
            !kvm.install(seq, page, 0x1000).unwrap(),
            "installed although an invalidation ran since fault_begin"
        );
        assert!(!maps_memfd(&view, page.start));
        // One still in progress.
        let seq = kvm.fault_begin();
        kvm.invalidate_range_start(&inv);
        assert!(
            !kvm.install(seq, page, 0x1000).unwrap(),
            "installed during an invalidation"
        );
        assert!(!maps_memfd(&view, page.start));
        kvm.invalidate_range_end(&inv);
        // None in the window: installed, and the next invalidation zaps it.
        let seq = kvm.fault_begin();
        assert!(kvm.install(seq, page, 0x1000).unwrap());
        assert!(maps_memfd(&view, page.start));
        kvm.invalidate_range_start(&inv);
        assert!(!maps_memfd(&view, page.start));
        kvm.invalidate_range_end(&inv);
    }

    /// The pager's poison marker follows the same rule: an invalidation
    /// since `fault_begin` (e.g. the guest reset that healed the page)
    /// makes the "poisoned" answer stale, so no marker is installed.
    #[test]
    fn poison_marker_refused_after_an_invalidation_since_fault_begin() {
        use guestmem::notifier::InvalidateReason;
        let (view, kvm, _fd) = kvm_mapping();
        let page = GpaRange::new(0x3000, 0x1000);
        let inv = Invalidation {
            range: GpaRange::new(0, 2 << 20),
            reason: InvalidateReason::Migrate,
        };
        let seq = kvm.fault_begin();
        kvm.invalidate_range_start(&inv);
        kvm.invalidate_range_end(&inv);
        assert!(
            !kvm.install_poison(seq, page).unwrap(),
            "poison marker installed although an invalidation ran since fault_begin"
        );
        assert!(!poisoned(&view, page.start));
        let seq = kvm.fault_begin();
        assert!(kvm.install_poison(seq, page).unwrap());
        assert!(poisoned(&view, page.start));
    }

    /// True when the view's page at `gpa` carries a poison marker: reading
    /// it raises SIGBUS (checked in a child process, which then exits).
    fn poisoned(view: &GuestView, gpa: u64) -> bool {
        let addr = view.base() + gpa;
        // SAFETY: fork in a test; the child only reads one byte and calls
        // _exit (async-signal-safe), the parent waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: reading the view, which stays mapped in the child; a
            // poison marker kills the child with SIGBUS.
            let _ = unsafe { std::ptr::read_volatile(addr as *const u8) };
            // SAFETY: leave the child without running the parent's state.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS
    }
}
