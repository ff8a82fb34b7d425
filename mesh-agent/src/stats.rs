//! Reads the pinned counter map, from a running agent or one that kept its pins.

use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, MapError, PerCpuHashMap};
use mesh_common::{names, CgroupCounters};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error(
        "opening pinned map {path} (is an agent running with this bpffs directory?): {source}"
    )]
    Open {
        path: PathBuf,
        source: Box<MapError>,
    },
    #[error("map {path} is not the agent's counter map: {source}")]
    WrongMap {
        path: PathBuf,
        source: Box<MapError>,
    },
    #[error("reading map {path}: {source}")]
    Read {
        path: PathBuf,
        source: Box<MapError>,
    },
}

/// Counters of one cgroup, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CgroupStats {
    pub cgroup_id: u64,
    pub connect4: u64,
    pub connect6: u64,
}

/// Reads every cgroup's counters from the map pinned in `pin_dir`, ordered by cgroup id.
pub fn read(pin_dir: &Path) -> Result<Vec<CgroupStats>, StatsError> {
    let path = pin_dir.join(names::CGROUP_COUNTERS);
    let data = MapData::from_pin(&path).map_err(|e| StatsError::Open {
        path: path.clone(),
        source: Box::new(e),
    })?;
    let map = Map::from_map_data(data).map_err(|e| StatsError::WrongMap {
        path: path.clone(),
        source: Box::new(e),
    })?;
    let map: PerCpuHashMap<_, u64, CgroupCounters> =
        PerCpuHashMap::try_from(map).map_err(|e| StatsError::WrongMap {
            path: path.clone(),
            source: Box::new(e),
        })?;
    let mut out = Vec::new();
    for entry in &map {
        let (cgroup_id, per_cpu) = entry.map_err(|e| StatsError::Read {
            path: path.clone(),
            source: Box::new(e),
        })?;
        let total = per_cpu
            .iter()
            .fold(CgroupCounters::default(), |acc, c| acc.sum(*c));
        out.push(CgroupStats {
            cgroup_id,
            connect4: total.connect4,
            connect6: total.connect6,
        });
    }
    out.sort_by_key(|s| s.cgroup_id);
    Ok(out)
}
