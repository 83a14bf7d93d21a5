//! Retention inside the journal: deleting finished runs by age and over a size budget (never an
//! event the cloud has not acknowledged), old applied-command rows, and definition versions no
//! run uses.

use std::collections::{HashMap, HashSet};

use redb::ReadableTable;

use super::tables::{
    COMMAND_INDEX, PRUNED_THROUGH, Tables, command_index_key, decode_run, read_history, remove_history,
};
use super::{JournalError, Pruned, Retention};

/// Deletes finished runs: all that finished before the cut-off, then the oldest while the
/// database is over its size budget. Never an event the cloud has not acknowledged.
pub(super) fn prune(t: &mut Tables, policy: Retention, in_use: u64) -> Result<Pruned, JournalError> {
    let mut done = Pruned {
        bytes_before: in_use,
        ..Pruned::default()
    };
    let mut finished: Vec<(u64, String)> = Vec::new();
    for row in t.runs.iter()? {
        let (k, v) = row?;
        let rec = decode_run(v.value())?;
        if let Some(at) = rec.finished_ms.filter(|_| rec.status.is_terminal()) {
            finished.push((at, k.value().to_string()));
        }
    }
    finished.sort();
    let mut estimate = in_use;
    let mut pruned_through = t.cursors.get(PRUNED_THROUGH)?.map(|v| v.value()).unwrap_or(0);
    for (at, id) in finished {
        if done.runs as usize >= policy.max_runs {
            break;
        }
        if at >= policy.finished_before_ms && estimate <= policy.max_bytes {
            break;
        }
        let seqs = read_history(&t.run_history, &id, false)?;
        if seqs.iter().any(|s| *s >= policy.keep_from_seq) {
            // Not yet acknowledged: newer runs are not either.
            break;
        }
        let bytes = super::blocks::remove(&mut t.events, &seqs)?;
        // Packed, an event takes about two thirds of its record's bytes, plus its share of the
        // run's index rows.
        estimate = estimate.saturating_sub(bytes * 2 / 3 + 16 * seqs.len() as u64);
        remove_history(&mut t.run_history, &id)?;
        t.runs.remove(id.as_str())?;
        done.runs += 1;
        done.events += seqs.len() as u64;
        pruned_through = seqs.iter().copied().fold(pruned_through, u64::max);
    }
    if pruned_through > 0 {
        t.cursors.insert(PRUNED_THROUGH, pruned_through)?;
    }
    done.commands = prune_commands(t, policy.finished_before_ms, policy.max_runs)?;
    done.definitions = prune_definitions(t)?;
    Ok(done)
}

/// Forgets applied commands older than `before_ms` (at most `max` per pass): the cloud stops
/// sending a command once it has its answer, so an old row only guards against a replay long
/// after the fact.
fn prune_commands(t: &mut Tables, before_ms: u64, max: usize) -> Result<u64, JournalError> {
    let end = command_index_key(before_ms, "");
    let old: Vec<String> =
        t.kv.range(COMMAND_INDEX..end.as_str())?
            .take(max)
            .map(|r| r.map(|(k, _)| k.value().to_string()))
            .collect::<Result<_, _>>()?;
    for key in &old {
        t.kv.remove(key.as_str())?;
        if let Some((_, id)) = key[COMMAND_INDEX.len()..].split_once('/') {
            t.kv.remove(format!("cmd/{id}").as_str())?;
        }
    }
    Ok(old.len() as u64)
}

/// Deletes definition versions that are neither their name's newest nor used by a run still in
/// the journal (a definition applied on every deploy would otherwise pile up forever).
fn prune_definitions(t: &mut Tables) -> Result<u64, JournalError> {
    let mut used = HashSet::new();
    for row in t.runs.iter()? {
        let (_, v) = row?;
        let rec = decode_run(v.value())?;
        used.insert((rec.workflow, rec.version));
    }
    let mut newest: HashMap<String, u32> = HashMap::new();
    let mut all = Vec::new();
    for row in t.definitions.iter()? {
        let (k, _) = row?;
        let (name, version) = k.value();
        let n = newest.entry(name.to_string()).or_insert(version);
        *n = (*n).max(version);
        all.push((name.to_string(), version));
    }
    let mut removed = 0;
    for (name, version) in all {
        if newest.get(&name) != Some(&version) && !used.contains(&(name.clone(), version)) {
            t.definitions.remove((name.as_str(), version))?;
            removed += 1;
        }
    }
    Ok(removed)
}
