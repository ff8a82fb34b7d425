//! How every source turns its units (a file of the directory source, an object of the
//! Kubernetes source) into the published state, keeping each unit's **last good** objects:
//!
//! - [`build_last_good`] builds a [`ClusterState`] from each unit's candidate objects; when they
//!   do not make a valid state, the changed units holding an object named in the error (or, if
//!   the error names none, every changed unit) are rejected — their last applied objects stay —
//!   and the state is built again;
//! - [`Publisher`] numbers the snapshots, logs new warnings once and a summary of each new
//!   snapshot, and hands back the same `Arc` when nothing changed.

use std::{collections::BTreeMap, fmt, sync::Arc};

use tracing::{info, warn};

use crate::{
    error::{SourceError, StateError},
    k8s::Object,
    options::EnrollmentOptions,
    state::ClusterState,
};

/// A unit's change that was not applied: the error, and the other units holding objects it
/// names.
#[derive(Debug)]
pub(crate) struct Rejection<K> {
    pub(crate) source: StateError,
    pub(crate) others: Vec<K>,
}

/// What [`build_last_good`] chose: the state, the objects of each unit in it, and the rejected
/// units.
pub(crate) struct Assembled<K> {
    pub(crate) state: ClusterState,
    pub(crate) chosen: BTreeMap<K, Arc<[Object]>>,
    pub(crate) rejections: BTreeMap<K, Rejection<K>>,
}

/// Builds a state from `candidates` (each unit's objects as they are now), falling back, for a
/// unit whose change breaks the state, to `applied(unit)` (its objects in the published state).
/// Fails only when the state cannot be built even with every change rejected (the objects
/// already published no longer build: not expected).
pub(crate) fn build_last_good<K: Ord + Clone>(
    mut chosen: BTreeMap<K, Arc<[Object]>>,
    applied: impl Fn(&K) -> Arc<[Object]>,
    opts: &EnrollmentOptions,
) -> Result<Assembled<K>, StateError> {
    let mut rejections = BTreeMap::new();
    loop {
        let objects = chosen.values().flat_map(|objects| objects.iter());
        let error = match ClusterState::build(objects, opts) {
            Ok(state) => {
                return Ok(Assembled {
                    state,
                    chosen,
                    rejections,
                })
            }
            Err(error) => error,
        };
        // Units whose chosen objects differ from the applied ones (a change to try).
        let pending: Vec<K> = chosen
            .iter()
            .filter(|(unit, objects)| {
                let applied = applied(unit);
                !Arc::ptr_eq(objects, &applied) && objects[..] != applied[..]
            })
            .map(|(unit, _)| unit.clone())
            .collect();
        let named = error.objects();
        let holders: Vec<K> = chosen
            .iter()
            .filter(|(_, objects)| objects.iter().any(|o| named.contains(&&o.object_ref())))
            .map(|(unit, _)| unit.clone())
            .collect();
        let mut culprits: Vec<K> = pending
            .iter()
            .filter(|unit| holders.contains(unit))
            .cloned()
            .collect();
        if culprits.is_empty() {
            culprits = pending;
        }
        if culprits.is_empty() {
            return Err(error);
        }
        for unit in culprits {
            let others = holders.iter().filter(|h| **h != unit).cloned().collect();
            chosen.insert(unit.clone(), applied(&unit));
            rejections.insert(
                unit,
                Rejection {
                    source: error.clone(),
                    others,
                },
            );
        }
    }
}

/// Numbers and publishes the snapshots of one source.
#[derive(Debug, Default)]
pub(crate) struct Publisher {
    current: Option<Arc<ClusterState>>,
}

impl Publisher {
    /// The snapshot last published.
    pub(crate) fn current(&self) -> Option<&Arc<ClusterState>> {
        self.current.as_ref()
    }

    /// Publishes `state` with `errors` as the next generation (starting at 1), unless neither
    /// the objects (`objects_changed`) nor the errors changed: then the current snapshot.
    pub(crate) fn publish(
        &mut self,
        state: ClusterState,
        objects_changed: bool,
        errors: Vec<SourceError>,
    ) -> Arc<ClusterState> {
        if let Some(current) = &self.current {
            if !objects_changed && current.errors() == errors.as_slice() {
                return Arc::clone(current);
            }
        }
        let generation = self.current.as_ref().map_or(1, |c| c.generation() + 1);
        let state = Arc::new(state.with_status(generation, errors));
        let previous_warnings = self.current.as_ref().map_or(&[][..], |c| c.warnings());
        for warning in state.warnings() {
            if !previous_warnings.contains(warning) {
                warn!(warning = %warning, "cluster config warning");
            }
        }
        info!(
            generation,
            workloads = state.workloads().len(),
            services = state.services().len(),
            peer_authentications = state.peer_authentications().len(),
            authorization_policies = state.authorization_policies().len(),
            request_authentications = state.request_authentications(),
            envoy_filters = state.envoy_filters(),
            errors = state.errors().len(),
            warnings = state.warnings().len(),
            "cluster state updated"
        );
        self.current = Some(Arc::clone(&state));
        state
    }
}

/// ` (see also a, b)` for the other units an error names, or nothing.
pub(crate) fn others_note<K: fmt::Display>(others: &[K]) -> String {
    if others.is_empty() {
        return String::new();
    }
    let names: Vec<String> = others.iter().map(ToString::to_string).collect();
    format!(" (see also {})", names.join(", "))
}
