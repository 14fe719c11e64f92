//! Connects the control API to the running VM.

use std::path::Path;

use event_manager::EventManager;

use crate::runner::{RunError, VmHandle};

/// Serve the API on `path` from the event loop.
pub fn serve<S>(_em: &mut EventManager<S>, path: &Path, _vm: VmHandle) -> Result<(), RunError> {
    Err(RunError::Api(format!(
        "{}: the API server is not wired in yet",
        path.display()
    )))
}
