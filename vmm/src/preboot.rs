//! The API before the guest starts (`vmm run --wait-for-start`), like
//! Firecracker without a config file: the socket is up, nothing
//! guest-visible exists yet, and requests configure what will be built
//! (`PUT /balloon`) until `PUT /actions {"action_type": "InstanceStart"}`.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::api::{no_balloon, ApiError, BalloonConfig, VmController, VmInfo, VmState};
use crate::api::{VmStateRequest, NOT_STARTED};
use crate::memory::poison::PoisonRequest;

/// What the API configured before the start; shared with the runner.
#[derive(Debug, Default)]
pub struct Pending {
    /// The balloon to create at start (`--balloon`, or `PUT /balloon`).
    pub balloon: Option<BalloonConfig>,
    /// Set by `InstanceStart`.
    pub start: bool,
}

/// [`VmController`] of a VM that has not started.
#[derive(Debug)]
pub struct PreBoot {
    vcpus: u32,
    mem_mib: u64,
    pending: Arc<Mutex<Pending>>,
}

impl PreBoot {
    /// A VM of `vcpus` and `mem_mib` with the balloon of the command line;
    /// the runner watches the returned [`Pending`].
    pub fn new(
        vcpus: u32,
        mem_mib: u64,
        balloon: Option<BalloonConfig>,
    ) -> (Self, Arc<Mutex<Pending>>) {
        let pending = Arc::new(Mutex::new(Pending {
            balloon,
            start: false,
        }));
        let p = Self {
            vcpus,
            mem_mib,
            pending: pending.clone(),
        };
        (p, pending)
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn no_balloon_yet() -> ApiError {
    ApiError::BadRequest(
        "no balloon device is configured; create one with PUT /balloon before InstanceStart".into(),
    )
}

fn not_started(what: &str) -> ApiError {
    ApiError::Conflict(format!("{what}: {NOT_STARTED}"))
}

impl VmController for PreBoot {
    fn vm_info(&self) -> VmInfo {
        VmInfo {
            state: VmState::NotStarted,
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            emulation_assists: None,
        }
    }

    fn set_vm_state(&mut self, _req: VmStateRequest) -> Result<(), ApiError> {
        Err(not_started("cannot pause or resume"))
    }

    fn memory_info(&self) -> serde_json::Value {
        serde_json::json!({ "state": "NotStarted", "mem_mib": self.mem_mib })
    }

    fn poison_memory(&mut self, _req: PoisonRequest) -> Result<serde_json::Value, ApiError> {
        Err(not_started("no guest memory to poison yet"))
    }

    fn resize_pool(&mut self, _pool_mib: u64) -> Result<(), ApiError> {
        Err(not_started(
            "no frame pool to grow yet (choose its size with vmm run --mem-pool)",
        ))
    }

    fn balloon_config(&self) -> Result<serde_json::Value, ApiError> {
        let p = self.pending();
        let cfg = p.balloon.as_ref().ok_or_else(no_balloon)?;
        serde_json::to_value(cfg).map_err(|e| ApiError::Internal(e.to_string()))
    }

    fn put_balloon(&mut self, cfg: BalloonConfig) -> Result<(), ApiError> {
        cfg.validate(self.mem_mib)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        self.pending().balloon = Some(cfg);
        Ok(())
    }

    fn patch_balloon(&mut self, amount_mib: u32) -> Result<(), ApiError> {
        let mem_mib = self.mem_mib;
        let mut p = self.pending();
        let b = p.balloon.as_mut().ok_or_else(no_balloon_yet)?;
        let mut next = b.clone();
        next.amount_mib = amount_mib;
        next.validate(mem_mib)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        *b = next;
        Ok(())
    }

    fn balloon_stats(&self) -> Result<serde_json::Value, ApiError> {
        self.pending().balloon.as_ref().ok_or_else(no_balloon)?;
        Err(not_started("no balloon statistics yet"))
    }

    fn patch_balloon_stats(&mut self, secs: u16) -> Result<(), ApiError> {
        let mut p = self.pending();
        p.balloon
            .as_mut()
            .ok_or_else(no_balloon_yet)?
            .stats_polling_interval_s = secs;
        Ok(())
    }

    fn instance_start(&mut self) -> Result<(), ApiError> {
        let mut p = self.pending();
        if p.start {
            return Err(ApiError::Conflict(
                "InstanceStart was already requested".into(),
            ));
        }
        p.start = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(s: &str) -> BalloonConfig {
        BalloonConfig::parse_cli(s).unwrap()
    }

    #[test]
    fn balloon_is_configured_before_start() {
        let (mut p, pending) = PreBoot::new(1, 128, None);
        assert!(p.balloon_config().is_err());
        assert!(p.patch_balloon(8).is_err(), "no device to patch yet");
        p.put_balloon(cfg("amount_mib=16,deflate_on_oom=true"))
            .unwrap();
        p.patch_balloon(32).unwrap();
        p.patch_balloon_stats(2).unwrap();
        let b = pending.lock().unwrap().balloon.clone().unwrap();
        assert_eq!(
            (b.amount_mib, b.stats_polling_interval_s, b.deflate_on_oom),
            (32, 2, true)
        );
        // Too large for the guest: refused, the old value stays.
        assert!(matches!(p.patch_balloon(129), Err(ApiError::BadRequest(_))));
        assert!(matches!(
            p.put_balloon(cfg("amount_mib=200,deflate_on_oom=false")),
            Err(ApiError::BadRequest(_))
        ));
        assert_eq!(
            pending.lock().unwrap().balloon.as_ref().unwrap().amount_mib,
            32
        );
        assert!(matches!(p.balloon_stats(), Err(ApiError::Conflict(_))));
    }

    #[test]
    fn start_once_and_nothing_runs_before() {
        let (mut p, pending) = PreBoot::new(2, 64, None);
        assert_eq!(p.vm_info().state, VmState::NotStarted);
        assert!(matches!(
            p.set_vm_state(VmStateRequest::Paused),
            Err(ApiError::Conflict(_))
        ));
        p.instance_start().unwrap();
        assert!(pending.lock().unwrap().start);
        assert!(matches!(p.instance_start(), Err(ApiError::Conflict(_))));
    }
}
