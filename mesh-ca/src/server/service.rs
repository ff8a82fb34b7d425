//! `IstioCertificateService/CreateCertificate`: authenticate and authorize the caller
//! ([`super::authorize`]), then sign the CSR for the verified identity with the built-in CA.
//!
//! Clients learn nothing of why they are refused: every refusal is `Unauthenticated` with
//! [`REFUSED`], a CSR that cannot be signed for the identity `InvalidArgument` with [`BAD_CSR`],
//! a failure to check (the API server unreachable) `Unavailable` with [`UNAVAILABLE`], a
//! signing failure `Internal` with [`SIGNING_FAILED`]. The reason is logged, with the caller
//! and the identity asked for; the token never is.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_identity::{BuiltinCa, CaError, CsrRequest, Identity};
use prost_types::value::Kind;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use super::authorize::{self, Caller, Inputs, Policy, Refusal};
use super::kube_api::Cluster;
use super::serving::Peer;
use crate::proto::istio_certificate_service_server::IstioCertificateService;
use crate::proto::{IstioCertificateRequest, IstioCertificateResponse, IMPERSONATED_IDENTITY};

/// The message of every refusal (istiod's).
pub const REFUSED: &str = "request authenticate failure";
/// The message of a CSR that cannot be signed.
pub const BAD_CSR: &str = "invalid certificate signing request";
/// The message when the request cannot be checked now.
pub const UNAVAILABLE: &str = "the request cannot be checked now";
/// The message of a signing failure.
pub const SIGNING_FAILED: &str = "certificate signing failed";

/// The CA's gRPC service.
pub(super) struct CaService {
    pub(super) ca: Arc<BuiltinCa>,
    pub(super) cluster: Cluster,
    pub(super) policy: Policy,
    pub(super) max_lifetime: Duration,
    /// The root certificate, PEM, last of every chain answered.
    pub(super) root_pem: String,
}

/// Why no identity was settled on.
enum Denied {
    Refused(Refusal),
    /// The API server could not be asked.
    Unchecked {
        what: &'static str,
        source: kube::Error,
    },
}

impl From<Refusal> for Denied {
    fn from(refusal: Refusal) -> Self {
        Self::Refused(refusal)
    }
}

impl CaService {
    /// The identity the caller may have, from what the API server says.
    async fn check(
        &self,
        token: Option<&str>,
        requested: Option<&str>,
        caller: &mut Option<Caller>,
    ) -> Result<Identity, Denied> {
        let token = token.ok_or(Refusal::NoToken)?;
        let unchecked = |what| move |source| Denied::Unchecked { what, source };
        let review = self
            .cluster
            .review(token, &self.policy.audience)
            .await
            .map_err(unchecked("the token review"))?;
        let who = caller.insert(authorize::caller(&self.policy, &review)?);
        let caller_pod = self
            .cluster
            .pod(&who.account.namespace, &who.pod_name)
            .await
            .map_err(unchecked("reading the caller's pod"))?;
        let wanted = authorize::requested_identity(&self.policy, who, requested)?;
        let node = caller_pod.as_ref().and_then(|p| p.node_name.clone());
        let node_pods = match node {
            Some(node) if wanted != who.identity => self
                .cluster
                .pods_on_node(&node)
                .await
                .map_err(unchecked("listing the pods of the caller's node"))?,
            _ => Vec::new(),
        };
        Ok(authorize::authorize(
            &self.policy,
            &Inputs {
                review: &review,
                requested,
                caller_pod: caller_pod.as_ref(),
                node_pods: &node_pods,
            },
        )?)
    }

    /// Signs `csr` (PEM) for `identity`, for `validity_duration` seconds at most (capped);
    /// `caller` names the caller in the log.
    fn sign(
        &self,
        caller: &str,
        identity: &Identity,
        csr: &str,
        validity_duration: i64,
    ) -> Result<(Vec<String>, SystemTime), Status> {
        let csr_der = match pem::parse(csr) {
            Ok(block) if block.tag().ends_with("CERTIFICATE REQUEST") => block.into_contents(),
            Ok(block) => {
                warn!(caller, %identity, tag = block.tag(), "refused a CSR: not a certificate request");
                return Err(Status::invalid_argument(BAD_CSR));
            }
            Err(e) => {
                warn!(caller, %identity, error = %e, "refused a CSR: not PEM");
                return Err(Status::invalid_argument(BAD_CSR));
            }
        };
        let asked = u64::try_from(validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let lifetime = asked.map_or(self.max_lifetime, |l| l.min(self.max_lifetime));
        let request = CsrRequest {
            csr_der,
            identity: identity.clone(),
            lifetime: Some(lifetime),
        };
        match self.ca.issue(&request) {
            Ok(issued) => {
                let leaf = &issued.chain[0];
                let not_after = SystemTime::now() + lifetime;
                let mut chain: Vec<String> = vec![pem::encode(&pem::Pem::new(
                    "CERTIFICATE",
                    leaf.as_ref().to_vec(),
                ))];
                chain.push(self.root_pem.clone());
                Ok((chain, not_after))
            }
            Err(
                e @ (CaError::InvalidCsr { .. }
                | CaError::CsrNamesMismatch { .. }
                | CaError::WrongTrustDomain { .. }
                | CaError::ZeroLifetime { .. }),
            ) => {
                warn!(caller, %identity, reason = %e, "refused a CSR");
                Err(Status::invalid_argument(BAD_CSR))
            }
            Err(e) => {
                error!(caller, %identity, error = %e, "signing failed");
                Err(Status::internal(SIGNING_FAILED))
            }
        }
    }
}

/// The bearer token of the `authorization` metadata.
fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// The `ImpersonatedIdentity` of the request's metadata; a value that is not a string is
/// passed on empty (and refused as malformed).
fn impersonated(request: &IstioCertificateRequest) -> Option<String> {
    let value = request
        .metadata
        .as_ref()?
        .fields
        .get(IMPERSONATED_IDENTITY)?;
    Some(match &value.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        _ => String::new(),
    })
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request
            .extensions()
            .get::<Peer>()
            .and_then(|p| p.0)
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let token = bearer(request.metadata());
        let body = request.into_inner();
        let requested = impersonated(&body);
        let requested_log = requested.as_deref().unwrap_or("(own identity)");
        let mut caller = None;
        let checked = self
            .check(token.as_deref(), requested.as_deref(), &mut caller)
            .await;
        let caller_log = caller.as_ref().map_or_else(
            || "unknown".to_owned(),
            |c| format!("{} (pod {}/{})", c.account, c.account.namespace, c.pod_name),
        );
        let identity = match checked {
            Ok(identity) => identity,
            Err(Denied::Refused(refusal)) => {
                warn!(%peer, caller = %caller_log, requested = requested_log, reason = %refusal, "refused a certificate request");
                return Err(Status::unauthenticated(REFUSED));
            }
            Err(Denied::Unchecked { what, source }) => {
                error!(%peer, caller = %caller_log, requested = requested_log, error = %source, "could not check a certificate request: {what}");
                return Err(Status::unavailable(UNAVAILABLE));
            }
        };
        let (cert_chain, not_after) =
            self.sign(&caller_log, &identity, &body.csr, body.validity_duration)?;
        info!(%peer, caller = %caller_log, %identity, not_after = %humantime::format_rfc3339_seconds(not_after), "issued a workload certificate");
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}
