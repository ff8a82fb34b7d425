use std::os::unix::fs::PermissionsExt;

use rustls::pki_types::UnixTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use super::*;
use crate::cert::{WorkloadCert, WorkloadKey};
use crate::spiffe::Identity;
use crate::test_support::{cert, cert_with_validity, identity, new_ca, TempDir};
use crate::tls::verify_chain;

const HOUR: Duration = Duration::from_secs(3600);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn verify(
    bundle: &TrustBundle,
    cert: &WorkloadCert,
    at: SystemTime,
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let algorithms =
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    verify_chain(
        bundle,
        algorithms.all,
        cert.leaf(),
        &cert.chain()[1..],
        UnixTime::since_unix_epoch(at.duration_since(std::time::UNIX_EPOCH).unwrap()),
        usage,
    )
}

fn request_for(key: &WorkloadKey, id: &Identity, lifetime: Option<Duration>) -> CsrRequest {
    CsrRequest {
        csr_der: key.csr(id).unwrap(),
        identity: id.clone(),
        lifetime,
    }
}

#[test]
fn creates_a_root_with_private_key_file_and_directory() {
    let tmp = TempDir::new("create");
    let dir = tmp.path().join("nested").join("ca");
    let ca = BuiltinCa::load_or_create(&dir, "cluster.local", BuiltinCaOptions::default()).unwrap();
    assert_eq!(ca.root_key_path(), dir.join(ROOT_KEY_FILE));
    assert_eq!(mode(&dir.join(ROOT_KEY_FILE)), 0o600);
    assert_eq!(mode(&dir), 0o700);

    let roots = ca.trust_bundle();
    assert_eq!(roots.roots().len(), 1);
    let pem = std::fs::read(dir.join(ROOT_CERT_FILE)).unwrap();
    let from_file = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    assert_eq!(from_file, roots.roots());

    let (_, root) = x509_parser::parse_x509_certificate(&roots.roots()[0]).unwrap();
    assert!(root.is_ca());
    assert_eq!(
        root.subject()
            .iter_organization()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "cluster.local"
    );
    let usage = root.key_usage().unwrap().unwrap().value;
    assert!(usage.key_cert_sign());
    let validity = root.validity().time_to_expiration().unwrap();
    let ten_years = 3650 * 24 * HOUR;
    assert!(validity <= time::Duration::try_from(ten_years).unwrap());
    assert!(validity > time::Duration::try_from(ten_years.checked_sub(2 * HOUR).unwrap()).unwrap());
}

#[test]
fn workload_certificates_carry_only_the_spiffe_id_and_mtls_usages() {
    let tmp = TempDir::new("leaf");
    let ca = new_ca(&tmp, "cluster.local");
    let id = identity("cluster.local", "web");
    let before = SystemTime::now();
    let issued = cert(&ca, &id);
    let (_, leaf) = x509_parser::parse_x509_certificate(issued.leaf()).unwrap();
    let bundle = ca.trust_bundle();
    let (_, root) = x509_parser::parse_x509_certificate(&bundle.roots()[0]).unwrap();

    assert_eq!(leaf.issuer(), root.subject());
    assert!(!leaf.is_ca());
    let mut saw_san = false;
    for ext in leaf.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                saw_san = true;
                assert_eq!(
                    san.general_names,
                    vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")]
                );
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.server_auth && eku.client_auth);
                assert!(!eku.any && !eku.code_signing && eku.other.is_empty());
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(ku.digital_signature());
                assert!(!ku.key_cert_sign() && !ku.crl_sign());
            }
            ParsedExtension::BasicConstraints(bc) => assert!(!bc.ca),
            _ => {}
        }
    }
    assert!(saw_san);

    // Default lifetime 24 h, backdated by the 5 minutes of clock skew.
    let not_before = before.duration_since(issued.not_before()).unwrap();
    assert!(not_before >= Duration::from_secs(299) && not_before <= Duration::from_secs(301));
    let lifetime = issued.lifetime();
    assert!(lifetime >= 24 * HOUR + Duration::from_secs(299));
    assert!(lifetime <= 24 * HOUR + Duration::from_secs(302));

    // Random serials: two certificates for the same identity differ.
    let again = cert(&ca, &id);
    assert_ne!(issued.serial_hex(), again.serial_hex());
    assert!(issued.serial_hex().len() >= 30);

    // And they verify for both directions of mutual TLS.
    let now = SystemTime::now();
    verify(&bundle, &issued, now, webpki::KeyUsage::client_auth()).unwrap();
    verify(&bundle, &issued, now, webpki::KeyUsage::server_auth()).unwrap();
}

#[test]
fn requested_lifetimes_are_honoured_up_to_the_maximum() {
    let tmp = TempDir::new("lifetime");
    let options = BuiltinCaOptions {
        max_lifetime: 2 * HOUR,
        ..BuiltinCaOptions::default()
    };
    let ca = BuiltinCa::load_or_create(tmp.path(), "td", options).unwrap();
    let id = identity("td", "web");
    let key = WorkloadKey::generate().unwrap();

    let short = ca
        .issue(&request_for(&key, &id, Some(Duration::from_secs(4))))
        .unwrap();
    let short = WorkloadCert::new(id.clone(), short.chain, &key).unwrap();
    // 4 s plus a backdating of at most a tenth of it (and up to 1 s of truncation).
    assert!(short.lifetime() >= Duration::from_secs(4));
    assert!(
        short.lifetime() <= Duration::from_secs(6),
        "{:?}",
        short.lifetime()
    );

    let long = ca.issue(&request_for(&key, &id, Some(100 * HOUR))).unwrap();
    let long = WorkloadCert::new(id.clone(), long.chain, &key).unwrap();
    assert!(long.lifetime() <= 2 * HOUR + Duration::from_secs(302));
    assert!(long.lifetime() >= 2 * HOUR);

    assert!(matches!(
        ca.issue(&request_for(&key, &id, Some(Duration::ZERO))),
        Err(CaError::ZeroLifetime { .. })
    ));
}

#[tokio::test]
async fn sign_refuses_csrs_for_other_identities_and_trust_domains() {
    let tmp = TempDir::new("refuse");
    let ca = new_ca(&tmp, "td");
    let key = WorkloadKey::generate().unwrap();
    let web = identity("td", "web");
    let admin = identity("td", "admin");

    // A CSR naming "admin" sent as a request for "web".
    let err = ca
        .sign(CsrRequest {
            csr_der: key.csr(&admin).unwrap(),
            identity: web.clone(),
            lifetime: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::CsrNamesMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("spiffe://td/ns/default/sa/admin"),
        "{err}"
    );

    // A CSR with an extra DNS name.
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        SanType::URI(web.to_string().try_into().unwrap()),
        SanType::DnsName("web.example.com".try_into().unwrap()),
    ];
    let csr_der = params
        .serialize_request(key.key_pair())
        .unwrap()
        .der()
        .to_vec();
    let err = ca
        .sign(CsrRequest {
            csr_der,
            identity: web.clone(),
            lifetime: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::CsrNamesMismatch { .. }), "{err}");

    // An identity of another trust domain, even with a matching CSR.
    let foreign = identity("other", "web");
    let err = ca
        .sign(request_for(&key, &foreign, None))
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::WrongTrustDomain { .. }), "{err}");

    // The matching request is signed.
    let issued = ca.sign(request_for(&key, &web, None)).await.unwrap();
    WorkloadCert::new(web, issued.chain, &key).unwrap();
}

#[test]
fn a_reloaded_ca_signs_certificates_that_verify_against_the_original_bundle() {
    let tmp = TempDir::new("reload");
    let original = new_ca(&tmp, "cluster.local");
    let bundle = original.trust_bundle();
    drop(original);

    let reloaded = new_ca(&tmp, "cluster.local");
    assert_eq!(reloaded.trust_bundle(), bundle);
    let issued = cert(&reloaded, &identity("cluster.local", "db"));
    verify(
        &bundle,
        &issued,
        SystemTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .unwrap();

    // A CA with another root does not verify against it.
    let other_tmp = TempDir::new("reload-other");
    let other = new_ca(&other_tmp, "cluster.local");
    let foreign = cert(&other, &identity("cluster.local", "db"));
    assert_eq!(
        verify(
            &bundle,
            &foreign,
            SystemTime::now(),
            webpki::KeyUsage::client_auth()
        ),
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer
        ))
    );
}

#[test]
fn a_group_or_world_readable_key_file_is_refused() {
    let tmp = TempDir::new("mode");
    drop(new_ca(&tmp, "td"));
    let key_path = tmp.path().join("ca").join(ROOT_KEY_FILE);
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = BuiltinCa::load_or_create(&tmp.path().join("ca"), "td", BuiltinCaOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, CaError::KeyFileTooOpen { path, mode: 0o644 } if *path == key_path),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&key_path.display().to_string()) && message.contains("0644"),
        "{message}"
    );

    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        BuiltinCa::load_or_create(&tmp.path().join("ca"), "td", BuiltinCaOptions::default()),
        Err(CaError::KeyFileTooOpen { mode: 0o640, .. })
    ));
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused() {
    let tmp = TempDir::new("mismatch");
    drop(new_ca(&tmp, "td"));
    let dir = tmp.path().join("ca");
    let key_path = dir.join(ROOT_KEY_FILE);
    std::fs::remove_file(&key_path).unwrap();
    let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(&key_path, other.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = BuiltinCa::load_or_create(&dir, "td", BuiltinCaOptions::default()).unwrap_err();
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
}

#[test]
fn a_half_present_store_or_another_trust_domain_is_refused() {
    let tmp = TempDir::new("partial");
    drop(new_ca(&tmp, "td"));
    let dir = tmp.path().join("ca");

    let err = BuiltinCa::load_or_create(&dir, "other.td", BuiltinCaOptions::default()).unwrap_err();
    assert!(
        matches!(&err, CaError::RootTrustDomainMismatch { found: Some(found), expected, .. }
            if found == "td" && expected == "other.td"),
        "{err}"
    );

    std::fs::remove_file(dir.join(ROOT_CERT_FILE)).unwrap();
    let err = BuiltinCa::load_or_create(&dir, "td", BuiltinCaOptions::default()).unwrap_err();
    assert!(
        matches!(&err, CaError::IncompleteStore { missing, .. } if *missing == dir.join(ROOT_CERT_FILE)),
        "{err}"
    );

    assert!(matches!(
        BuiltinCa::load_or_create(&dir, "Bad Domain", BuiltinCaOptions::default()),
        Err(CaError::InvalidTrustDomain { .. })
    ));
}

#[test]
fn a_corrupt_certificate_file_is_named() {
    let tmp = TempDir::new("corrupt");
    drop(new_ca(&tmp, "td"));
    let cert_path = tmp.path().join("ca").join(ROOT_CERT_FILE);
    std::fs::write(&cert_path, "not pem at all\n").unwrap();
    let err = BuiltinCa::load_or_create(&tmp.path().join("ca"), "td", BuiltinCaOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, CaError::RootCertCount { path, count: 0 } if *path == cert_path),
        "{err}"
    );
}

#[test]
fn explicit_validity_windows_make_expired_certificates() {
    let tmp = TempDir::new("expired");
    let ca = new_ca(&tmp, "td");
    let id = identity("td", "old");
    let now = SystemTime::now();
    let expired = cert_with_validity(&ca, &id, now - 2 * HOUR, now - HOUR);
    assert!(!expired.is_valid_at(now));
    let err = verify(
        &ca.trust_bundle(),
        &expired,
        now,
        webpki::KeyUsage::client_auth(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
    // It was valid in its window.
    verify(
        &ca.trust_bundle(),
        &expired,
        now - Duration::from_secs(90 * 60),
        webpki::KeyUsage::client_auth(),
    )
    .unwrap();

    let key = WorkloadKey::generate().unwrap();
    assert!(matches!(
        ca.issue_with_validity(&request_for(&key, &id, None), now, now - HOUR),
        Err(CaError::InvalidValidity { .. })
    ));
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The directory of a complete store: the two root files and nothing else (no temporary file).
fn assert_complete_store(dir: &Path) {
    assert_eq!(
        names_in(dir),
        [ROOT_CERT_FILE, ROOT_KEY_FILE],
        "{}",
        dir.display()
    );
}

/// The root certificate in `dir`'s certificate file, in hex.
fn root_on_disk(dir: &Path) -> String {
    hex(&read_root_cert(&dir.join(ROOT_CERT_FILE)).unwrap())
}

/// A request for a fresh key's certificate for `spiffe://td/ns/default/sa/web`.
fn issue_web(ca: &BuiltinCa) -> Result<IssuedChain, CaError> {
    let key = WorkloadKey::generate().unwrap();
    ca.issue(&request_for(&key, &identity("td", "web"), None))
}

#[test]
fn threads_creating_the_root_together_all_load_the_same_one() {
    const CREATORS: usize = 8;
    const ROUNDS: usize = 30;
    for round in 0..ROUNDS {
        let tmp = TempDir::new("race-threads");
        let dir = tmp.path().join("ca");
        let start = std::sync::Barrier::new(CREATORS);
        let roots: Vec<String> = std::thread::scope(|scope| {
            let creators: Vec<_> = (0..CREATORS)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        BuiltinCa::load_or_create(&dir, "td", BuiltinCaOptions::default())
                    })
                })
                .collect();
            creators
                .into_iter()
                .map(|creator| match creator.join().unwrap() {
                    Ok(ca) => hex(&ca.trust_bundle().roots()[0]),
                    Err(e) => panic!("round {round}: {e}"),
                })
                .collect()
        });
        let on_disk = root_on_disk(&dir);
        assert!(roots.iter().all(|root| *root == on_disk), "round {round}");
        assert_complete_store(&dir);
    }
}

/// Environment variable naming the CA directory of [`creator_process`].
const CREATOR_CA_DIR: &str = "MESH_IDENTITY_TEST_CREATOR_CA_DIR";

/// One of the agents of [`processes_creating_the_root_together_all_load_the_same_one`]: opens
/// the CA in `$MESH_IDENTITY_TEST_CREATOR_CA_DIR` once its standard input closes, and prints
/// the root it loaded.
#[test]
#[ignore = "run as a child process by processes_creating_the_root_together_all_load_the_same_one"]
fn creator_process() {
    let Some(dir) = std::env::var_os(CREATOR_CA_DIR) else {
        eprintln!("{CREATOR_CA_DIR} is not set: nothing to do outside the race test");
        return;
    };
    std::io::stdin().read_to_end(&mut Vec::new()).unwrap();
    match BuiltinCa::load_or_create(Path::new(&dir), "td", BuiltinCaOptions::default()) {
        Ok(ca) => println!("ROOT={}", hex(&ca.trust_bundle().roots()[0])),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn processes_creating_the_root_together_all_load_the_same_one() {
    const CREATORS: usize = 4;
    const ROUNDS: usize = 10;
    let test_binary = std::env::current_exe().unwrap();
    let (_crate, module) = module_path!().split_once("::").unwrap();
    let creator = format!("{module}::creator_process");
    for round in 0..ROUNDS {
        let tmp = TempDir::new("race-processes");
        let dir = tmp.path().join("ca");
        let mut children: Vec<_> = (0..CREATORS)
            .map(|_| {
                std::process::Command::new(&test_binary)
                    .args([&creator, "--exact", "--ignored", "--nocapture"])
                    .env(CREATOR_CA_DIR, &dir)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        // All of them are started: closing their standard input lets them go at once.
        for child in &mut children {
            drop(child.stdin.take());
        }
        let roots: Vec<String> = children
            .into_iter()
            .map(|child| {
                let output = child.wait_with_output().unwrap();
                let stdout = String::from_utf8_lossy(&output.stdout);
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(
                    output.status.success(),
                    "round {round}: {}\n{stdout}\n{stderr}",
                    output.status
                );
                let root = stdout.split_once("ROOT=").map(|(_, rest)| rest);
                let root = root.and_then(|rest| rest.split_whitespace().next());
                root.unwrap_or_else(|| panic!("round {round}: no root printed:\n{stdout}"))
                    .to_owned()
            })
            .collect();
        let on_disk = root_on_disk(&dir);
        assert!(roots.iter().all(|root| *root == on_disk), "round {round}");
        assert_complete_store(&dir);
    }
}

#[test]
fn a_key_published_before_its_certificate_is_waited_for() {
    let tmp = TempDir::new("publishing");
    let original = new_ca(&tmp, "td");
    let dir = tmp.path().join("copy");
    std::fs::create_dir(&dir).unwrap();
    // The state another agent leaves between its two links: the key without the certificate.
    std::fs::copy(original.root_key_path(), dir.join(ROOT_KEY_FILE)).unwrap();
    let cert_pem = std::fs::read(original.root_cert_path()).unwrap();
    let opened = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            let staged = dir.join(".cert.tmp");
            std::fs::write(&staged, &cert_pem).unwrap();
            std::fs::rename(&staged, dir.join(ROOT_CERT_FILE)).unwrap();
        });
        BuiltinCa::load_or_create(&dir, "td", BuiltinCaOptions::default())
    });
    assert_eq!(opened.unwrap().trust_bundle(), original.trust_bundle());
}

#[test]
fn empty_or_unparsable_root_files_are_named_and_left_in_place() {
    let tmp = TempDir::new("unparsable");
    drop(new_ca(&tmp, "td"));
    let dir = tmp.path().join("ca");
    let cert_path = dir.join(ROOT_CERT_FILE);
    let key_path = dir.join(ROOT_KEY_FILE);
    let key_pem = std::fs::read(&key_path).unwrap();
    let open = || BuiltinCa::load_or_create(&dir, "td", BuiltinCaOptions::default()).unwrap_err();

    std::fs::write(&key_path, "not a key\n").unwrap();
    let err = open();
    assert!(
        matches!(&err, CaError::InvalidRootKey { path, .. } if *path == key_path),
        "{err}"
    );
    assert!(
        err.to_string().contains(&key_path.display().to_string()),
        "{err}"
    );
    // Without its certificate, too: no creator publishes such a key, so no waiting for one.
    std::fs::remove_file(&cert_path).unwrap();
    let started = Instant::now();
    let err = open();
    assert!(
        matches!(&err, CaError::InvalidRootKey { path, .. } if *path == key_path),
        "{err}"
    );
    assert!(started.elapsed() < PUBLISH_WAIT, "{:?}", started.elapsed());
    assert_eq!(std::fs::read(&key_path).unwrap(), b"not a key\n");
    assert!(!cert_path.exists());

    std::fs::write(&key_path, &key_pem).unwrap();
    File::create(&cert_path).unwrap();
    let err = open();
    assert!(
        matches!(&err, CaError::EmptyFile { path } if *path == cert_path),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&cert_path.display().to_string()) && message.contains("empty (0 bytes)"),
        "{message}"
    );
    assert_eq!(std::fs::metadata(&cert_path).unwrap().len(), 0);
    assert_eq!(std::fs::read(&key_path).unwrap(), key_pem);
}

/// Size of the pages a tmpfs allocates (x86-64, aarch64 with 4 KiB pages).
const PAGE: usize = 4096;

/// A tmpfs of a few pages mounted on a fresh temporary directory: a real file system that
/// fills up. Unmounted when dropped, also when the test fails.
struct SmallTmpfs {
    mount_point: PathBuf,
    _dir: TempDir,
}

impl SmallTmpfs {
    fn mount(tag: &str, pages: usize) -> Self {
        let dir = TempDir::new(tag);
        let mount_point = dir.path().join("fs");
        std::fs::create_dir(&mount_point).unwrap();
        let options = format!("size={},mode=0700", pages * PAGE);
        nix::mount::mount(
            Some("tmpfs"),
            &mount_point,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            Some(options.as_str()),
        )
        .unwrap_or_else(|e| {
            panic!(
                "mounting a tmpfs ({options}) on {}: {e}; this test needs root",
                mount_point.display()
            )
        });
        Self {
            mount_point,
            _dir: dir,
        }
    }

    fn path(&self) -> &Path {
        &self.mount_point
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.mount_point, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("unmounting {}: {e}", self.mount_point.display());
        }
    }
}

/// A file at `path` that takes all the free space of its file system.
fn fill(path: &Path) -> File {
    let mut file = File::create(path).unwrap();
    loop {
        match file.write_all(&[0; PAGE]) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::StorageFull => return file,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

#[test]
fn a_full_disk_leaves_no_partial_root_and_a_later_start_creates_it() {
    let fs = SmallTmpfs::mount("full-disk", 16);
    let dir = fs.path().join("ca");
    let filler = fill(&fs.path().join("filler"));
    // Free one page at a time: no room for the key, then for the key but not the certificate,
    // then for both.
    let mut failed_writing = Vec::new();
    let ca = loop {
        match BuiltinCa::load_or_create(&dir, "td", BuiltinCaOptions::default()) {
            Ok(ca) => break ca,
            Err(CaError::WriteTempFile { path, temp, source }) => {
                assert_eq!(source.kind(), ErrorKind::StorageFull, "{source}");
                assert_eq!(temp.parent(), Some(dir.as_path()));
                // Nothing half-written, no temporary file, nothing that stops the next start.
                assert_eq!(names_in(&dir), Vec::<String>::new());
                failed_writing.push(path);
                assert!(failed_writing.len() < 64, "{failed_writing:?}");
                let len = filler.metadata().unwrap().len();
                filler.set_len(len - PAGE as u64).unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(
        failed_writing.contains(&dir.join(ROOT_KEY_FILE))
            && failed_writing.contains(&dir.join(ROOT_CERT_FILE)),
        "{failed_writing:?}"
    );
    assert_complete_store(&dir);
    assert_eq!(mode(&dir.join(ROOT_KEY_FILE)), 0o600);
    issue_web(&ca).unwrap();
    let reloaded = BuiltinCa::load_or_create(&dir, "td", BuiltinCaOptions::default()).unwrap();
    assert_eq!(reloaded.trust_bundle(), ca.trust_bundle());
}

#[test]
fn an_empty_key_left_by_a_full_disk_is_named_and_not_replaced() {
    let fs = SmallTmpfs::mount("empty-key", 16);
    let dir = fs.path().join("ca");
    std::fs::create_dir(&dir).unwrap();
    let key_path = dir.join(ROOT_KEY_FILE);
    // What a writer that creates the key file in place leaves on a full disk: an empty file.
    let filler_path = fs.path().join("filler");
    let filler = fill(&filler_path);
    let pem = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .serialize_pem();
    let mut key_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .unwrap();
    let full = key_file.write_all(pem.as_bytes()).unwrap_err();
    assert_eq!(full.kind(), ErrorKind::StorageFull, "{full}");
    drop((key_file, filler));
    std::fs::remove_file(&filler_path).unwrap();

    // With room again, the empty key is reported by name, and left for a person to look at.
    for _ in 0..2 {
        let err = BuiltinCa::load_or_create(&dir, "td", BuiltinCaOptions::default()).unwrap_err();
        assert!(
            matches!(&err, CaError::EmptyFile { path } if *path == key_path),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&key_path.display().to_string()) && message.contains("empty"),
            "{message}"
        );
        assert_eq!(names_in(&dir), [ROOT_KEY_FILE]);
        assert_eq!(std::fs::metadata(&key_path).unwrap().len(), 0);
    }
}

#[tokio::test]
async fn signing_stops_while_the_key_file_is_open_to_group_or_others() {
    let tmp = TempDir::new("sign-mode");
    let ca = new_ca(&tmp, "td");
    let key_path = ca.root_key_path().to_owned();
    issue_web(&ca).unwrap();
    for open_mode in [0o640, 0o604, 0o660, 0o644] {
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(open_mode)).unwrap();
        let err = issue_web(&ca).unwrap_err();
        assert!(
            matches!(&err, CaError::KeyFileTooOpen { path, mode } if *path == key_path && *mode == open_mode),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&key_path.display().to_string())
                && message.contains(&format!("{open_mode:04o}")),
            "{message}"
        );
    }
    // Through the CA interface the agent uses, too.
    let key = WorkloadKey::generate().unwrap();
    let err = ca
        .sign(request_for(&key, &identity("td", "web"), None))
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::KeyFileTooOpen { .. }), "{err}");

    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    issue_web(&ca).unwrap();
}

#[test]
fn signing_stops_while_a_root_file_is_replaced() {
    let tmp = TempDir::new("sign-replaced");
    let ca = new_ca(&tmp, "td");
    let cert_path = ca.root_cert_path().to_owned();
    let key_path = ca.root_key_path().to_owned();
    let cert_pem = std::fs::read(&cert_path).unwrap();
    let key_pem = std::fs::read(&key_path).unwrap();
    let other_tmp = TempDir::new("sign-replaced-other");
    let other = new_ca(&other_tmp, "td");
    issue_web(&ca).unwrap();
    let refused = |expected: &Path| {
        let err = issue_web(&ca).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains(&expected.display().to_string()),
            "{message}"
        );
        err
    };

    std::fs::write(&cert_path, "garbage\n").unwrap();
    let err = refused(&cert_path);
    assert!(
        matches!(err, CaError::RootCertCount { count: 0, .. }),
        "{err}"
    );
    std::fs::write(
        &cert_path,
        "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = refused(&cert_path);
    assert!(matches!(err, CaError::InvalidRootCert { .. }), "{err}");
    // Another valid root, moved in under the name (a new inode): still not the loaded one.
    let moved_in = cert_path.with_file_name("other.pem");
    std::fs::copy(other.root_cert_path(), &moved_in).unwrap();
    std::fs::rename(&moved_in, &cert_path).unwrap();
    let err = refused(&cert_path);
    assert!(matches!(err, CaError::RootFileReplaced { .. }), "{err}");
    std::fs::write(&cert_path, "").unwrap();
    let err = refused(&cert_path);
    assert!(matches!(err, CaError::EmptyFile { .. }), "{err}");
    std::fs::write(&cert_path, &cert_pem).unwrap();
    issue_web(&ca).unwrap();

    std::fs::write(&key_path, std::fs::read(other.root_key_path()).unwrap()).unwrap();
    let err = refused(&key_path);
    assert!(matches!(err, CaError::RootFileReplaced { .. }), "{err}");
    std::fs::write(&key_path, "").unwrap();
    let err = refused(&key_path);
    assert!(matches!(err, CaError::EmptyFile { .. }), "{err}");
    std::fs::remove_file(&key_path).unwrap();
    let err = refused(&key_path);
    assert!(
        matches!(&err, CaError::ReadFile { source, .. } if source.kind() == ErrorKind::NotFound),
        "{err}"
    );
    write_private(&key_path, &key_pem);
    issue_web(&ca).unwrap();
}

/// Writes a new file with mode 0600.
fn write_private(path: &Path, contents: &[u8]) {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(contents)
        .unwrap();
}
