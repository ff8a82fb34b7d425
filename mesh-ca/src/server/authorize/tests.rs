use super::*;

const TD: &str = "cluster.local";
const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";

fn policy() -> Policy {
    Policy {
        trust_domain: TD.to_owned(),
        audience: "istio-ca".to_owned(),
        impersonators: vec!["mesh-system/mesh-agent".parse().unwrap()],
    }
}

/// The review of a token of `namespace/account` bound to pod `pod` (UID `uid-<pod>`).
fn review(namespace: &str, account: &str, pod: &str) -> Review {
    Review {
        authenticated: true,
        error: None,
        username: format!("system:serviceaccount:{namespace}:{account}"),
        groups: vec![
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".to_owned(),
        ],
        audiences: vec!["istio-ca".to_owned()],
        pod_name: Some(pod.to_owned()),
        pod_uid: Some(format!("uid-{pod}")),
    }
}

fn pod(namespace: &str, name: &str, account: &str, node: &str) -> PodFacts {
    PodFacts {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: Some(format!("uid-{name}")),
        service_account: account.to_owned(),
        node_name: Some(node.to_owned()),
        phase: Some("Running".to_owned()),
        deleting: false,
    }
}

fn agent() -> (Review, PodFacts) {
    (
        review("mesh-system", "mesh-agent", "agent-a"),
        pod("mesh-system", "agent-a", "mesh-agent", NODE_A),
    )
}

fn web() -> Identity {
    Identity::new(TD, "shop", "web").unwrap()
}

fn decide(
    review: &Review,
    caller_pod: Option<&PodFacts>,
    requested: Option<&str>,
    node_pods: &[PodFacts],
) -> Result<Identity, Refusal> {
    authorize(
        &policy(),
        &Inputs {
            review,
            requested,
            caller_pod,
            node_pods,
        },
    )
}

#[test]
fn a_node_agent_gets_the_identity_of_a_pod_on_its_node() {
    let (review, agent_pod) = agent();
    let pods = [
        agent_pod.clone(),
        pod("shop", "web-1", "web", NODE_A),
        pod("shop", "db-1", "db", NODE_B),
    ];
    let got = decide(&review, Some(&agent_pod), Some(web().as_str()), &pods).unwrap();
    assert_eq!(got, web());
}

#[test]
fn a_pending_pod_counts_but_finished_or_deleted_ones_do_not() {
    let (review, agent_pod) = agent();
    let mut pending = pod("shop", "web-1", "web", NODE_A);
    pending.phase = Some("Pending".to_owned());
    assert!(decide(&review, Some(&agent_pod), Some(web().as_str()), &[pending]).is_ok());
    for (phase, deleting) in [("Succeeded", false), ("Failed", false), ("Running", true)] {
        let mut gone = pod("shop", "web-1", "web", NODE_A);
        gone.phase = Some(phase.to_owned());
        gone.deleting = deleting;
        let refused = decide(&review, Some(&agent_pod), Some(web().as_str()), &[gone]);
        assert!(
            matches!(&refused, Err(Refusal::NoPodOnNode { node, .. }) if node == NODE_A),
            "{phase} deleting={deleting}: {refused:?}"
        );
    }
}

#[test]
fn an_identity_whose_pods_run_on_another_node_is_refused() {
    let (review, agent_pod) = agent();
    let pods = [pod("shop", "web-1", "web", NODE_B)];
    let refused = decide(&review, Some(&agent_pod), Some(web().as_str()), &pods).unwrap_err();
    assert!(
        matches!(&refused, Refusal::NoPodOnNode { requested, node } if *requested == web() && node == NODE_A),
        "{refused}"
    );
    // Same node, other namespace or service account: not that identity.
    let pods = [
        pod("other", "web-1", "web", NODE_A),
        pod("shop", "web-2", "web-admin", NODE_A),
    ];
    assert!(matches!(
        decide(&review, Some(&agent_pod), Some(web().as_str()), &pods),
        Err(Refusal::NoPodOnNode { .. })
    ));
}

#[test]
fn only_allow_listed_accounts_impersonate() {
    let review = review("shop", "web", "web-1");
    let web_pod = pod("shop", "web-1", "web", NODE_A);
    let pods = [web_pod.clone(), pod("shop", "db-1", "db", NODE_A)];
    let db = Identity::new(TD, "shop", "db").unwrap();
    let refused = decide(&review, Some(&web_pod), Some(db.as_str()), &pods).unwrap_err();
    assert!(
        matches!(&refused, Refusal::ImpersonationNotAllowed { caller, requested }
            if caller.to_string() == "shop/web" && *requested == db),
        "{refused}"
    );
    // Its own identity, asked for explicitly or not, is fine.
    assert_eq!(
        decide(&review, Some(&web_pod), Some(web().as_str()), &[]).unwrap(),
        web()
    );
    assert_eq!(decide(&review, Some(&web_pod), None, &[]).unwrap(), web());
}

#[test]
fn the_token_must_be_authenticated_for_the_audience_and_a_service_accounts() {
    let (good, agent_pod) = agent();
    let mut expired = good.clone();
    expired.authenticated = false;
    expired.error = Some("token has expired".to_owned());
    assert!(matches!(
        decide(&expired, Some(&agent_pod), None, &[]),
        Err(Refusal::NotAuthenticated { reason: Some(r) }) if r == "token has expired"
    ));
    let mut audience = good.clone();
    audience.audiences = vec!["https://kubernetes.default.svc.cluster.local".to_owned()];
    assert!(matches!(
        decide(&audience, Some(&agent_pod), None, &[]),
        Err(Refusal::WrongAudience { expected, .. }) if expected == "istio-ca"
    ));
    let mut user = good.clone();
    user.username = "alice".to_owned();
    user.groups = vec!["system:authenticated".to_owned()];
    assert!(matches!(
        decide(&user, Some(&agent_pod), None, &[]),
        Err(Refusal::NotServiceAccount { username }) if username == "alice"
    ));
    // A service-account-looking user name outside the group is not one.
    let mut impostor = good.clone();
    impostor.groups = vec!["system:authenticated".to_owned()];
    assert!(matches!(
        decide(&impostor, Some(&agent_pod), None, &[]),
        Err(Refusal::NotServiceAccount { .. })
    ));
    let mut unbound = good;
    unbound.pod_name = None;
    unbound.pod_uid = None;
    assert!(matches!(
        decide(&unbound, Some(&agent_pod), None, &[]),
        Err(Refusal::NotBoundToPod { account }) if account.to_string() == "mesh-system/mesh-agent"
    ));
}

#[test]
fn the_callers_pod_must_be_the_one_the_token_is_bound_to_and_alive() {
    let (review, agent_pod) = agent();
    assert!(matches!(
        decide(&review, None, None, &[]),
        Err(Refusal::CallerPodMissing { pod }) if pod == "mesh-system/agent-a"
    ));
    let mut recreated = agent_pod.clone();
    recreated.uid = Some("uid-new".to_owned());
    assert!(matches!(
        decide(&review, Some(&recreated), None, &[]),
        Err(Refusal::CallerPodUidMismatch { bound, .. }) if bound == "uid-agent-a"
    ));
    let mut other_account = agent_pod.clone();
    other_account.service_account = "default".to_owned();
    assert!(matches!(
        decide(&review, Some(&other_account), None, &[]),
        Err(Refusal::CallerPodOtherAccount { pod_account, .. }) if pod_account == "default"
    ));
    let mut finished = agent_pod.clone();
    finished.phase = Some("Succeeded".to_owned());
    assert!(matches!(
        decide(&review, Some(&finished), None, &[]),
        Err(Refusal::CallerPodTerminated { .. })
    ));
    let mut unscheduled = agent_pod;
    unscheduled.node_name = None;
    assert!(matches!(
        decide(&review, Some(&unscheduled), None, &[]),
        Err(Refusal::CallerPodNotScheduled { .. })
    ));
}

#[test]
fn the_identity_asked_for_must_be_a_workload_of_the_trust_domain() {
    let (review, agent_pod) = agent();
    let pods = [pod("shop", "web-1", "web", NODE_A)];
    assert!(matches!(
        decide(&review, Some(&agent_pod), Some("spiffe://other.td/ns/shop/sa/web"), &pods),
        Err(Refusal::OtherTrustDomain { trust_domain, .. }) if trust_domain == TD
    ));
    assert!(matches!(
        decide(
            &review,
            Some(&agent_pod),
            Some("spiffe://cluster.local/admin"),
            &pods
        ),
        Err(Refusal::MalformedIdentity { .. })
    ));
}

#[test]
fn service_account_references_parse_and_print_as_namespace_slash_name() {
    let account: ServiceAccountRef = "mesh-system/mesh-agent".parse().unwrap();
    assert_eq!(account.namespace, "mesh-system");
    assert_eq!(account.to_string(), "mesh-system/mesh-agent");
    for bad in [
        "mesh-agent",
        "/mesh-agent",
        "mesh-system/",
        "Mesh/agent",
        "a/b/c",
    ] {
        assert!(bad.parse::<ServiceAccountRef>().is_err(), "{bad}");
    }
}

#[test]
fn refusals_never_show_the_token_and_name_the_reason() {
    let (review, agent_pod) = agent();
    let refused = decide(&review, Some(&agent_pod), Some(web().as_str()), &[]).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "no running pod of spiffe://cluster.local/ns/shop/sa/web is on node node-a"
    );
}
