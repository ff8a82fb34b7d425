//! The Kubernetes source's objects, one unit per object, each with its last good version (as
//! the directory source keeps one per file), and the state built from them.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use tracing::{error, info};

use crate::{
    assemble::{build_last_good, others_note, Publisher},
    error::{ErrorObject, ReadPart, SourceError, StateError},
    k8s::Object,
    meta::{Kind, ObjectRef},
    options::EnrollmentOptions,
    state::ClusterState,
};

/// One watched object.
#[derive(Debug)]
struct Unit {
    /// Listed by its kind's watch (not deleted).
    present: bool,
    /// Its current version, when it converted; `None` keeps `applied`.
    candidate: Option<Arc<[Object]>>,
    /// Its objects in the published state.
    applied: Arc<[Object]>,
    /// Why its current version could not be read (an Istio spec that does not parse).
    problem: Option<Unreadable>,
    /// Why its current version is not applied (it breaks the state).
    rejection: Option<String>,
}

impl Unit {
    fn new() -> Self {
        Self {
            present: false,
            candidate: None,
            applied: Arc::from(Vec::new()),
            problem: None,
            rejection: None,
        }
    }

    fn wanted(&self) -> Arc<[Object]> {
        if self.present {
            Arc::clone(self.candidate.as_ref().unwrap_or(&self.applied))
        } else {
            Arc::from(Vec::new())
        }
    }
}

/// What a watch reported of one object: it, or why it could not be read.
pub(crate) type Converted = Result<Object, Unreadable>;

/// Why an object could not be read, and what could be read of it all the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Unreadable {
    /// What is wrong, naming the field.
    pub(crate) message: String,
    /// Its `metadata.generation`.
    pub(crate) generation: Option<i64>,
    /// What its status is decided from.
    pub(crate) read: ReadPart,
}

/// Every watched object, keyed by kind, namespace and name.
#[derive(Debug)]
pub(crate) struct Units {
    opts: EnrollmentOptions,
    objects: BTreeMap<ObjectRef, Unit>,
    publisher: Publisher,
}

impl Units {
    pub(crate) fn new(opts: EnrollmentOptions) -> Self {
        Self {
            opts,
            objects: BTreeMap::new(),
            publisher: Publisher::default(),
        }
    }

    /// An object was added or changed.
    pub(crate) fn apply(&mut self, key: &ObjectRef, object: Converted) {
        let unit = self.objects.entry(key.clone()).or_insert_with(Unit::new);
        unit.present = true;
        match object {
            Ok(object) => {
                if unit.problem.take().is_some() {
                    info!(object = %key, "object reads again");
                }
                unit.candidate = Some(Arc::from(vec![object]));
            }
            Err(problem) => {
                if unit.problem.as_ref().map(|p| &p.message) != Some(&problem.message) {
                    error!(object = %key, error = %problem.message, "object not read; its last good version stays");
                }
                unit.candidate = None;
                unit.problem = Some(problem);
            }
        }
    }

    /// An object was deleted.
    pub(crate) fn delete(&mut self, key: &ObjectRef) {
        if let Some(unit) = self.objects.get_mut(key) {
            unit.present = false;
            unit.candidate = None;
            unit.problem = None;
        }
    }

    /// A full list of `kind` ended: objects of that kind it did not list are gone.
    pub(crate) fn relisted(&mut self, kind: Kind, listed: &BTreeSet<ObjectRef>) {
        let gone: Vec<ObjectRef> = self
            .objects
            .keys()
            .filter(|key| key.kind == kind && !listed.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            self.delete(&key);
        }
    }

    /// Builds and publishes the state of the objects as they are now (a new snapshot only when
    /// objects or errors changed).
    pub(crate) fn rebuild(&mut self) -> Result<Arc<ClusterState>, StateError> {
        let candidates = self
            .objects
            .iter()
            .map(|(key, unit)| (key.clone(), unit.wanted()))
            .collect();
        let objects = &self.objects;
        let assembled = build_last_good(
            candidates,
            |key| Arc::clone(&objects[key].applied),
            &self.opts,
        )?;
        let mut rejections: BTreeMap<ObjectRef, String> = assembled
            .rejections
            .into_iter()
            .map(|(key, rejection)| {
                let message = format!(
                    "not applied, its last good version stays: {}{}",
                    rejection.source,
                    others_note(&rejection.others)
                );
                (key, message)
            })
            .collect();
        let mut chosen = assembled.chosen;
        let mut objects_changed = false;
        for (key, unit) in &mut self.objects {
            if let Some(objects) = chosen.remove(key) {
                objects_changed |=
                    !Arc::ptr_eq(&objects, &unit.applied) && objects[..] != unit.applied[..];
                unit.applied = objects;
            }
            let rejection = rejections.remove(key);
            match (&rejection, &unit.rejection) {
                (Some(new), old) if old.as_ref() != Some(new) => {
                    error!(object = %key, error = %new, "cluster change rejected");
                }
                (None, Some(_)) => info!(object = %key, "object applied"),
                _ => {}
            }
            unit.rejection = rejection;
        }
        self.objects
            .retain(|_, unit| unit.present || !unit.applied.is_empty());
        let errors = self.errors();
        Ok(self
            .publisher
            .publish(assembled.state, objects_changed, errors))
    }

    fn errors(&self) -> Vec<SourceError> {
        let error =
            |key: &ObjectRef, message: &str, (generation, read): (_, ReadPart)| SourceError {
                source: key.to_string(),
                message: message.to_owned(),
                object: Some(ErrorObject {
                    object: key.clone(),
                    generation,
                    read,
                }),
            };
        let mut errors = Vec::new();
        for (key, unit) in &self.objects {
            if let Some(problem) = &unit.problem {
                let read = (problem.generation, problem.read.clone());
                errors.push(error(key, &problem.message, read));
            }
            if let Some(rejection) = &unit.rejection {
                // The version rejected read: what it says of itself.
                let read = unit
                    .candidate
                    .as_ref()
                    .and_then(|objects| objects.first())
                    .map_or((None, ReadPart::Other), Object::status_part);
                errors.push(error(key, rejection, read));
            }
        }
        errors
    }
}
