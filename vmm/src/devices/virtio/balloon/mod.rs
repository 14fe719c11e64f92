//! The virtio memory balloon (virtio 1.2 §5.5) on the virtio-mmio transport.
//!
//! - [`device`]: configuration space, features, queue roles, counters.
//! - [`queues`]: inflate / deflate / statistics / free-page-reporting queue
//!   processing, with validation of everything the guest hands over.
//! - [`worker`]: ioeventfds, irqfd, the stats timer and the event-loop
//!   subscriber; [`BalloonHandle`] is what the API uses.
//!
//! Memory: an inflated page (and a reported range) is given back with
//! `guestmem::GuestMemory::release_range`, which brackets the unmap with
//! `invalidate_range_start/end`, frees the frames and punches the memfd, so
//! the VMM's RSS drops. A deflated page needs no host action: the guest's
//! next access faults in a fresh zeroed frame. A bitmap of ballooned PFNs
//! catches duplicates and deflates of pages never inflated, so nothing is
//! released twice.

pub mod device;
pub mod queues;
pub mod worker;

use serde::{Deserialize, Serialize};

pub use device::{Balloon, BalloonCounters, GuestStats};
pub use worker::{BalloonHandle, BalloonWorker};

/// Virtio device id of the balloon.
pub const BALLOON_DEVICE_ID: u32 = 5;
/// Feature: the host must be told before pages are used (not offered).
pub const F_MUST_TELL_HOST: u32 = 0;
/// Feature: statistics virtqueue.
pub const F_STATS_VQ: u32 = 1;
/// Feature: the guest may deflate when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// Feature: free page reporting virtqueue.
pub const F_REPORTING: u32 = 5;
/// Feature: virtio 1.x.
pub const F_VERSION_1: u32 = 32;
/// Balloon pages are always 4 KiB (VIRTIO_BALLOON_PFN_SHIFT).
pub const PFN_SHIFT: u32 = 12;
/// Queue size offered for every balloon queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of MiB in 4 KiB pages.
pub const PAGES_PER_MIB: u64 = 256;

/// Kernel command-line fragment that registers the device for Linux guests
/// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
pub fn linux_cmdline_fragment(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// Balloon configuration: `PUT /balloon` body, `GET /balloon` response and
/// `--balloon` (field names as Firecracker's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Statistics polling interval in seconds; 0 disables the statistics
    /// queue (it cannot be switched on or off after boot).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Offer VIRTIO_BALLOON_F_PAGE_REPORTING.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Firecracker's free page hinting: not implemented; only `false` is
    /// accepted so scripts that send it explicitly keep working.
    #[serde(default, skip_serializing)]
    pub free_page_hinting: bool,
}

/// Errors in a balloon configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonConfigError {
    /// A `--balloon` item is not `key=value` or names an unknown key.
    #[error("--balloon: unknown or malformed item {0:?}; expected amount_mib=N,deflate_on_oom=true|false[,stats_polling_interval_s=N][,free_page_reporting=true|false]")]
    BadItem(String),
    /// A value does not parse.
    #[error("--balloon: bad value for {key}: {value:?} ({why})")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        why: &'static str,
    },
    /// amount_mib is missing.
    #[error("--balloon: amount_mib=N is required")]
    MissingAmount,
    /// The target is larger than guest RAM.
    #[error(
        "balloon amount_mib {amount} is larger than guest RAM ({mem} MiB); choose at most {mem}"
    )]
    TooLarge {
        /// Requested MiB.
        amount: u64,
        /// Guest RAM in MiB.
        mem: u64,
    },
    /// Free page hinting was requested.
    #[error("free_page_hinting is not supported by this VMM; use free_page_reporting instead")]
    Hinting,
}

impl BalloonConfig {
    /// Parse the `--balloon` value:
    /// `amount_mib=N,deflate_on_oom=BOOL[,stats_polling_interval_s=N][,free_page_reporting=BOOL]`.
    pub fn parse_cli(s: &str) -> Result<Self, BalloonConfigError> {
        fn boolean(key: &'static str, v: &str) -> Result<bool, BalloonConfigError> {
            match v {
                "true" | "1" | "on" => Ok(true),
                "false" | "0" | "off" => Ok(false),
                _ => Err(BalloonConfigError::BadValue {
                    key,
                    value: v.into(),
                    why: "want true or false",
                }),
            }
        }
        let mut amount = None;
        let mut cfg = BalloonConfig {
            amount_mib: 0,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_reporting: false,
            free_page_hinting: false,
        };
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| BalloonConfigError::BadItem(item.into()))?;
            match k {
                "amount_mib" => {
                    amount = Some(v.parse().map_err(|_| BalloonConfigError::BadValue {
                        key: "amount_mib",
                        value: v.into(),
                        why: "want a number of MiB",
                    })?)
                }
                "deflate_on_oom" => cfg.deflate_on_oom = boolean("deflate_on_oom", v)?,
                "free_page_reporting" => {
                    cfg.free_page_reporting = boolean("free_page_reporting", v)?
                }
                "free_page_hinting" => cfg.free_page_hinting = boolean("free_page_hinting", v)?,
                "stats_polling_interval_s" => {
                    cfg.stats_polling_interval_s =
                        v.parse().map_err(|_| BalloonConfigError::BadValue {
                            key: "stats_polling_interval_s",
                            value: v.into(),
                            why: "want seconds (0..=65535)",
                        })?
                }
                _ => return Err(BalloonConfigError::BadItem(item.into())),
            }
        }
        cfg.amount_mib = amount.ok_or(BalloonConfigError::MissingAmount)?;
        Ok(cfg)
    }

    /// Check against the guest's RAM size.
    pub fn validate(&self, mem_mib: u64) -> Result<(), BalloonConfigError> {
        if self.free_page_hinting {
            return Err(BalloonConfigError::Hinting);
        }
        if u64::from(self.amount_mib) > mem_mib {
            return Err(BalloonConfigError::TooLarge {
                amount: self.amount_mib.into(),
                mem: mem_mib,
            });
        }
        Ok(())
    }

    /// Features the device offers for this configuration.
    pub fn features(&self) -> u64 {
        let mut f = 1u64 << F_VERSION_1;
        if self.stats_polling_interval_s > 0 {
            f |= 1 << F_STATS_VQ;
        }
        if self.deflate_on_oom {
            f |= 1 << F_DEFLATE_ON_OOM;
        }
        if self.free_page_reporting {
            f |= 1 << F_REPORTING;
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_and_rejects() {
        let c = BalloonConfig::parse_cli(
            "amount_mib=64,deflate_on_oom=true,stats_polling_interval_s=2,free_page_reporting=on",
        )
        .unwrap();
        assert_eq!(c.amount_mib, 64);
        assert!(c.deflate_on_oom && c.free_page_reporting);
        assert_eq!(c.stats_polling_interval_s, 2);
        assert_eq!(
            c.features(),
            (1 << 32) | (1 << F_STATS_VQ) | (1 << F_DEFLATE_ON_OOM) | (1 << F_REPORTING)
        );
        assert_eq!(
            BalloonConfig::parse_cli("deflate_on_oom=true"),
            Err(BalloonConfigError::MissingAmount)
        );
        assert!(matches!(
            BalloonConfig::parse_cli("amount_mib=x"),
            Err(BalloonConfigError::BadValue { .. })
        ));
        assert!(matches!(
            BalloonConfig::parse_cli("amount=1"),
            Err(BalloonConfigError::BadItem(_))
        ));
        let c = BalloonConfig::parse_cli("amount_mib=300").unwrap();
        assert!(matches!(
            c.validate(256),
            Err(BalloonConfigError::TooLarge { .. })
        ));
        assert_eq!(c.features(), 1 << 32);
    }

    #[test]
    fn json_matches_firecracker_fields() {
        let c: BalloonConfig =
            serde_json::from_str(r#"{"amount_mib":8,"deflate_on_oom":false}"#).unwrap();
        assert_eq!(c.stats_polling_interval_s, 0);
        let v = serde_json::to_value(&c).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "amount_mib",
                "deflate_on_oom",
                "free_page_reporting",
                "stats_polling_interval_s"
            ]
        );
        assert!(serde_json::from_str::<BalloonConfig>(
            r#"{"amount_mib":8,"deflate_on_oom":false,"bogus":1}"#
        )
        .is_err());
    }
}
