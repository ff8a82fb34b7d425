//! Reads the pinned counter maps, from a running agent or one that kept its pins.

use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, MapError, PerCpuArray, PerCpuHashMap, SockHash};
use mesh_common::{names, CgroupCounters, FastpathCounters, NsSockKey, SockAddr};
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

/// What the `sk_msg` fast path did on the node, summed over CPUs: messages (and their bytes)
/// moved straight into the peer socket, those that took the normal TCP path, and those of
/// short-cut legs held to the TCP path by the budget or to keep the order of bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FastpathStats {
    pub redirected_msgs: u64,
    pub redirected_bytes: u64,
    pub passed_msgs: u64,
    pub passed_bytes: u64,
    pub held_msgs: u64,
    pub held_bytes: u64,
    pub direct_msgs: u64,
    pub direct_bytes: u64,
}

impl FastpathStats {
    /// The sum of every CPU's copy.
    pub fn from_per_cpu(per_cpu: &[FastpathCounters]) -> Self {
        let total = per_cpu
            .iter()
            .fold(FastpathCounters::default(), |acc, c| acc.sum(*c));
        Self {
            redirected_msgs: total.redirected_msgs,
            redirected_bytes: total.redirected_bytes,
            passed_msgs: total.passed_msgs,
            passed_bytes: total.passed_bytes,
            held_msgs: total.held_msgs,
            held_bytes: total.held_bytes,
            direct_msgs: total.direct_msgs,
            direct_bytes: total.direct_bytes,
        }
    }
}

/// The fast-path line of `mesh-agent stats --json`: `{"fastpath":{...}}`, fields in order.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FastpathLine {
    pub fastpath: FastpathStats,
}

/// A socket in the `sk_msg` short-cut: its network namespace's cookie and its own view of the
/// connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShortcutSocket {
    pub netns: u64,
    pub local: String,
    pub remote: String,
}

/// A short-cut socket line of `mesh-agent stats --json --sockets`: `{"shortcut_socket":{...}}`.
#[derive(Clone, Debug, Serialize)]
pub struct SocketLine {
    pub shortcut_socket: ShortcutSocket,
}

fn show(addr: SockAddr) -> String {
    addr.to_std()
        .map_or_else(|| format!("{addr:?}"), |a| a.to_string())
}

/// Opens the map pinned as `name` in `pin_dir` as a `T`.
fn open_pinned<T>(pin_dir: &Path, name: &str) -> Result<(T, PathBuf), StatsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| StatsError::Open {
        path: path.clone(),
        source: Box::new(e),
    })?;
    let map = Map::from_map_data(data).map_err(|e| StatsError::WrongMap {
        path: path.clone(),
        source: Box::new(e),
    })?;
    let map = T::try_from(map).map_err(|e| StatsError::WrongMap {
        path: path.clone(),
        source: Box::new(e),
    })?;
    Ok((map, path))
}

/// Reads every cgroup's counters from the map pinned in `pin_dir`, ordered by cgroup id.
pub fn read(pin_dir: &Path) -> Result<Vec<CgroupStats>, StatsError> {
    let (map, path): (PerCpuHashMap<MapData, u64, CgroupCounters>, _) =
        open_pinned(pin_dir, names::CGROUP_COUNTERS)?;
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

/// Reads the fast-path totals from the map pinned in `pin_dir`.
pub fn read_fastpath(pin_dir: &Path) -> Result<FastpathStats, StatsError> {
    let (map, path): (PerCpuArray<MapData, FastpathCounters>, _) =
        open_pinned(pin_dir, names::FASTPATH)?;
    let per_cpu = map.get(&0, 0).map_err(|e| StatsError::Read {
        path,
        source: Box::new(e),
    })?;
    Ok(FastpathStats::from_per_cpu(&per_cpu))
}

/// The sockets in the short-cut now, from the SOCKHASH pinned in `pin_dir`, ordered.
pub fn read_shortcut_sockets(pin_dir: &Path) -> Result<Vec<ShortcutSocket>, StatsError> {
    let (map, path): (SockHash<MapData, NsSockKey>, _) = open_pinned(pin_dir, names::SOCKS)?;
    let mut out = Vec::new();
    for key in map.keys() {
        let key = key.map_err(|e| StatsError::Read {
            path: path.clone(),
            source: Box::new(e),
        })?;
        out.push(ShortcutSocket {
            netns: key.netns,
            local: show(key.sock.local),
            remote: show(key.sock.remote),
        });
    }
    out.sort_by(|a, b| (a.netns, &a.local, &a.remote).cmp(&(b.netns, &b.local, &b.remote)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fastpath_stats_sum_the_cpus() {
        let cpu = |r: u64, p: u64| FastpathCounters {
            redirected_msgs: r,
            redirected_bytes: r * 100,
            passed_msgs: p,
            passed_bytes: p * 10,
            held_msgs: r + p,
            held_bytes: (r + p) * 1000,
            direct_msgs: r,
            direct_bytes: r * 7,
        };
        assert_eq!(
            FastpathStats::from_per_cpu(&[cpu(1, 0), cpu(2, 3)]),
            FastpathStats {
                redirected_msgs: 3,
                redirected_bytes: 300,
                passed_msgs: 3,
                passed_bytes: 30,
                held_msgs: 6,
                held_bytes: 6000,
                direct_msgs: 3,
                direct_bytes: 21,
            }
        );
        assert_eq!(FastpathStats::from_per_cpu(&[]), FastpathStats::default());
    }

    #[test]
    fn fastpath_json_is_one_object_under_its_name() {
        let line = serde_json::to_string(&FastpathLine {
            fastpath: FastpathStats {
                redirected_msgs: 1,
                redirected_bytes: 2,
                passed_msgs: 3,
                passed_bytes: 4,
                held_msgs: 5,
                held_bytes: 6,
                direct_msgs: 7,
                direct_bytes: 8,
            },
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"fastpath":{"redirected_msgs":1,"redirected_bytes":2,"passed_msgs":3,"passed_bytes":4,"held_msgs":5,"held_bytes":6,"direct_msgs":7,"direct_bytes":8}}"#
        );
    }
}
