//! The client against an in-process server of Istio's API (TLS with a serving certificate of
//! the test's root), answering as each test says.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mesh_identity::{BuiltinCa, BuiltinCaOptions, Identity, WorkloadCert, WorkloadKey};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use super::*;
use crate::proto::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::IstioCertificateResponse;

const TD: &str = "cluster.local";
const HOST: &str = "mesh-ca.mesh-system.svc";

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-ca-client-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How the test server answers.
#[derive(Clone)]
enum Answer {
    /// Signs the CSR for the identity in the metadata, after checking the request.
    Sign,
    /// Signs a certificate for another identity.
    Other(Identity),
    /// Refuses.
    Refuse,
}

struct TestCa {
    ca: Arc<BuiltinCa>,
    answer: Answer,
}

#[tonic::async_trait]
impl IstioCertificateService for TestCa {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(auth, "Bearer token-1");
        let body = request.into_inner();
        assert_eq!(body.validity_duration, 3600);
        let Some(Kind::StringValue(wanted)) =
            &body.metadata.unwrap().fields[IMPERSONATED_IDENTITY].kind
        else {
            panic!("ImpersonatedIdentity is a string");
        };
        let identity = Identity::parse(wanted).unwrap();
        let csr_der = pem::parse(&body.csr).unwrap().into_contents();
        let request = match &self.answer {
            Answer::Refuse => return Err(Status::unauthenticated("request authenticate failure")),
            Answer::Sign => CsrRequest {
                csr_der,
                identity,
                lifetime: Some(Duration::from_secs(3600)),
            },
            Answer::Other(other) => {
                let key = WorkloadKey::generate().unwrap();
                CsrRequest {
                    csr_der: key.csr(other).unwrap(),
                    identity: other.clone(),
                    lifetime: None,
                }
            }
        };
        let leaf = self.ca.issue(&request).unwrap().chain.remove(0);
        let root = self.ca.trust_bundle().roots()[0].clone();
        let cert_chain = [leaf, root]
            .iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
            .collect();
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

/// A root, its roots file, a token file, and a server answering `answer` on loopback.
struct Setup {
    dir: TempDir,
    ca: Arc<BuiltinCa>,
    addr: SocketAddr,
    roots: PathBuf,
    token: PathBuf,
}

impl Setup {
    async fn start(answer: Answer) -> Self {
        let dir = TempDir::new("setup");
        let ca = Arc::new(
            BuiltinCa::load_or_create(&dir.0.join("ca"), TD, BuiltinCaOptions::default()).unwrap(),
        );
        let roots = dir.0.join("root-cert.pem");
        std::fs::copy(ca.root_cert_path(), &roots).unwrap();
        let token = dir.0.join("token");
        std::fs::write(&token, "token-1\n").unwrap();
        let tls =
            crate::server::serving::tls_config(Arc::clone(&ca), vec![HOST.to_owned()]).unwrap();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TestCa {
            ca: Arc::clone(&ca),
            answer,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IstioCertificateServiceServer::new(service))
                .serve_with_incoming(crate::server::serving::incoming(listener, tls)),
        );
        Self {
            dir,
            ca,
            addr,
            roots,
            token,
        }
    }

    fn client(&self, host: &str) -> IstioCaClient {
        let options = IstioCaOptions::new(
            format!("https://{host}:15012"),
            &self.roots,
            &self.token,
            TD,
        );
        IstioCaClient::new(options, Arc::new(StaticResolver(vec![self.addr]))).unwrap()
    }
}

fn web() -> Identity {
    Identity::new(TD, "shop", "web").unwrap()
}

fn request(key: &WorkloadKey, identity: &Identity) -> CsrRequest {
    CsrRequest {
        csr_der: key.csr(identity).unwrap(),
        identity: identity.clone(),
        lifetime: Some(Duration::from_secs(3600)),
    }
}

#[tokio::test]
async fn obtains_a_certificate_for_the_identity_verified_to_the_roots() {
    let setup = Setup::start(Answer::Sign).await;
    let client = setup.client(HOST);
    assert_eq!(client.trust_bundle(), setup.ca.trust_bundle());
    let key = WorkloadKey::generate().unwrap();
    let issued = client.sign(request(&key, &web())).await.unwrap();
    assert_eq!(issued.chain.len(), 1, "the root is left out");
    let cert = WorkloadCert::new(web(), issued.chain, &key).unwrap();
    // An hour, and the CA's allowance for clock skew (5 minutes) before it.
    assert!(cert.lifetime() <= Duration::from_secs(3600 + 300));
    // The channel is kept: a second request goes through too.
    let key = WorkloadKey::generate().unwrap();
    client.sign(request(&key, &web())).await.unwrap();
}

#[tokio::test]
async fn a_certificate_for_another_identity_is_refused() {
    let db = Identity::new(TD, "shop", "db").unwrap();
    let setup = Setup::start(Answer::Other(db.clone())).await;
    let key = WorkloadKey::generate().unwrap();
    let error = setup
        .client(HOST)
        .sign(request(&key, &web()))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, CaError::BadResponse { problem, .. }
            if matches!(&**problem, mesh_identity::ResponseProblem::IdentityMismatch { presented } if *presented == [db.clone()])),
        "{error}"
    );
}

#[tokio::test]
async fn a_chain_from_another_root_is_refused() {
    let setup = Setup::start(Answer::Sign).await;
    // The client trusts another root than the one that signs.
    let other = TempDir::new("other-root");
    let other_ca =
        BuiltinCa::load_or_create(&other.0.join("ca"), TD, BuiltinCaOptions::default()).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let leaf = setup.ca.issue(&request(&key, &web())).unwrap().chain;
    let pems: Vec<String> = leaf
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
        .collect();
    let problem =
        response::issued_chain(&pems, &web(), &other_ca.trust_bundle(), SystemTime::now())
            .unwrap_err();
    assert!(
        matches!(problem, mesh_identity::ResponseProblem::Untrusted { .. }),
        "{problem}"
    );
    for (pems, expected) in [
        (Vec::new(), "empty"),
        (vec!["junk".to_owned()], "holds 0 PEM certificates"),
    ] {
        let problem =
            response::issued_chain(&pems, &web(), &setup.ca.trust_bundle(), SystemTime::now())
                .unwrap_err();
        assert!(problem.to_string().contains(expected), "{problem}");
    }
}

#[tokio::test]
async fn the_cas_refusal_is_reported_with_its_code() {
    let setup = Setup::start(Answer::Refuse).await;
    let key = WorkloadKey::generate().unwrap();
    let error = setup
        .client(HOST)
        .sign(request(&key, &web()))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, CaError::Refused { code, message, .. }
            if code == "Unauthenticated" && message == "request authenticate failure"),
        "{error}"
    );
}

#[tokio::test]
async fn the_token_is_read_at_each_request_and_its_absence_named() {
    let setup = Setup::start(Answer::Sign).await;
    let client = setup.client(HOST);
    let key = WorkloadKey::generate().unwrap();
    std::fs::write(&setup.token, "  \n").unwrap();
    let error = client.sign(request(&key, &web())).await.unwrap_err();
    assert!(
        matches!(&error, CaError::EmptyToken { path } if *path == setup.token),
        "{error}"
    );
    std::fs::remove_file(&setup.token).unwrap();
    let error = client.sign(request(&key, &web())).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains(&setup.token.display().to_string()),
        "{error}"
    );
    std::fs::write(&setup.token, "token-1").unwrap();
    client.sign(request(&key, &web())).await.unwrap();
}

#[tokio::test]
async fn the_server_must_be_valid_for_the_host_and_reachable() {
    let setup = Setup::start(Answer::Sign).await;
    let key = WorkloadKey::generate().unwrap();
    // The certificate does not name this host.
    let error = setup
        .client("other.mesh-system.svc")
        .sign(request(&key, &web()))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, CaError::Unreachable { .. }) && error.to_string().contains("TLS"),
        "{error}"
    );
    // Nobody listens, or the resolver knows no address.
    let closed = {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap()
    };
    for (resolver, expected) in [
        (StaticResolver(vec![closed]), "connecting to"),
        (StaticResolver(Vec::new()), "no address for"),
    ] {
        let options = IstioCaOptions::new(
            format!("https://{HOST}:15012"),
            &setup.roots,
            &setup.token,
            TD,
        );
        let client = IstioCaClient::new(options, Arc::new(resolver)).unwrap();
        let error = client.sign(request(&key, &web())).await.unwrap_err();
        assert!(
            matches!(&error, CaError::Unreachable { .. }) && error.to_string().contains(expected),
            "{error}"
        );
    }
    drop(setup.dir);
}

#[test]
fn addresses_must_be_https_host_and_port() {
    assert_eq!(
        parse_address("https://mesh-ca.mesh-system.svc:15012").unwrap(),
        ("mesh-ca.mesh-system.svc".to_owned(), 15012)
    );
    assert_eq!(
        parse_address("https://[::1]:15012").unwrap(),
        ("::1".to_owned(), 15012)
    );
    assert_eq!(parse_address("https://ca").unwrap(), ("ca".to_owned(), 443));
    for (bad, problem) in [
        ("http://ca:15012", AddressProblem::NotHttps),
        ("ca:15012", AddressProblem::NotHttps),
        ("https://ca:15012/path", AddressProblem::NotJustHostAndPort),
        ("https://user@ca:15012", AddressProblem::NotJustHostAndPort),
        ("not a uri", AddressProblem::NotAUri),
    ] {
        let error = parse_address(bad).unwrap_err();
        assert!(
            matches!(&error, ClientError::Address { problem: p, .. } if *p == problem),
            "{bad}: {error}"
        );
    }
}
