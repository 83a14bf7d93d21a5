//! Reading a journal without a running agent (`outpost list --offline`, `show --offline`): the
//! same views the API gives, from a read-only open of the file, so a gateway whose agent will
//! not start (or was stopped for maintenance) can still be inspected.

use std::path::Path;

use outpost_shared::definition::{self, Definition};

use crate::actions::Registry;
use crate::api::types::{RunDetail, RunReply};
use crate::api::{self, ApiError};
use crate::journal::{Journal, JournalError, RunRecord};
use crate::runtime::RuntimeError;

/// A journal opened read-only, with the built-in actions to parse its definitions.
pub struct Offline {
    journal: Journal,
    registry: Registry,
    /// The repaired copy read instead of a file that was not closed cleanly (deleted on drop).
    _copy: Option<tempfile::TempDir>,
}

impl Offline {
    /// Opens `path` read-only; refused while an agent has it open. A file the agent did not
    /// close (it was killed, the power went), or one in an older format, is repaired and
    /// upgraded in a temporary copy and that is read: the journal itself is never written.
    /// `copied` is told why when that happens.
    pub fn open(path: &Path, copied: impl FnOnce(&JournalError)) -> Result<Offline, JournalError> {
        let registry = Registry::builtin();
        match Journal::open_read_only(path) {
            Ok(journal) => Ok(Offline {
                journal,
                registry,
                _copy: None,
            }),
            Err(why @ (JournalError::NeedsRepair(_) | JournalError::OlderFormat { .. })) => {
                copied(&why);
                let dir = tempfile::tempdir().map_err(|e| JournalError::Storage(redb::StorageError::Io(e).into()))?;
                let journal = Journal::open_repaired_copy(path, &dir.path().join("journal.redb"))?;
                Ok(Offline {
                    journal,
                    registry,
                    _copy: Some(dir),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Runs as `GET /v1/runs?status=…&limit=…` lists them.
    pub fn list(&self, status: Option<&str>, limit: usize) -> Result<Vec<RunReply>, ApiError> {
        let status = api::parse_status(status)?;
        api::list_rows(&self.journal, status, limit.clamp(1, 100_000), |id, rec| {
            self.detail(id, rec)
        })
    }

    /// A run as `GET /v1/runs/{id}` shows it.
    pub fn show(&self, id: &str) -> Result<RunDetail, ApiError> {
        let rec = self
            .journal
            .run(id)?
            .ok_or_else(|| ApiError::from(RuntimeError::NoSuchRun(id.to_string())))?;
        self.detail(id, &rec)
    }

    fn detail(&self, id: &str, rec: &RunRecord) -> Result<RunDetail, ApiError> {
        let def = self.definition(&rec.workflow, rec.version)?;
        // No runtime: nothing holds the run back but what its own history says.
        api::run_view(&self.journal, &def, id, rec, None, None)
    }

    fn definition(&self, name: &str, version: u32) -> Result<Definition, ApiError> {
        let Some((_, rec)) = self.journal.definition(name, Some(version))? else {
            return Err(RuntimeError::NoSuchWorkflow {
                name: name.to_string(),
                version: Some(version),
            }
            .into());
        };
        Ok(definition::parse(&rec.json, &self.registry).map_err(RuntimeError::from)?)
    }
}
