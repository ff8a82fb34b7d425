//! W3C trace context (`traceparent`, <https://www.w3.org/TR/trace-context/>): what a proxy
//! reads from a request or a CONNECT, the child it makes for its own span, and the header it
//! sends on.

use std::fmt;

use http::HeaderValue;

/// W3C `traceparent`.
pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
/// W3C `tracestate`: vendors' state, passed on unchanged.
pub const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// Why a `traceparent` value was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceparentError {
    /// Not `version-traceid-parentid-flags` with the field lengths the version requires.
    #[error("traceparent {0:?}: not version-traceid-parentid-flags (2-32-16-2 hex digits)")]
    Shape(String),
    /// A field holds something other than lowercase hex digits.
    #[error("traceparent {0:?}: fields must be lowercase hex")]
    NotHex(String),
    /// Version `ff`, which the specification forbids.
    #[error("traceparent {0:?}: version ff is invalid")]
    Version(String),
    /// An all-zero trace or parent id.
    #[error("traceparent {0:?}: all-zero trace id or parent id")]
    ZeroId(String),
}

/// One span's place in a trace: its trace id, its own span id, and whether the trace is sampled
/// (recorded and exported).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace's id (never zero).
    pub trace_id: u128,
    /// The span's id (never zero).
    pub span_id: u64,
    /// The `sampled` flag.
    pub sampled: bool,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent` value: `00-<trace id>-<span id>-<flags>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encode().as_str())
    }
}

/// Length of a version-00 `traceparent` value: `00-` 32 hex `-` 16 hex `-` 2 hex.
const TRACEPARENT_LEN: usize = 55;
/// Where the trace id's digits are in it.
const TRACE_ID_DIGITS: std::ops::Range<usize> = 3..35;

/// A `traceparent` value written out, on the stack: every request a proxy sends on carries one,
/// so it is encoded directly rather than through `format!` (a `String` and the formatting
/// machinery, a few per cent of the waypoint's CPU per request).
struct Encoded([u8; TRACEPARENT_LEN]);

impl Encoded {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits and dashes are ASCII")
    }
}

/// Writes `value`'s low `out.len() * 4` bits as lowercase hex into `out`, most significant
/// digit first.
fn hex_into(out: &mut [u8], mut value: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for digit in out.iter_mut().rev() {
        *digit = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

impl TraceContext {
    /// Reads a `traceparent` value. Versions above `00` are read as `00` is (their first four
    /// fields), as the specification asks; `ff` and malformed values are refused.
    pub fn parse(value: &str) -> Result<Self, TraceparentError> {
        let shape = || TraceparentError::Shape(value.to_owned());
        let mut fields = value.split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(shape());
        };
        let rest = fields.next();
        if version.len() != 2 || trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
            return Err(shape());
        }
        let hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if ![version, trace, parent, flags].into_iter().all(hex) {
            return Err(TraceparentError::NotHex(value.to_owned()));
        }
        match version {
            "ff" => return Err(TraceparentError::Version(value.to_owned())),
            // Version 00 has exactly four fields.
            "00" if rest.is_some() => return Err(shape()),
            _ => {}
        }
        let not_hex = || TraceparentError::NotHex(value.to_owned());
        let trace_id = u128::from_str_radix(trace, 16).map_err(|_| not_hex())?;
        let span_id = u64::from_str_radix(parent, 16).map_err(|_| not_hex())?;
        let flags = u8::from_str_radix(flags, 16).map_err(|_| not_hex())?;
        if trace_id == 0 || span_id == 0 {
            return Err(TraceparentError::ZeroId(value.to_owned()));
        }
        Ok(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The context of `headers`' `traceparent`; `None` when absent, repeated or invalid (a
    /// proxy then starts a trace of its own, as the specification asks).
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return None;
        };
        Self::parse(value.to_str().ok()?).ok()
    }

    /// A new trace, sampled as `sampler` decides.
    pub fn root(sampler: Sampler) -> Self {
        let trace_id = nonzero_u128();
        Self {
            trace_id,
            span_id: nonzero_u64(),
            sampled: sampler.samples(trace_id),
        }
    }

    /// A span of `parent`'s trace whose parent is `parent` (same trace id and sampling, a new
    /// span id).
    #[must_use]
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero_u64(),
            ..*self
        }
    }

    /// A child of `parent` when there is one, else a new trace sampled by `sampler`.
    pub fn child_or_root(parent: Option<&Self>, sampler: Sampler) -> Self {
        parent.map_or_else(|| Self::root(sampler), Self::child)
    }

    /// The `traceparent` header value.
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.encode().0).expect("hex and dashes are a valid header value")
    }

    /// The trace id as 32 lowercase hex digits (as logs and trace backends show it).
    pub fn trace_id_hex(&self) -> String {
        self.encode().as_str()[TRACE_ID_DIGITS].to_owned()
    }

    /// `00-<trace id>-<span id>-<flags>`.
    fn encode(&self) -> Encoded {
        let mut out = [b'-'; TRACEPARENT_LEN];
        out[..2].copy_from_slice(b"00");
        hex_into(&mut out[TRACE_ID_DIGITS], self.trace_id);
        hex_into(&mut out[36..52], u128::from(self.span_id));
        hex_into(&mut out[53..], u128::from(self.sampled));
        Encoded(out)
    }
}

/// Which new traces are sampled: a ratio of trace ids, decided from the id itself so that every
/// proxy with the same ratio takes the same decision (as OpenTelemetry's `TraceIdRatioBased`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Traces with the low 64 bits of their id below this bound are sampled.
    bound: u64,
    percent: f64,
}

impl Sampler {
    /// Samples `percent` % of new traces (0 to 100).
    ///
    /// # Errors
    /// A percentage outside 0..=100, or not a number.
    pub fn percent(percent: f64) -> Result<Self, SamplerError> {
        if !(0.0..=100.0).contains(&percent) {
            return Err(SamplerError(percent));
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a fraction of u64::MAX, within range by the check above; a bound off by \
                      a few ids out of 2^64 changes nothing"
        )]
        let bound = if percent >= 100.0 {
            u64::MAX
        } else {
            (percent / 100.0 * u64::MAX as f64) as u64
        };
        Ok(Self { bound, percent })
    }

    /// Samples nothing new (traces started elsewhere keep their own flag).
    pub const fn never() -> Self {
        Self {
            bound: 0,
            percent: 0.0,
        }
    }

    /// Whether a new trace with `trace_id` is sampled.
    pub fn samples(&self, trace_id: u128) -> bool {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "the low 64 bits, on purpose"
        )]
        let low = trace_id as u64;
        self.bound == u64::MAX || low < self.bound
    }

    /// The percentage it was made with.
    pub fn as_percent(&self) -> f64 {
        self.percent
    }
}

// The percentage is never NaN (`Sampler::percent` refuses it), so equality is total.
impl Eq for Sampler {}

/// A sampling percentage outside 0..=100.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("sampling percentage {0} is not within 0..=100")]
pub struct SamplerError(pub f64);

fn nonzero_u128() -> u128 {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_and_writes_the_specifications_example() {
        let cx = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(cx.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(cx.span_id, 0x00f0_67aa_0ba9_02b7);
        assert!(cx.sampled);
        assert_eq!(cx.to_string(), EXAMPLE);
        assert_eq!(cx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let unsampled =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
    }

    #[test]
    fn the_direct_encoding_is_what_format_writes() {
        let edges = [
            (1, 1, false),
            (u128::MAX, u64::MAX, true),
            (
                0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10,
                0x00f0_0000_0000_0001,
                true,
            ),
        ];
        let random = (0..1000).map(|_| (nonzero_u128(), nonzero_u64(), fastrand::bool()));
        for (trace_id, span_id, sampled) in edges.into_iter().chain(random) {
            let cx = TraceContext {
                trace_id,
                span_id,
                sampled,
            };
            let expected = format!(
                "00-{trace_id:032x}-{span_id:016x}-{:02x}",
                u8::from(sampled)
            );
            assert_eq!(cx.to_string(), expected);
            assert_eq!(cx.header_value().to_str().unwrap(), expected);
            assert_eq!(cx.trace_id_hex(), format!("{trace_id:032x}"));
            assert_eq!(TraceContext::parse(&expected).unwrap(), cx);
        }
    }

    #[test]
    fn refuses_what_the_specification_refuses() {
        let bad = [
            ("", "shape"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "shape",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
                "shape",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "hex",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                "shape",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "zero",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "zero",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
                "hex",
            ),
        ];
        for (value, why) in bad {
            let err = TraceContext::parse(value).unwrap_err();
            let ok = match why {
                "shape" => matches!(err, TraceparentError::Shape(_)),
                "hex" => matches!(err, TraceparentError::NotHex(_)),
                "version" => matches!(err, TraceparentError::Version(_)),
                _ => matches!(err, TraceparentError::ZeroId(_)),
            };
            assert!(ok, "{value:?}: {err}");
        }
        // A later version with more fields is read by its first four.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert!(TraceContext::parse(later).is_ok());
    }

    #[test]
    fn headers_with_one_valid_traceparent_only() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(TraceContext::from_headers(&headers), None);
        headers.insert(TRACEPARENT, HeaderValue::from_static(EXAMPLE));
        assert!(TraceContext::from_headers(&headers).is_some());
        headers.append(TRACEPARENT, HeaderValue::from_static(EXAMPLE));
        assert_eq!(TraceContext::from_headers(&headers), None, "repeated");
        headers.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        assert_eq!(TraceContext::from_headers(&headers), None);
    }

    #[test]
    fn children_keep_the_trace_and_its_flag() {
        let parent = TraceContext::parse(EXAMPLE).unwrap();
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert!(child.sampled);
        assert_ne!(child.span_id, parent.span_id);
        assert_ne!(child.span_id, 0);
        let root = TraceContext::child_or_root(None, Sampler::never());
        assert!(!root.sampled);
        assert_ne!(root.trace_id, parent.trace_id);
        assert_eq!(
            TraceContext::child_or_root(Some(&parent), Sampler::never()).trace_id,
            parent.trace_id,
            "a parent's own flag wins over the sampler"
        );
        assert_eq!(TraceContext::parse(&root.to_string()), Ok(root));
    }

    #[test]
    fn sampler_ratio() {
        assert!(Sampler::percent(100.0).unwrap().samples(u128::MAX));
        assert!(!Sampler::percent(0.0).unwrap().samples(1));
        assert!(Sampler::percent(101.0).is_err());
        assert!(Sampler::percent(-1.0).is_err());
        assert!(Sampler::percent(f64::NAN).is_err());
        let half = Sampler::percent(50.0).unwrap();
        let sampled = (0..10_000)
            .filter(|_| half.samples(fastrand::u128(..)))
            .count();
        // 50 % of 10,000 within ±5 standard deviations (50 each).
        assert!((4_750..=5_250).contains(&sampled), "{sampled}");
    }
}
