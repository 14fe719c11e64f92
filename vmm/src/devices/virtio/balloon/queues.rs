//! Processing of the balloon's virtqueues. Everything the guest hands over
//! is validated before it touches guest memory accounting:
//!
//! - a chain that loops, points past the queue or is empty is refused whole
//!   (used with length 0 so the driver does not hang) and counted;
//! - a descriptor whose buffer lies outside guest RAM, has the wrong
//!   direction or a bad length is skipped and counted;
//! - a PFN outside guest RAM, already ballooned or listed twice is skipped
//!   and counted on inflate; a PFN not in the balloon is skipped and counted
//!   on deflate. The bitmap guarantees no frame is released twice.
//!
//! Inflated PFNs are sorted and coalesced into runs so one `release_range`
//! covers a whole run (the guest's order does not matter).

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::time::Instant;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::device::Balloon;
use super::PFN_SHIFT;
use crate::memory::dma::DmaError;

const PAGE_SIZE: u64 = 1 << PFN_SHIFT;

/// Largest buffer accepted in one descriptor (64 Ki PFNs = 256 MiB of pages).
pub const MAX_DESC_BYTES: u32 = 256 << 10;

/// What one `release` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Frames freed (host memory returned).
    pub freed: u64,
    /// Pages that had no frame.
    pub unpopulated: u64,
    /// 2 MiB mappings split.
    pub split_huge: u64,
}

/// Gives guest RAM back to the host (guestmem's `release_range`).
pub trait PageReleaser {
    /// Release `[gpa, gpa + len)` (page aligned, inside guest RAM).
    fn release(&self, gpa: u64, len: u64) -> Result<Released, String>;
}

type Mem<'a> = &'a GuestMemoryMmap<()>;

/// A chain's descriptors, or `None` if the chain is malformed.
fn collect(chain: DescriptorChain<Mem<'_>>) -> Option<Vec<Descriptor>> {
    let mut descs = Vec::new();
    let mut open = false;
    for d in chain {
        open = d.has_next();
        descs.push(d);
    }
    // The iterator stops early on a loop (it ran out of TTL), a next index
    // past the queue, or an unreadable descriptor: the last one it yielded
    // then still says "next".
    (!descs.is_empty() && !open).then_some(descs)
}

/// False (and counted) when the available index moved by more than the
/// queue size: the driver is broken and the device needs a reset.
pub fn avail_index_ok(b: &mut Balloon, q: &Queue, mem: Mem<'_>) -> bool {
    match q.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) if (idx - Wrapping(q.next_avail())).0 <= q.size() => true,
        _ => {
            b.counters.bad_avail_index += 1;
            false
        }
    }
}

/// Check, through the device TLB, that every page of `q`'s descriptor
/// table and rings is RAM and not poisoned, faulting them in on the way, so
/// that the ring accesses that follow never meet a poisoned page (which
/// would be a SIGBUS in the VMM). `Err` names the first bad page.
pub fn ring_pages_ok(b: &Balloon, q: &Queue) -> Result<(), DmaError> {
    let Some(dma) = &b.dma else {
        return Ok(());
    };
    let n = u64::from(q.size());
    for (start, len) in [
        (q.desc_table(), 16 * n),
        (q.avail_ring(), 6 + 2 * n),
        (q.used_ring(), 6 + 8 * n),
    ] {
        let mut page = start & !(PAGE_SIZE - 1);
        while page < start.saturating_add(len) {
            dma.read(page.max(start), &mut [0u8])?;
            page += PAGE_SIZE;
        }
    }
    Ok(())
}

fn page_in_ram(mem: Mem<'_>, gpa: u64, len: u64) -> bool {
    usize::try_from(len).is_ok_and(|l| mem.check_range(GuestAddress(gpa), l))
}

/// Read the driver-readable buffers of `descs` (4-byte elements).
fn read_elements(b: &mut Balloon, descs: &[Descriptor], mem: Mem<'_>, elem: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    for d in descs {
        if d.is_write_only() || !d.len().is_multiple_of(elem) || d.len() > MAX_DESC_BYTES {
            b.counters.bad_descriptors += 1;
            continue;
        }
        let at = bytes.len();
        bytes.resize(at + d.len() as usize, 0);
        let ok = match &b.dma {
            Some(dma) => dma.read(d.addr().0, &mut bytes[at..]).is_ok(),
            None => mem.read_slice(&mut bytes[at..], d.addr()).is_ok(),
        };
        if !ok {
            b.counters.bad_descriptors += 1;
            bytes.truncate(at);
        }
    }
    bytes
}

fn finish(q: &mut Queue, mem: Mem<'_>, head: u16) {
    if let Err(e) = q.add_used(mem, head, 0) {
        log::warn!("balloon: cannot return descriptor {head}: {e}");
    }
}

/// Process the inflate (`inflate` = true) or deflate queue. Returns the
/// number of buffers returned to the driver.
pub fn process_pfn_queue(
    b: &mut Balloon,
    q: &mut Queue,
    mem: Mem<'_>,
    rel: &dyn PageReleaser,
    inflate: bool,
) -> usize {
    consume_chains(b, q, mem, |b, descs| {
        let bytes = read_elements(b, &descs, mem, 4);
        let pfns: Vec<u64> = bytes
            .chunks_exact(4)
            .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        if inflate {
            inflate_pfns(b, &pfns, mem, rel);
        } else {
            deflate_pfns(b, &pfns, mem);
        }
    })
}

/// Pop every available chain of `q`, hand the well-formed ones to `f`
/// (malformed chains are counted in `rejected_chains`), and return each to
/// the driver. Returns the number of buffers returned.
fn consume_chains(
    b: &mut Balloon,
    q: &mut Queue,
    mem: Mem<'_>,
    mut f: impl FnMut(&mut Balloon, Vec<Descriptor>),
) -> usize {
    let mut used = 0;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match collect(chain) {
            None => b.counters.rejected_chains += 1,
            Some(descs) => f(b, descs),
        }
        finish(q, mem, head);
        used += 1;
    }
    used
}

/// Put `pfns` into the balloon and release their memory.
pub fn inflate_pfns(b: &mut Balloon, pfns: &[u64], mem: Mem<'_>, rel: &dyn PageReleaser) {
    let mut good = Vec::with_capacity(pfns.len());
    for &pfn in pfns {
        if !page_in_ram(mem, pfn << PFN_SHIFT, 1 << PFN_SHIFT) {
            b.counters.bad_pfns += 1;
        } else if !b.ballooned.set(pfn) {
            b.counters.duplicate_pfns += 1;
        } else {
            good.push(pfn);
        }
    }
    good.sort_unstable();
    let mut i = 0;
    while i < good.len() {
        let mut j = i + 1;
        while j < good.len() && good[j] == good[j - 1] + 1 {
            j += 1;
        }
        let (start, n) = (good[i], (j - i) as u64);
        match release(b, rel, start << PFN_SHIFT, n << PFN_SHIFT) {
            Ok(()) => b.counters.inflated_pages += n,
            Err(()) => {
                for pfn in start..start + n {
                    b.ballooned.clear(pfn);
                }
            }
        }
        i = j;
    }
}

fn release(b: &mut Balloon, rel: &dyn PageReleaser, gpa: u64, len: u64) -> Result<(), ()> {
    let t = Instant::now();
    let r = rel.release(gpa, len);
    b.counters.release_ns += t.elapsed().as_nanos() as u64;
    b.counters.release_calls += 1;
    match r {
        Ok(r) => {
            b.counters.released_frames += r.freed;
            b.counters.unpopulated_pages += r.unpopulated;
            b.counters.split_huge += r.split_huge;
            Ok(())
        }
        Err(e) => {
            log::warn!("balloon: release of {gpa:#x}+{len:#x} refused: {e}");
            b.counters.release_errors += 1;
            Err(())
        }
    }
}

/// Take `pfns` out of the balloon. No host action: the guest's next access
/// faults in a fresh zeroed frame.
pub fn deflate_pfns(b: &mut Balloon, pfns: &[u64], mem: Mem<'_>) {
    for &pfn in pfns {
        if !page_in_ram(mem, pfn << PFN_SHIFT, 1 << PFN_SHIFT) {
            b.counters.bad_pfns += 1;
        } else if b.ballooned.clear(pfn) {
            b.counters.deflated_pages += 1;
        } else {
            b.counters.deflate_not_inflated += 1;
        }
    }
}

/// Process the statistics queue: read the buffer, keep it until the next
/// poll. Returns buffers returned to the driver.
pub fn process_stats_queue(b: &mut Balloon, q: &mut Queue, mem: Mem<'_>) -> usize {
    let mut used = 0;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let Some(descs) = collect(chain) else {
            b.counters.rejected_chains += 1;
            finish(q, mem, head);
            used += 1;
            continue;
        };
        // struct virtio_balloon_stat { le16 tag; le64 val; } __packed
        let bytes = read_elements(b, &descs, mem, 10);
        for e in bytes.chunks_exact(10) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let val = u64::from_le_bytes(e[2..10].try_into().expect("8 bytes"));
            if !b.stats.set(tag, val) {
                b.counters.bad_stats_tags += 1;
            }
        }
        b.counters.stats_updates += 1;
        // Only one buffer is outstanding by protocol; return an older one.
        if let Some(old) = b.stats_desc.replace(head) {
            finish(q, mem, old);
            used += 1;
        }
    }
    used
}

/// Polling timer: hand the statistics buffer back so the driver refills it.
pub fn stats_tick(b: &mut Balloon, q: &mut Queue, mem: Mem<'_>) -> usize {
    match b.stats_desc.take() {
        Some(head) => {
            finish(q, mem, head);
            1
        }
        None => 0,
    }
}

/// Process the free page reporting queue: every descriptor is a range of
/// free guest RAM (Linux adds them device-writable; either direction is
/// accepted). The ranges are released but stay guest RAM.
pub fn process_reporting_queue(
    b: &mut Balloon,
    q: &mut Queue,
    mem: Mem<'_>,
    rel: &dyn PageReleaser,
) -> usize {
    let page = 1u64 << PFN_SHIFT;
    consume_chains(b, q, mem, |b, descs| {
        for d in descs {
            let (gpa, len) = (d.addr().0, u64::from(d.len()));
            if !gpa.is_multiple_of(page)
                || !len.is_multiple_of(page)
                || len == 0
                || !page_in_ram(mem, gpa, len)
            {
                b.counters.bad_descriptors += 1;
                continue;
            }
            if release(b, rel, gpa, len).is_ok() {
                b.counters.reported_ranges += 1;
                b.counters.reported_pages += len / page;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::balloon::BalloonConfig;
    use std::cell::RefCell;

    struct Recorder(RefCell<Vec<(u64, u64)>>);
    impl PageReleaser for Recorder {
        fn release(&self, gpa: u64, len: u64) -> Result<Released, String> {
            self.0.borrow_mut().push((gpa, len));
            Ok(Released {
                freed: len >> PFN_SHIFT,
                ..Default::default()
            })
        }
    }

    fn setup() -> (Balloon, GuestMemoryMmap<()>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let cfg = BalloonConfig::parse_cli("amount_mib=1").unwrap();
        (Balloon::new(cfg, 4096), mem)
    }

    #[test]
    fn inflate_coalesces_and_skips_bad_pfns() {
        let (mut b, mem) = setup();
        let rec = Recorder(RefCell::new(Vec::new()));
        // Descending like Linux, one duplicate, one past RAM, one hole.
        inflate_pfns(&mut b, &[103, 102, 101, 100, 102, 5000, 200], &mem, &rec);
        assert_eq!(
            *rec.0.borrow(),
            vec![(100 << 12, 4 << 12), (200 << 12, 1 << 12)]
        );
        assert_eq!(b.counters.inflated_pages, 5);
        assert_eq!(b.counters.duplicate_pfns, 1);
        assert_eq!(b.counters.bad_pfns, 1);
        // Already ballooned: nothing released again.
        inflate_pfns(&mut b, &[100, 200], &mem, &rec);
        assert_eq!(rec.0.borrow().len(), 2);
        assert_eq!(b.counters.duplicate_pfns, 3);
        deflate_pfns(&mut b, &[100, 100, 7, 99999], &mem);
        assert_eq!(b.counters.deflated_pages, 1);
        assert_eq!(b.counters.deflate_not_inflated, 2);
        assert_eq!(b.counters.bad_pfns, 2);
        assert_eq!(b.ballooned.count(), 4);
    }
}
