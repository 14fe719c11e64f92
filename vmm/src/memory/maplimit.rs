//! Guard for `vm.max_map_count`: 4 KiB changes inside populated extents
//! (balloon releases, poison, soft offline) split the guest view's host
//! mappings, and a zap that cannot map aborts the VMM (docs/memory.md,
//! "Known limit"). Before such a change the VMM asks [`MapBudget::check`];
//! near the limit the change is refused instead (the balloon keeps the
//! page, the API answers 409), so guest-driven ballooning cannot take the
//! VMM down.

use std::sync::atomic::{AtomicU64, Ordering};

/// Mappings kept in reserve: a refused change costs nothing, an mmap that
/// fails in a zap costs the VM. One change adds at most two mappings.
pub const MARGIN: u64 = 4096;
/// Count the real mappings every this many checks (reading
/// /proc/self/maps costs ~1 ms per 10 000 mappings); every check once the
/// count passed half the limit.
const CHECK_EVERY: u64 = 64;

/// See the module docs.
#[derive(Debug)]
pub struct MapBudget {
    max: u64,
    calls: AtomicU64,
    /// Last count of this process's mappings.
    last: AtomicU64,
}

/// Mappings of this process (lines of /proc/self/maps).
pub fn count_mappings() -> u64 {
    std::fs::read("/proc/self/maps")
        .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        .unwrap_or(0)
}

impl MapBudget {
    /// A budget against the host's `vm.max_map_count` (65530 if unreadable).
    pub fn from_host() -> Self {
        let max = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(65530);
        Self::with_max(max)
    }

    /// A budget against `max` mappings.
    pub fn with_max(max: u64) -> Self {
        Self {
            max,
            calls: AtomicU64::new(0),
            last: AtomicU64::new(0),
        }
    }

    /// Ok when one more split of the view is safe; otherwise why not, with
    /// the fix.
    pub fn check(&self) -> Result<(), String> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.load(Ordering::Relaxed);
        if n.is_multiple_of(CHECK_EVERY) || last * 2 >= self.max {
            last = count_mappings();
            self.last.store(last, Ordering::Relaxed);
        }
        if last + MARGIN >= self.max {
            return Err(format!(
                "the VMM has {last} host mappings, close to vm.max_map_count = {}: 4 KiB \
                 changes would split the guest view further; raise it (e.g. `sysctl -w \
                 vm.max_map_count=1048576`)",
                self.max
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_near_the_limit_and_says_how_to_fix() {
        let now = count_mappings();
        assert!(now > 0, "reads /proc/self/maps");
        assert!(MapBudget::with_max(now + 10 * MARGIN).check().is_ok());
        let near = MapBudget::with_max(now + MARGIN / 2);
        let e = near.check().unwrap_err();
        assert!(e.contains("vm.max_map_count"), "{e}");
        // Once past half the limit every check counts again.
        for _ in 0..3 {
            assert!(near.check().is_err());
        }
    }
}
