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
//!
//! plus guestmem's own `check()` and host memory vs. frame counters, both
//! ways (no free frame holds host memory, every allocated frame does; a few
//! MiB of slack for batched releases).

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
    /// Frames allocated or cached by guestmem, in bytes.
    pub accounted_bytes: u64,
    /// What is wrong (at most 32 entries).
    pub problems: Vec<String>,
}

const MAX_PROBLEMS: usize = 32;

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
        fn problem(rep: &mut CheckReport, s: String) {
            if rep.problems.len() < MAX_PROBLEMS {
                rep.problems.push(s);
            }
        }
        if let Err(e) = m.gm.check() {
            problem(&mut rep, format!("guestmem: {e}"));
        }
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
        for r in guestmem::GuestMemoryConfig::x86(self.bytes, 1).ram {
            let mut gpa = r.start;
            while gpa < r.end {
                rep.pages += 1;
                let view = host_offset(gpa);
                rep.view_mapped += u64::from(view.is_some());
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
        let s = m.gm.stats();
        rep.resident_bytes = s.resident_bytes;
        rep.accounted_bytes = (s.allocated + s.pcp_cached) * guestmem::PAGE_SIZE;
        // Free frames must not hold host memory (beyond a small slack for
        // frames whose release is batched).
        let slack = 4 << 20;
        if rep.resident_bytes > rep.accounted_bytes + slack {
            let msg = format!(
                "the pool holds {} KiB of host memory but only {} KiB are allocated",
                rep.resident_bytes >> 10,
                rep.accounted_bytes >> 10
            );
            problem(&mut rep, msg);
        }
        // ... and every allocated frame holds host memory (frames are
        // populated when handed to the guest; cached free frames may not).
        let allocated = s.allocated * guestmem::PAGE_SIZE;
        if allocated > rep.resident_bytes + slack {
            let msg = format!(
                "{} KiB of frames are allocated but the pool holds only {} KiB of host memory",
                allocated >> 10,
                rep.resident_bytes >> 10
            );
            problem(&mut rep, msg);
        }
        rep.ok = rep.problems.is_empty();
        rep
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
