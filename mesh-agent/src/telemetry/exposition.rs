//! The agent's `/metrics`, written by the `prometheus-client` crate (Prometheus text format
//! 0.0.4, as the waypoint's): at each scrape the agent reads its counters and gauges into an
//! [`Exposition`] (the atomics the connections add to stay as they are: one add per relay poll,
//! no registry lock on the data path), which a `prometheus-client` [`Collector`] then encodes.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

/// A counter or a gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A sample's value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Number {
    Int(u64),
    Float(f64),
}

macro_rules! number_from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Number {
            fn from(v: $t) -> Self {
                Number::Int(u64::try_from(v).unwrap_or_default())
            }
        }
    )*};
}
number_from_int!(u64, usize, u32, i64);

impl From<f64> for Number {
    fn from(v: f64) -> Self {
        Number::Float(v)
    }
}

/// One metric family: its name as scraped (a counter's with its `_total`), help, kind and
/// samples.
#[derive(Debug)]
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Vec<(String, String)>, Number)>,
}

impl Family {
    /// Adds a sample with `labels`.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Into<Number>) -> &mut Self {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples.push((labels, value.into()));
        self
    }
}

/// What one scrape shows, family by family, in the order added.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    /// A new family; a counter's `name` ends with `_total`.
    pub fn family(&mut self, name: &'static str, help: &'static str, kind: Kind) -> &mut Family {
        debug_assert!(
            kind == Kind::Gauge || name.ends_with("_total"),
            "counter {name} without _total"
        );
        self.families.push(Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        });
        self.families.last_mut().expect("just pushed")
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, value: impl Into<Number>) {
        self.family(name, help, Kind::Gauge).sample(&[], value);
    }

    /// A counter without labels (`name` ends with `_total`).
    pub fn counter(&mut self, name: &'static str, help: &'static str, value: impl Into<Number>) {
        self.family(name, help, Kind::Counter).sample(&[], value);
    }

    /// The text `prometheus-client` writes for it.
    pub fn encode(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut text = String::with_capacity(16 * 1024);
        // Writing to a `String` cannot fail, and every name here is a valid metric name.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
        text
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.families {
            let (name, metric_type) = match family.kind {
                // The encoder appends `_total` to a counter's name.
                Kind::Counter => (
                    family.name.strip_suffix("_total").unwrap_or(family.name),
                    MetricType::Counter,
                ),
                Kind::Gauge => (family.name, MetricType::Gauge),
            };
            let mut metric = encoder.encode_descriptor(name, family.help, None, metric_type)?;
            for (labels, value) in &family.samples {
                let labels: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let sample = metric.encode_family(&labels)?;
                match (family.kind, *value) {
                    (Kind::Counter, Number::Int(v)) => ConstCounter::new(v).encode(sample)?,
                    (Kind::Counter, Number::Float(v)) => ConstCounter::new(v).encode(sample)?,
                    (Kind::Gauge, Number::Int(v)) => {
                        ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(sample)?;
                    }
                    (Kind::Gauge, Number::Float(v)) => ConstGauge::new(v).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_written_by_prometheus_client_with_escaped_labels() {
        let mut out = Exposition::default();
        out.family("mesh_decisions_total", "Decisions", Kind::Counter)
            .sample(&[("decision", "allow")], 3_u64)
            .sample(&[("decision", "de\"ny\\\n")], 1_u64);
        out.gauge("mesh_things", "Things", 7_usize);
        out.counter("process_cpu_seconds_total", "CPU", 1.5);
        out.family("mesh_empty", "Nothing yet", Kind::Gauge);
        let text = out.encode();
        for line in [
            "# TYPE mesh_decisions_total counter",
            "mesh_decisions_total{decision=\"allow\"} 3",
            "mesh_decisions_total{decision=\"de\\\"ny\\\\\\n\"} 1",
            "# TYPE mesh_things gauge",
            "mesh_things 7",
            "process_cpu_seconds_total 1.5",
            "# TYPE mesh_empty gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
        }
    }
}
