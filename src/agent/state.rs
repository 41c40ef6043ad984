//! What the agent remembers across restarts: per policy, the last scheduled fire it
//! handled (for catch-up) and the last success. One small JSON file in the state
//! directory, replaced atomically (temp file, fsync, rename, fsync the directory).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// State errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read, parsed or written.
    #[error("agent state {path}: {why}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// One policy's remembered times.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    /// The last backup fire handled.
    #[serde(default)]
    pub last_backup_fire: Option<DateTime<Utc>>,
    /// The last verify fire handled.
    #[serde(default)]
    pub last_verify_fire: Option<DateTime<Utc>>,
    /// A backup fire whose run began and had not ended when the agent last stopped (it
    /// was killed, or the host went down): the catch-up runs it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_short_backup_fire: Option<DateTime<Utc>>,
    /// The same for verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_short_verify_fire: Option<DateTime<Utc>>,
    /// The last successful backup's end.
    #[serde(default)]
    pub last_success: Option<DateTime<Utc>>,
}

#[derive(Default, Serialize, Deserialize)]
struct StateFile {
    policies: BTreeMap<String, PolicyState>,
}

/// The state file and its content.
pub struct AgentState {
    path: PathBuf,
    inner: Mutex<StateFile>,
}

impl AgentState {
    /// Opens (or starts) `dir/agent-state.json`, creating `dir` (0700).
    ///
    /// # Errors
    /// An unreadable or malformed file, or a directory that cannot be made.
    pub fn open(dir: &Path) -> Result<AgentState, StateError> {
        let path = dir.join("agent-state.json");
        let err = |why: String| StateError::Io {
            path: path.clone(),
            why,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let inner = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(AgentState {
            path,
            inner: Mutex::new(inner),
        })
    }

    /// A policy's state.
    pub fn get(&self, policy: &str) -> PolicyState {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .policies
            .get(policy)
            .cloned()
            .unwrap_or_default()
    }

    /// Changes a policy's state and writes the file (a failed write is logged: the agent
    /// goes on; at worst a catch-up runs once more).
    pub fn update(&self, policy: &str, f: impl FnOnce(&mut PolicyState)) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(g.policies.entry(policy.to_string()).or_default());
        if let Err(e) = self.write(&g) {
            tracing::warn!("{e}");
        }
    }

    fn write(&self, s: &StateFile) -> Result<(), StateError> {
        let err = |why: String| StateError::Io {
            path: self.path.clone(),
            why,
        };
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(s).map_err(|e| err(e.to_string()))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
        f.write_all(&body)
            .and_then(|_| f.sync_all())
            .map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| err(e.to_string()))?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let s = AgentState::open(d.path()).unwrap();
        let t = Utc::now();
        s.update("p", |p| p.last_backup_fire = Some(t));
        let again = AgentState::open(d.path()).unwrap();
        assert_eq!(again.get("p").last_backup_fire, Some(t));
        assert_eq!(again.get("other"), PolicyState::default());
        std::fs::write(d.path().join("agent-state.json"), b"{not json").unwrap();
        assert!(AgentState::open(d.path()).is_err());
    }
}
