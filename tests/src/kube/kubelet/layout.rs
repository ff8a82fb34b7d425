//! Names and places: sandbox and container ids, the pods' quality-of-service class and their cgroup v2
//! directories in kubelet's cgroupfs layout, and `$(VAR)` expansion. Pure functions (but
//! [`new_id`]), unit-tested without privileges.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Read as _,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Pod, PodSpec};

/// A pod's quality-of-service class, which decides where its cgroup lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// As `status.qosClass` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Guaranteed => "Guaranteed",
            Self::Burstable => "Burstable",
            Self::BestEffort => "BestEffort",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }
}

/// The pod's class: `status.qosClass` (the API server sets it at creation), else computed from
/// the containers' requests and limits as Kubernetes does ([`compute_qos`]).
pub fn qos_of(pod: &Pod) -> QosClass {
    pod.status
        .as_ref()
        .and_then(|s| s.qos_class.as_deref())
        .and_then(QosClass::parse)
        .unwrap_or_else(|| compute_qos(pod.spec.as_ref().unwrap_or(&PodSpec::default())))
}

/// Kubernetes' rule (`GetPodQOS`), for CPU and memory over the init and app containers:
/// nothing requested or limited is `BestEffort`; every container limiting both, with requests
/// (summed per resource) equal to limits, is `Guaranteed`; anything else is `Burstable`.
pub fn compute_qos(spec: &PodSpec) -> QosClass {
    const TRACKED: [&str; 2] = ["cpu", "memory"];
    let mut requests: BTreeMap<&str, f64> = BTreeMap::new();
    let mut limits: BTreeMap<&str, f64> = BTreeMap::new();
    let mut guaranteed = true;
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for container in containers {
        let resources = container.resources.as_ref();
        for (name, quantity) in resources
            .and_then(|r| r.requests.as_ref())
            .into_iter()
            .flatten()
        {
            if let Some(key) = TRACKED.iter().find(|k| **k == name) {
                let value = parse_quantity(&quantity.0).unwrap_or(0.0);
                if value != 0.0 {
                    *requests.entry(key).or_default() += value;
                }
            }
        }
        let mut limited = 0;
        for (name, quantity) in resources
            .and_then(|r| r.limits.as_ref())
            .into_iter()
            .flatten()
        {
            if let Some(key) = TRACKED.iter().find(|k| **k == name) {
                let value = parse_quantity(&quantity.0).unwrap_or(0.0);
                if value != 0.0 {
                    limited += 1;
                    *limits.entry(key).or_default() += value;
                }
            }
        }
        if limited < TRACKED.len() {
            guaranteed = false;
        }
    }
    if requests.is_empty() && limits.is_empty() {
        return QosClass::BestEffort;
    }
    if guaranteed {
        let equal = requests.iter().all(|(k, v)| {
            limits
                .get(k)
                .is_some_and(|l| (l - v).abs() <= f64::EPSILON * l.abs().max(1.0))
        });
        if equal && requests.len() == limits.len() {
            return QosClass::Guaranteed;
        }
    }
    QosClass::Burstable
}

/// A Kubernetes quantity (`100m`, `0.5`, `128Mi`, `1G`, `1e3`) as a number.
pub fn parse_quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => 10f64.powi(exp[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor)
}

/// The pod's cgroup in kubelet's cgroupfs layout below `kubepods`: `pod<uid>` for Guaranteed,
/// `burstable/pod<uid>`, `besteffort/pod<uid>`.
pub fn pod_cgroup(kubepods: &Path, qos: QosClass, uid: &str) -> PathBuf {
    let pod = format!("pod{uid}");
    match qos {
        QosClass::Guaranteed => kubepods.join(pod),
        QosClass::Burstable => kubepods.join("burstable").join(pod),
        QosClass::BestEffort => kubepods.join("besteffort").join(pod),
    }
}

/// A new sandbox or container id: 64 hex digits, as container runtimes make them.
pub fn new_id() -> String {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    bytes.iter().fold(String::with_capacity(64), |mut id, b| {
        let _ = write!(id, "{b:02x}");
        id
    })
}

/// Kubernetes' `$(VAR)` expansion of env values, commands and args: a defined variable is
/// replaced, an undefined reference stays as written, `$$` is a literal `$`.
pub fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(close) = after.strip_prefix('(').and_then(|a| a.find(')')) {
            let name = &after[1..=close];
            if let Some(value) = vars.get(name) {
                out.push_str(value);
            } else {
                out.push_str("$(");
                out.push_str(name);
                out.push(')');
            }
            rest = &after[close + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The program an image runs: the table's entry for its name without registry, path, tag or
/// digest (`registry/x/mesh-probe:v1` → `mesh-probe`).
pub fn image_name(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split(':').next().unwrap_or(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(containers: &serde_json::Value) -> PodSpec {
        serde_json::from_value(json!({ "containers": containers })).unwrap()
    }

    #[test]
    fn qos_classes_follow_kubernetes() {
        let none = spec(&json!([{"name": "a"}]));
        assert_eq!(compute_qos(&none), QosClass::BestEffort);
        let equal = json!({"cpu": "100m", "memory": "64Mi"});
        let guaranteed =
            spec(&json!([{"name": "a", "resources": {"requests": equal, "limits": equal}}]));
        assert_eq!(compute_qos(&guaranteed), QosClass::Guaranteed);
        let same_in_other_units = spec(&json!([{"name": "a", "resources": {
            "requests": {"cpu": "0.1", "memory": "67108864"}, "limits": equal}}]));
        assert_eq!(compute_qos(&same_in_other_units), QosClass::Guaranteed);
        let requests_only =
            spec(&json!([{"name": "a", "resources": {"requests": {"cpu": "10m"}}}]));
        assert_eq!(compute_qos(&requests_only), QosClass::Burstable);
        let one_unlimited = spec(&json!([
            {"name": "a", "resources": {"requests": equal, "limits": equal}},
            {"name": "b"}
        ]));
        assert_eq!(compute_qos(&one_unlimited), QosClass::Burstable);
        let more_limit = spec(&json!([{"name": "a", "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"}, "limits": equal}}]));
        assert_eq!(compute_qos(&more_limit), QosClass::Burstable);
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("100m"), Some(0.1));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1Ki"), Some(1024.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("1x"), None);
    }

    #[test]
    fn cgroups_follow_the_cgroupfs_layout() {
        let root = Path::new("/sys/fs/cgroup/x/kubepods-n0");
        assert_eq!(
            pod_cgroup(root, QosClass::Guaranteed, "u1"),
            root.join("podu1")
        );
        assert_eq!(
            pod_cgroup(root, QosClass::Burstable, "u1"),
            root.join("burstable/podu1")
        );
        assert_eq!(
            pod_cgroup(root, QosClass::BestEffort, "u1"),
            root.join("besteffort/podu1")
        );
    }

    #[test]
    fn expansion_as_kubernetes_does_it() {
        let vars: BTreeMap<String, String> = [("IP".to_owned(), "198.19.0.2".to_owned())].into();
        assert_eq!(expand("$(IP):8080", &vars), "198.19.0.2:8080");
        assert_eq!(expand("$(NOPE)-$$(IP)-$x", &vars), "$(NOPE)-$(IP)-$x");
        assert_eq!(expand("tail$", &vars), "tail$");
        assert_eq!(expand("$(unclosed", &vars), "$(unclosed");
    }

    #[test]
    fn image_names() {
        assert_eq!(image_name("mesh-probe"), "mesh-probe");
        assert_eq!(image_name("registry:5000/x/mesh-probe:v1"), "mesh-probe");
        assert_eq!(image_name("mesh-probe@sha256:abc"), "mesh-probe");
    }

    #[test]
    fn ids_are_64_hex_digits() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
