//! Invariant checker across the three views of guest memory:
//! guestmem's primary map, the shadow EPT, and what the host really maps in
//! the guest view (from /proc/self/maps, i.e. what KVM can reach).
//!
//! Checked per 4 KiB page of guest RAM:
//! - a shadow entry exists ⇒ guestmem maps the page to the same frame, the
//!   frame is not poisoned, and the view maps the memfd at exactly that
//!   frame's offset;
//! - no shadow entry ⇒ the view maps no frame there (the guest cannot reach
//!   the page without a fault);
//! - where the view maps no memfd page, /proc/self/pagemap shows no page
//!   present either: a write KVM let through into such a hole would land in
//!   host memory guestmem does not own and be lost at the next fault;
//! - where the view maps a frame, that frame holds host memory (the view
//!   maps with `MAP_POPULATE`, and a frame is punched only after the view
//!   dropped it);
//!
//! plus guestmem's own checks, including its exact host-memory rules (no
//! slack): no frame out of use (free, cached on a per-vCPU list, retired)
//! holds host memory, so the pool holds at most the frames in use. Each
//! frame that breaks them is listed.
//!
//! The pieces are read one after the other while the guest runs, under the
//! same protocol as the changes they check, so a check never reports a
//! problem that is only a change caught half way:
//! - guestmem's changes are held off (`GuestMemory::hold_changes`, its ops
//!   lock): no release, reset, memory failure, soft offline or zero-page
//!   reclaim (the pager's OOM path) runs, so the primary map, the shadow
//!   EPT and the view only gain mappings meanwhile;
//! - the view is held still (`KvmMapping::hold`, the lock its faults
//!   install under and its invalidations zap under): /proc/self/maps and
//!   pagemap are one picture, and a fault's `MAP_POPULATE` is complete (a
//!   fault resolved meanwhile waits to install: its shadow entry may be
//!   there without the view's, which is not a problem).
//!
//! Lock order: ops, then the view's lock, then guestmem's space lock (in
//! its checker); nobody takes ops or the space lock holding the view's.

use std::os::fd::AsRawFd;

use serde::Serialize;

use super::GuestRam;

/// Result of [`GuestRam::check`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// True when no problem was found.
    pub ok: bool,
    /// Pages of RAM examined.
    pub pages: u64,
    /// Pages with a shadow entry.
    pub ept_mapped: u64,
    /// Pages the view maps to a frame.
    pub view_mapped: u64,
    /// Pages present in the view (pagemap) outside any memfd mapping.
    pub stray_pages: u64,
    /// Host memory held by the pool (bytes).
    pub resident_bytes: u64,
    /// Frames in use (allocated, mapped ones included), in bytes: the most
    /// host memory the pool may hold.
    pub accounted_bytes: u64,
    /// What is wrong (at most 32 entries).
    pub problems: Vec<String>,
}

const MAX_PROBLEMS: usize = 32;

/// Record a problem (the first [`MAX_PROBLEMS`] are kept).
fn problem(rep: &mut CheckReport, s: String) {
    if rep.problems.len() < MAX_PROBLEMS {
        rep.problems.push(s);
    }
}

struct HostMapping {
    start: u64,
    end: u64,
    offset: u64,
}

/// Present bits (pagemap bit 63) of the pages in `[start, start + pages * 4 KiB)`
/// of this process.
fn present_pages(start: u64, pages: u64) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let mut out = Vec::with_capacity(pages as usize);
    let mut buf = vec![0u8; 8 * 4096];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(4096);
        let chunk = &mut buf[..(n * 8) as usize];
        f.read_exact_at(chunk, (start / guestmem::PAGE_SIZE + done) * 8)?;
        out.extend(chunk.chunks_exact(8).map(|e| e[7] & 0x80 != 0));
        done += n;
    }
    Ok(out)
}

/// The memfd mappings of the view: (start, end, file offset).
fn memfd_mappings(inode: u64, lo: u64, hi: u64) -> std::io::Result<Vec<HostMapping>> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(off), Some(_dev), Some(ino)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if ino.parse::<u64>().ok() != Some(inode) {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset)) = (
            u64::from_str_radix(a, 16),
            u64::from_str_radix(b, 16),
            u64::from_str_radix(off, 16),
        ) else {
            continue;
        };
        if end > lo && start < hi {
            out.push(HostMapping { start, end, offset });
        }
    }
    out.sort_by_key(|m| m.start);
    Ok(out)
}

impl GuestRam {
    /// Compare guestmem, the shadow EPT and the host's view mappings.
    pub fn check(&self) -> CheckReport {
        let Some(m) = &self.managed else {
            return CheckReport {
                ok: true,
                problems: vec!["anonymous backing: nothing to check".into()],
                ..Default::default()
            };
        };
        let mut rep = CheckReport::default();
        // See the module docs: no change of the primary map but population
        // and no change of the view until the report is complete.
        let held = m.gm.hold_changes();
        let _view = m.pager.kvm.hold();
        // SAFETY: fstat on the pool's descriptor into a zeroed stat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and buffer.
        if unsafe { libc::fstat(m.gm.pool().fd().as_raw_fd(), &mut st) } != 0 {
            problem(
                &mut rep,
                format!("fstat of the pool: {}", std::io::Error::last_os_error()),
            );
        }
        let base = m.view.base();
        let span_end = m.gm.ram_end();
        let maps = match memfd_mappings(st.st_ino, base, base + span_end) {
            Ok(v) => v,
            Err(e) => {
                problem(&mut rep, format!("cannot read /proc/self/maps: {e}"));
                Vec::new()
            }
        };
        let pool = m.gm.pool();
        let pool_base = pool.host_addr(0);
        let host_offset = |gpa: u64| -> Option<u64> {
            let h = base + gpa;
            let i = maps.partition_point(|x| x.end <= h);
            maps.get(i)
                .filter(|x| x.start <= h)
                .map(|x| x.offset + (h - x.start))
        };
        let present = match present_pages(base, span_end / guestmem::PAGE_SIZE) {
            Ok(v) => v,
            Err(e) => {
                problem(&mut rep, format!("cannot read /proc/self/pagemap: {e}"));
                Vec::new()
            }
        };
        // After the view's mappings were read: a frame mapped then holds
        // host memory now (nothing was invalidated meanwhile, see the
        // module docs).
        let host = match held.check_host_memory() {
            Ok(h) => {
                Self::host_memory_problems(&h, &mut rep);
                h
            }
            Err(e) => {
                problem(&mut rep, format!("guestmem: {e}"));
                guestmem::HostMemory::default()
            }
        };
        for r in guestmem::GuestMemoryConfig::x86(self.bytes, 1).ram {
            let mut gpa = r.start;
            while gpa < r.end {
                rep.pages += 1;
                let view = host_offset(gpa);
                rep.view_mapped += u64::from(view.is_some());
                if let Some(off) = view {
                    let frame = off >> guestmem::PAGE_SHIFT;
                    if host.holds.get(frame as usize) == Some(&false) {
                        problem(
                            &mut rep,
                            format!("gpa {gpa:#x}: the view maps frame {frame}, which holds no host memory"),
                        );
                    }
                }
                let idx = (gpa / guestmem::PAGE_SIZE) as usize;
                if view.is_none() && present.get(idx).copied().unwrap_or(false) {
                    rep.stray_pages += 1;
                    problem(
                        &mut rep,
                        format!("gpa {gpa:#x}: a host page outside guestmem is present in the guest view"),
                    );
                }
                match m.ept.peek(gpa) {
                    Some((t, _)) => {
                        rep.ept_mapped += 1;
                        let host = t.host_addr_of(gpa);
                        let ept_offset = host - pool_base;
                        match m.gm.lookup(gpa) {
                            Some(p) if p.host_addr + (gpa - p.gpa) == host => {}
                            Some(p) => problem(
                                &mut rep,
                                format!("gpa {gpa:#x}: shadow EPT maps host {host:#x}, guestmem maps {:#x}", p.host_addr + (gpa - p.gpa)),
                            ),
                            None => problem(&mut rep, format!("gpa {gpa:#x}: shadow entry but guestmem has no mapping")),
                        }
                        let frame = (ept_offset >> guestmem::PAGE_SHIFT) as guestmem::FrameId;
                        if m.gm.allocator().desc(frame).has(guestmem::frame::HWPOISON) {
                            problem(
                                &mut rep,
                                format!(
                                    "gpa {gpa:#x}: shadow entry points at poisoned frame {frame}"
                                ),
                            );
                        }
                        if let Some(off) = view {
                            if off != ept_offset {
                                problem(&mut rep, format!("gpa {gpa:#x}: KVM reaches memfd offset {off:#x}, shadow EPT says {ept_offset:#x}"));
                            }
                        }
                    }
                    None => {
                        if let Some(off) = view {
                            problem(&mut rep, format!("gpa {gpa:#x}: KVM reaches memfd offset {off:#x} without a shadow entry"));
                        }
                    }
                }
                gpa += guestmem::PAGE_SIZE;
            }
        }
        rep.ok = rep.problems.is_empty();
        rep
    }

    /// guestmem's exact host-memory rules, one problem per frame that
    /// breaks them (up to the report's limit) plus the totals.
    fn host_memory_problems(h: &guestmem::HostMemory, rep: &mut CheckReport) {
        rep.resident_bytes = h.resident_bytes;
        rep.accounted_bytes = h.in_use_frames * guestmem::PAGE_SIZE;
        let stray_with = |used| h.stray.iter().filter(|s| s.1 == used).count();
        if !h.stray.is_empty() {
            problem(
                rep,
                format!(
                    "{} frames out of use hold {} KiB of host memory (retired: {}, free: {}, \
                     per-vCPU lists: {}); a frame leaving use must be punched",
                    h.stray.len(),
                    (h.stray.len() as u64 * guestmem::PAGE_SIZE) >> 10,
                    stray_with(guestmem::FrameUse::Retired),
                    stray_with(guestmem::FrameUse::Free),
                    stray_with(guestmem::FrameUse::PerCpuList),
                ),
            );
        }
        if rep.resident_bytes > rep.accounted_bytes {
            problem(
                rep,
                format!(
                    "the pool holds {} KiB of host memory but only {} KiB are allocated",
                    rep.resident_bytes >> 10,
                    rep.accounted_bytes >> 10
                ),
            );
        }
        for (frame, used) in &h.stray {
            problem(
                rep,
                format!("frame {frame} is out of use ({used:?}) but holds host memory"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::present_pages;

    #[test]
    fn pagemap_shows_touched_pages_only() {
        let pages = 8u64;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (pages * 4096) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: inside the mapping just created.
        unsafe { p.cast::<u8>().add(3 * 4096).write_volatile(1) };
        let v = present_pages(p as u64, pages).unwrap();
        // SAFETY: the mapping created above.
        unsafe { libc::munmap(p, (pages * 4096) as usize) };
        assert_eq!(v, [false, false, false, true, false, false, false, false]);
    }
}
