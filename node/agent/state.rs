//! The last config a node acknowledged to its controller, kept in the
//! state directory so that a restart while the controller is unreachable
//! comes back serving it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "last-acked.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastAcked {
    pub version: u64,
    /// "sha256:…" of `config`, as the controller computed it.
    pub checksum: String,
    /// The store of the controller that numbered the version (empty in
    /// files written before stores had an identity).
    #[serde(default)]
    pub store_id: String,
    /// The pushed text (traffic sections only).
    pub config: String,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// `Ok(None)` when the node never acknowledged a push.
pub fn load(state_dir: &Path) -> Result<Option<LastAcked>, String> {
    let path = path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let state: LastAcked = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is damaged: {e}", path.display()))?;
    if crate::config::content_version(&state.config) != state.checksum {
        return Err(format!(
            "{}: the config does not match its checksum",
            path.display()
        ));
    }
    Ok(Some(state))
}

impl LastAcked {
    pub fn controller_version(&self) -> crate::events::ControllerVersion {
        crate::events::ControllerVersion {
            number: self.version,
            checksum: self.checksum.clone(),
            store_id: self.store_id.clone(),
        }
    }
}

/// Replaces the state atomically: a crash leaves the old file or the new
/// one, never a torn one.
pub fn save(state_dir: &Path, state: &LastAcked) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let contents = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    crate::durable::replace_file(&path(state_dir), &contents)
}
