//! Connects the control API to the running VM: the [`VmController`]
//! implementation on top of [`VmHandle`].

use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use crate::api::{ApiError, ApiServer, ServerError, VmController, VmInfo, VmState, VmStateRequest};
use crate::runner::{RunError, VmHandle};
use crate::vstate::control::Target;

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
}

/// Serve the API on `path` from the event loop `em`.
pub fn serve(
    em: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    path: &Path,
    vm: VmHandle,
) -> Result<(), RunError> {
    let server = ApiServer::new(path, Box::new(VmApi(vm)) as Box<dyn VmController + Send>)
        .map_err(|e| match e {
            ServerError::Io { .. } => RunError::Api(format!("{e}")),
            other => RunError::Api(format!(
                "{other}; choose another --api-sock path or remove the file"
            )),
        })?;
    em.add_subscriber(Arc::new(Mutex::new(server)));
    Ok(())
}
