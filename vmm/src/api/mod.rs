//! Control API: HTTP/1.1 + JSON over a Unix socket (`--api-sock PATH`).
//!
//! Firecracker users know the shape: `curl --unix-socket PATH http://localhost/vm`.
//! Errors carry a JSON body `{"fault_message": "..."}`.
//!
//! - [`http`]: a small, strict HTTP/1.1 request parser and response writer.
//! - [`router`]: the route table ([`router::ROUTES`]) and dispatch to a [`VmController`].
//! - [`server`]: [`ApiServer`], an `event_manager::MutEventSubscriber` that owns the
//!   listening socket and the non-blocking client connections.
//! - [`client`]: [`run_ctl`], a blocking client used by `vmm ctl`.
//! - [`cli`]: the clap definitions of `vmm ctl` ([`CtlCommand`]) and [`cli::run`].
//!
//! The API document lives in `docs/openapi.json`; a unit test checks that it lists
//! exactly the routes of [`router::ROUTES`].
//!
//! Adding an endpoint: add a method to [`VmController`], a handler function and one
//! entry in [`router::ROUTES`], and describe it in `docs/openapi.json`.

pub mod cli;
pub mod client;
pub mod http;
pub mod router;
pub mod server;

pub use cli::{CtlArgs, CtlCommand};
pub use client::{run_ctl, ClientError};
pub use server::{ApiServer, ServerError};

use serde::{Deserialize, Serialize};

/// Run state of the VM as reported by `GET /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// The VM is configured but its vCPUs have not started yet.
    NotStarted,
    /// The vCPUs are running guest code.
    Running,
    /// The vCPUs are paused (`PATCH /vm {"state":"Paused"}`).
    Paused,
    /// The guest shut down or crashed; the VMM is exiting.
    Stopped,
}

impl VmState {
    /// Every state, in the order the OpenAPI document lists them.
    pub const ALL: [VmState; 4] = [
        VmState::NotStarted,
        VmState::Running,
        VmState::Paused,
        VmState::Stopped,
    ];
}

/// Body of `GET /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Current run state.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM size in MiB.
    pub mem_mib: u64,
    /// Whether emulation assists are on and how often each was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulation_assists: Option<crate::vstate::assist::AssistCounts>,
}

/// Requested state change, the `state` field of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateRequest {
    /// Pause all vCPUs.
    Paused,
    /// Resume paused vCPUs.
    Resumed,
}

/// Error a controller (or the router) returns; becomes an HTTP status and a
/// `{"fault_message": ...}` body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is invalid (bad JSON, unknown field, missing body, ...).
    #[error("{0}")]
    BadRequest(String),
    /// The request is valid but conflicts with the VM's current state (for example
    /// resuming a VM that is not paused).
    #[error("{0}")]
    Conflict(String),
    /// The request needs a body but carries no `Content-Length`.
    #[error("{0}")]
    LengthRequired(String),
    /// The VM failed to carry out a valid request.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// HTTP status code of this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Conflict(_) => 409,
            ApiError::LengthRequired(_) => 411,
            ApiError::Internal(_) => 500,
        }
    }
}

/// What the API server asks of the VM. The VMM implements it; the server owns it
/// and calls it on the event-loop thread.
pub trait VmController {
    /// State, vCPU count and memory size (`GET /vm`).
    fn vm_info(&self) -> VmInfo;
    /// Pause or resume the vCPUs (`PATCH /vm`).
    fn set_vm_state(&mut self, req: VmStateRequest) -> Result<(), ApiError>;
    /// Memory information (`GET /memory`), returned verbatim as the response body.
    fn memory_info(&self) -> serde_json::Value;
    /// Grow the frame pool to `pool_mib` (`PATCH /memory`).
    fn resize_pool(&mut self, pool_mib: u64) -> Result<(), ApiError> {
        let _ = pool_mib;
        Err(ApiError::BadRequest(
            "this VM has no resizable frame pool".into(),
        ))
    }
    /// Hard or soft poison of a guest page (`POST /memory/poison`).
    fn poison_memory(
        &mut self,
        req: crate::memory::poison::PoisonRequest,
    ) -> Result<serde_json::Value, ApiError> {
        let _ = req;
        Err(ApiError::BadRequest(
            "this VM does not support memory poisoning".into(),
        ))
    }
    /// Run the memory invariant checker (`GET /memory/check`).
    fn check_memory(&self) -> serde_json::Value {
        serde_json::json!({ "ok": false, "problems": ["this VM has no memory checker"] })
    }
    /// Balloon configuration (`GET /balloon`).
    fn balloon_config(&self) -> Result<serde_json::Value, ApiError> {
        Err(no_balloon())
    }
    /// Configure the balloon (`PUT /balloon`, before the guest driver starts).
    fn put_balloon(&mut self, cfg: BalloonConfig) -> Result<(), ApiError> {
        let _ = cfg;
        Err(no_balloon())
    }
    /// New balloon target (`PATCH /balloon`).
    fn patch_balloon(&mut self, amount_mib: u32) -> Result<(), ApiError> {
        let _ = amount_mib;
        Err(no_balloon())
    }
    /// Balloon statistics (`GET /balloon/statistics`).
    fn balloon_stats(&self) -> Result<serde_json::Value, ApiError> {
        Err(no_balloon())
    }
    /// New statistics polling interval (`PATCH /balloon/statistics`).
    fn patch_balloon_stats(&mut self, secs: u16) -> Result<(), ApiError> {
        let _ = secs;
        Err(no_balloon())
    }
    /// Start the guest (`PUT /actions {"action_type": "InstanceStart"}`);
    /// only a VM started with `--wait-for-start` waits for it.
    fn instance_start(&mut self) -> Result<(), ApiError> {
        Err(ApiError::Conflict(
            "the VM has already started (only `vmm run --wait-for-start` waits for InstanceStart)"
                .into(),
        ))
    }
}

/// Why most requests are refused before `InstanceStart`.
pub const NOT_STARTED: &str =
    "the VM has not started; send PUT /actions {\"action_type\": \"InstanceStart\"} first";

pub use crate::devices::virtio::balloon::BalloonConfig;

/// The error of balloon requests on a VM without a balloon device.
pub fn no_balloon() -> ApiError {
    ApiError::BadRequest(
        crate::devices::virtio::balloon::worker::BalloonApiError::NotConfigured.to_string(),
    )
}

impl<T: VmController + ?Sized> VmController for Box<T> {
    fn vm_info(&self) -> VmInfo {
        (**self).vm_info()
    }
    fn set_vm_state(&mut self, req: VmStateRequest) -> Result<(), ApiError> {
        (**self).set_vm_state(req)
    }
    fn memory_info(&self) -> serde_json::Value {
        (**self).memory_info()
    }
    fn resize_pool(&mut self, pool_mib: u64) -> Result<(), ApiError> {
        (**self).resize_pool(pool_mib)
    }
    fn poison_memory(
        &mut self,
        req: crate::memory::poison::PoisonRequest,
    ) -> Result<serde_json::Value, ApiError> {
        (**self).poison_memory(req)
    }
    fn check_memory(&self) -> serde_json::Value {
        (**self).check_memory()
    }
    fn balloon_config(&self) -> Result<serde_json::Value, ApiError> {
        (**self).balloon_config()
    }
    fn put_balloon(&mut self, cfg: BalloonConfig) -> Result<(), ApiError> {
        (**self).put_balloon(cfg)
    }
    fn patch_balloon(&mut self, amount_mib: u32) -> Result<(), ApiError> {
        (**self).patch_balloon(amount_mib)
    }
    fn balloon_stats(&self) -> Result<serde_json::Value, ApiError> {
        (**self).balloon_stats()
    }
    fn patch_balloon_stats(&mut self, secs: u16) -> Result<(), ApiError> {
        (**self).patch_balloon_stats(secs)
    }
    fn instance_start(&mut self) -> Result<(), ApiError> {
        (**self).instance_start()
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A simple in-memory VM model for the API's own tests (the real VM is exercised
    //! by the integration tests that run the `vmm` binary).
    use super::*;

    /// Tracks a run state like the real VM: Running <-> Paused.
    pub struct TestVm {
        pub state: VmState,
        pub vcpus: u32,
        pub mem_mib: u64,
        /// Size of the `memory_info` payload, to exercise large responses.
        pub memory_blob: usize,
    }

    impl TestVm {
        pub fn new() -> Self {
            TestVm {
                state: VmState::Running,
                vcpus: 2,
                mem_mib: 256,
                memory_blob: 0,
            }
        }
    }

    impl VmController for TestVm {
        fn vm_info(&self) -> VmInfo {
            VmInfo {
                state: self.state,
                vcpus: self.vcpus,
                mem_mib: self.mem_mib,
                emulation_assists: None,
            }
        }
        fn set_vm_state(&mut self, req: VmStateRequest) -> Result<(), ApiError> {
            self.state = match (self.state, req) {
                (VmState::Running, VmStateRequest::Paused) => VmState::Paused,
                (VmState::Paused, VmStateRequest::Resumed) => VmState::Running,
                (s, r) => {
                    return Err(ApiError::Conflict(format!(
                        "cannot apply {r:?} to a VM in state {s:?}"
                    )))
                }
            };
            Ok(())
        }
        fn memory_info(&self) -> serde_json::Value {
            serde_json::json!({ "total_mib": self.mem_mib, "blob": "x".repeat(self.memory_blob) })
        }
    }
}
