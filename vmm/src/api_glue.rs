//! Connects the control API to the running VM: the [`VmController`]
//! implementation on top of [`VmHandle`].

use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use crate::api::{ApiError, ApiServer, ServerError, VmController, VmInfo, VmState, VmStateRequest};
use crate::memory::poison::{PoisonError, PoisonRequest};
use crate::runner::{RunError, VmHandle};
use crate::vstate::control::Target;
use crate::vstate::mce::McAction;

/// The controller the API server calls (on the event-loop thread).
pub struct VmApi(pub VmHandle);

impl VmController for VmApi {
    fn vm_info(&self) -> VmInfo {
        let state = match self.0.control.target() {
            Target::Run => VmState::Running,
            Target::Pause => VmState::Paused,
            Target::Stop => VmState::Stopped,
        };
        VmInfo {
            state,
            vcpus: self.0.vcpus,
            mem_mib: self.0.mem_mib,
            emulation_assists: Some(self.0.assists.counts()),
        }
    }

    fn set_vm_state(&mut self, req: VmStateRequest) -> Result<(), ApiError> {
        match (req, self.0.control.target()) {
            (_, Target::Stop) => Err(ApiError::Conflict("the VM is stopping".into())),
            (VmStateRequest::Paused, Target::Pause) => {
                Err(ApiError::Conflict("the VM is already paused".into()))
            }
            (VmStateRequest::Resumed, Target::Run) => {
                Err(ApiError::Conflict("the VM is not paused".into()))
            }
            (VmStateRequest::Paused, _) => {
                self.0.threads.pause(&self.0.control);
                Ok(())
            }
            (VmStateRequest::Resumed, _) => {
                self.0.control.resume();
                Ok(())
            }
        }
    }

    fn memory_info(&self) -> serde_json::Value {
        self.0.ram.info()
    }

    fn resize_pool(&mut self, pool_mib: u64) -> Result<(), ApiError> {
        self.0
            .ram
            .grow_pool(pool_mib)
            .map(|_| ())
            .map_err(|e| ApiError::BadRequest(e.to_string()))
    }

    fn poison_memory(&mut self, req: PoisonRequest) -> Result<serde_json::Value, ApiError> {
        let report = self.0.ram.poison(req).map_err(|e| match e {
            PoisonError::Failure(_) | PoisonError::Populate { .. } | PoisonError::MapLimit(_) => {
                ApiError::Conflict(e.to_string())
            }
            _ => ApiError::BadRequest(e.to_string()),
        })?;
        if let (true, Some(gpa)) = (report.inject_now, report.gpa) {
            // A scrubber found it: report it at once, on vCPU 0 (and, for
            // Intel-style MCA, the broadcast on the others).
            let kicked = self.0.mce.queue_for(0, McAction::Optional, gpa);
            self.0
                .mce
                .kick_until_taken(&kicked, std::time::Duration::from_millis(100));
        }
        serde_json::to_value(&report).map_err(|e| ApiError::Internal(e.to_string()))
    }

    fn balloon_config(&self) -> Result<serde_json::Value, ApiError> {
        serde_json::to_value(self.balloon()?.config())
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    fn put_balloon(&mut self, cfg: crate::api::BalloonConfig) -> Result<(), ApiError> {
        self.balloon()?.put(cfg).map_err(balloon_err)
    }

    fn patch_balloon(&mut self, amount_mib: u32) -> Result<(), ApiError> {
        self.balloon()?.set_target(amount_mib).map_err(balloon_err)
    }

    fn balloon_stats(&self) -> Result<serde_json::Value, ApiError> {
        let s = self.balloon()?.stats().map_err(balloon_err)?;
        serde_json::to_value(s).map_err(|e| ApiError::Internal(e.to_string()))
    }

    fn patch_balloon_stats(&mut self, secs: u16) -> Result<(), ApiError> {
        self.balloon()?
            .set_stats_interval(secs)
            .map_err(balloon_err)
    }

    fn check_memory(&self) -> serde_json::Value {
        serde_json::to_value(self.0.ram.check())
            .unwrap_or_else(|e| serde_json::json!({ "ok": false, "problems": [e.to_string()] }))
    }
}

impl VmApi {
    fn balloon(&self) -> Result<&crate::devices::virtio::balloon::BalloonHandle, ApiError> {
        self.0.balloon.as_ref().ok_or_else(crate::api::no_balloon)
    }
}

fn balloon_err(e: crate::devices::virtio::balloon::worker::BalloonApiError) -> ApiError {
    // Firecracker answers every refused balloon request with 400.
    ApiError::BadRequest(e.to_string())
}

/// The API server as the event loop holds it; the runner swaps its
/// controller when the VM starts (`--wait-for-start`).
pub type SharedServer = Arc<Mutex<ApiServer<Box<dyn VmController + Send>>>>;

/// Serve the API on `path` from the event loop `em` with `controller`.
pub fn serve(
    em: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    path: &Path,
    controller: Box<dyn VmController + Send>,
) -> Result<SharedServer, RunError> {
    let server = ApiServer::new(path, controller).map_err(|e| match e {
        ServerError::Io { .. } => RunError::Api(format!("{e}")),
        other => RunError::Api(format!(
            "{other}; choose another --api-sock path or remove the file"
        )),
    })?;
    let server = Arc::new(Mutex::new(server));
    em.add_subscriber(server.clone());
    Ok(server)
}
