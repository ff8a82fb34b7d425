//! Privileged: the L7 waypoint in the netns testbed, from files. A client pod's requests to a
//! Service bound to a waypoint go through its agent over HBONE to the waypoint's pod, which
//! routes each request by the Service's `HTTPRoute` and sends it over HBONE to an endpoint of the
//! chosen backend; real curl as the client (HTTP/1.1 and h2c), `mesh-probe http-echo` as the
//! backends, reporting which backend answered and what it received.
//!
//! Layout: node 0 has the client (meshed) and the waypoint's pod (outside the capture, in the
//! waypoint's namespace); node 1 has the two backends, `v1` and `v2` (meshed).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use mesh_tests::{
    jaeger::{self, Jaeger},
    jwt::{self, sign, TestKey},
    mesh::{Mesh, Shortcut, NS, PLAIN_NS},
    plan,
    telemetry::{
        access_records_in, access_records_once, count, held_back_most_from, lines_once,
        parse_prometheus, sum, warnings_from, warnings_held_back,
    },
    waypoint::Waypoint,
    Pod, Process, TestbedSpec,
};
use serde_json::Value;

const LOG_WAIT: Duration = Duration::from_secs(15);
const APP_PORT: u16 = 8080;
const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";

/// The testbed: 2 nodes × 2 pods; (0, 1) is the waypoint's pod, outside the mesh.
struct Bed {
    mesh: Mesh,
    /// The `v1` and `v2` echo servers.
    backends: Vec<Process>,
    waypoint: Waypoint,
    /// Jaeger, in the waypoint's pod, when the bed is traced.
    jaeger: Option<Jaeger>,
}

impl Bed {
    fn client(&self) -> &Pod {
        self.mesh.pod(0, 0)
    }

    /// Waits until the waypoint and both agents see `count` Services (`what`: which, for the
    /// error).
    fn wait_for_services(&mut self, count: usize, what: &str) {
        let seen = format!("services={count}");
        let updated = |l: &str| l.contains("cluster state updated") && l.contains(&seen);
        self.waypoint
            .process
            .wait_for_line(what, LOG_WAIT, updated)
            .unwrap();
        for agent in &mut self.mesh.agents {
            agent.wait_for_log(what, LOG_WAIT, updated).unwrap();
        }
    }
}

fn service_yaml(name: &str, vip_index: usize, selector: (&str, &str), labels: &str) -> String {
    port_service_yaml(
        name,
        vip_index,
        selector,
        labels,
        ("name: http", 80, APP_PORT),
    )
}

/// A Service with one port: (`name: …` or nothing, port, target port).
fn port_service_yaml(
    name: &str,
    vip_index: usize,
    selector: (&str, &str),
    labels: &str,
    (port_name, port, target): (&str, u16, u16),
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{{labels}}}\nspec:\n  clusterIP: {vip}\n  ports:\n  - {{{port_name}, port: {port}, targetPort: {target}}}\n  selector:\n    {}: \"{}\"\n",
        selector.0,
        selector.1,
        vip = plan::service_vip_v4(vip_index),
    )
}

/// Builds the testbed with Services `web` (bound to waypoint `plain/wp`), `web-v1` and `web-v2`,
/// the waypoint `Gateway`, `route` as the `HTTPRoute` of `web`, the backends and the waypoint.
fn bed(route: &str) -> Bed {
    bed_with(route, &[], &[])
}

/// [`bed`], with extra `http-echo` flags for the `v1` and `v2` backends.
fn bed_with(route: &str, v1_args: &[&str], v2_args: &[&str]) -> Bed {
    bed_full(route, (v1_args, v2_args), false, &[])
}

/// The flags that send every trace a proxy starts to `endpoint`.
fn tracing_args(endpoint: &str) -> Vec<String> {
    vec![
        "--tracing-endpoint".into(),
        endpoint.into(),
        "--tracing-sampling".into(),
        "100".into(),
    ]
}

/// [`bed_with`]; `traced`: a real Jaeger in the waypoint's pod, and the agents and the waypoint
/// exporting every trace to it.
/// The bed: `route` for `web`, the backends started with `args` (v1's, v2's), traced to Jaeger
/// or not, the waypoint with `waypoint_extra` flags too.
fn bed_full(
    route: &str,
    (v1_args, v2_args): (&[&str], &[&str]),
    traced: bool,
    waypoint_extra: &[&str],
) -> Bed {
    let spec = TestbedSpec {
        nodes: 2,
        pods_per_node: 2,
    };
    let mut jaeger = None;
    let mesh = Mesh::new_with(spec, Shortcut::Default, &[(0, 1)], |tb| {
        if !traced {
            return Vec::new();
        }
        let started = Jaeger::start(tb.pod(0, 1), tb.scratch_dir()).expect("Jaeger starts");
        let args = tracing_args(&started.endpoint());
        jaeger = Some(started);
        args
    })
    .expect("meshed testbed");
    let files = &mesh.files;
    let wp_pod = mesh.pod(0, 1).clone();
    files
        .write(
            &format!("pod-{PLAIN_NS}-{}.yaml", wp_pod.name),
            &waypoint_pod(&wp_pod, true),
        )
        .unwrap();
    for (j, version) in [(0, "v1"), (1, "v2")] {
        let pod = mesh.pod(1, j).clone();
        files
            .pod(&pod, "n1", NS, &[("svc", "web"), ("version", version)])
            .unwrap();
    }
    files
        .write(
            "gateway-wp.yaml",
            &format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wp\n  namespace: {PLAIN_NS}\n  labels: {{istio.io/waypoint-for: service}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {{namespaces: {{from: All}}}}}}\n"
            ),
        )
        .unwrap();
    let bound = format!("istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}");
    files
        .write(
            "service-web.yaml",
            &service_yaml("web", 0, ("svc", "web"), &bound),
        )
        .unwrap();
    files
        .write(
            "service-web-v1.yaml",
            &service_yaml("web-v1", 1, ("version", "v1"), ""),
        )
        .unwrap();
    files
        .write(
            "service-web-v2.yaml",
            &service_yaml("web-v2", 2, ("version", "v2"), ""),
        )
        .unwrap();
    files.write("httproute-web.yaml", route).unwrap();
    let backends = [(0, "v1", v1_args), (1, "v2", v2_args)]
        .iter()
        .map(|&(j, name, args)| echo(mesh.pod(1, j), name, args))
        .collect();
    // The waypoint shares Jaeger's pod: its collector is on the loopback.
    let mut waypoint_args = if traced {
        tracing_args(&format!("http://127.0.0.1:{}", jaeger::OTLP_PORT))
    } else {
        Vec::new()
    };
    waypoint_args.extend(waypoint_extra.iter().map(|&a| a.to_owned()));
    let waypoint = Waypoint::start_with(&wp_pod, &mesh.options, PLAIN_NS, "wp", &waypoint_args)
        .expect("waypoint starts");
    let mut bed = Bed {
        mesh,
        backends,
        waypoint,
        jaeger,
    };
    bed.wait_for_services(3, "the Services");
    bed
}

/// The waypoint's pod as the controller's Deployment makes it: labelled with its `Gateway`, out
/// of the capture, under the waypoint's service account (`wp`, the Gateway's name).
fn waypoint_pod(pod: &Pod, ready: bool) -> String {
    let ready = if ready { "True" } else { "False" };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {PLAIN_NS}\n  labels: {{{GATEWAY_NAME}: wp, istio.io/dataplane-mode: none}}\nspec:\n  nodeName: n0\n  serviceAccountName: wp\nstatus:\n  phase: Running\n  conditions: [{{type: Ready, status: \"{ready}\"}}]\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}]\n",
        name = pod.name,
        ip = pod.ipv4,
    )
}

fn echo(pod: &Pod, name: &str, extra: &[&str]) -> Process {
    let bin = mesh_tests::agent::binary("mesh-probe", "mesh-tests").expect("mesh-probe");
    let mut cmd = pod.command(bin);
    cmd.args([
        "http-echo",
        &SocketAddr::new(IpAddr::V4(pod.ipv4), APP_PORT).to_string(),
    ])
    .args(["--name", name])
    .args(extra);
    let mut process = Process::spawn(format!("echo {name}"), &mut cmd).expect("echo server");
    process
        .wait_for_line("the echo server", LOG_WAIT, |l| l.starts_with("listening "))
        .expect("echo server listens");
    process
}

/// The canary route of `web`: requests with `x-version: v2` to `web-v2`, the rest 90/10.
fn canary_route() -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\n  namespace: {NS}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: web, port: 80}}\n  rules:\n  - name: ab\n    matches:\n    - headers: [{{name: x-version, value: v2}}]\n    backendRefs: [{{name: web-v2, port: 80}}]\n  - name: canary\n    backendRefs:\n    - {{name: web-v1, port: 80, weight: 90}}\n    - {{name: web-v2, port: 80, weight: 10}}\n"
    )
}

/// Runs curl in `pod` with `args`; its stdout.
fn curl_raw(pod: &Pod, args: &[&str]) -> String {
    let out = pod
        .command("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .expect("running curl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs curl in `pod` with `args`; its stdout, one echo line per request.
fn curl(pod: &Pod, args: &[String]) -> Vec<Value> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl_raw(pod, &args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not an echo line {l:?}")))
        .collect()
}

fn url(path: &str) -> String {
    format!("http://{}{path}", plan::service_vip_v4(0))
}

fn backends(lines: &[Value]) -> BTreeMap<String, usize> {
    lines.iter().fold(BTreeMap::new(), |mut counts, line| {
        *counts
            .entry(line["backend"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
        counts
    })
}

/// The canary test's telemetry: the waypoint's request metrics, with Istio's names and labels,
/// and its access log (the request ids the backend saw).
fn canary_telemetry(bed: &Bed, client: &Pod, v2: usize, request_id: &str) {
    let principal = format!("spiffe://cluster.local/ns/{NS}/sa/sa-{}", client.name);
    let to_v2 = [
        ("reporter", "waypoint"),
        ("destination_service", "web-v2.mesh.svc.cluster.local"),
        ("destination_service_name", "web-v2"),
        ("destination_workload", bed.mesh.pod(1, 1).name.as_str()),
        ("response_code", "200"),
        ("source_principal", principal.as_str()),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    let samples = waypoint_metrics(bed.mesh.pod(0, 1));
    assert_eq!(
        count(&samples, "istio_requests_total", &to_v2),
        (v2 + 51) as u64
    );
    let all = [("reporter", "waypoint")];
    assert_eq!(count(&samples, "istio_requests_total", &all), 1051);
    assert_eq!(
        count(&samples, "istio_request_duration_milliseconds_count", &all),
        1051
    );
    assert_eq!(count(&samples, "istio_response_bytes_count", &all), 1051);
    assert!(sum(&samples, "istio_response_bytes_sum", &all) > 1051.0 * 100.0);
    assert_eq!(
        count(
            &samples,
            "istio_requests_total",
            &[("request_protocol", "http2")]
        ),
        1,
        "the h2c request"
    );
    let records = access_records_once(
        || bed.waypoint.process.lines(),
        LOG_WAIT,
        |r| r.len() >= 1051,
    );
    assert_eq!(records.len(), 1051);
    let first = records
        .iter()
        .find(|r| r["path"] == "/canary/0")
        .expect("its record");
    assert_eq!(first["status"], 200);
    assert_eq!(first["method"], "GET");
    assert_eq!(first["src"]["identity"], principal.as_str());
    assert_eq!(first["response_flags"], "-");
    assert_eq!(first["request_id"], request_id, "the id the backend saw");
    assert!(
        records
            .iter()
            .any(|r| r["path"] == "/h2" && r["request_id"] == "the-client-s-own"),
        "the client's own id in the log"
    );
    assert!(
        first["upstream"]
            .as_str()
            .is_some_and(|u| u.ends_with(":8080")),
        "{first}"
    );
}

#[test]
fn canary_90_10_over_1000_requests_and_header_based_ab_routing() {
    let bed = bed(&canary_route());
    let client = bed.client().clone();
    // 1,000 requests on one kept-alive connection: the waypoint routes each on its own.
    let urls: Vec<String> = (0..1000).map(|i| url(&format!("/canary/{i}"))).collect();
    let lines = curl(&client, &urls);
    assert_eq!(lines.len(), 1000);
    let counts = backends(&lines);
    let v2 = counts.get("v2").copied().unwrap_or(0);
    eprintln!("canary split: {counts:?}");
    // Binomial(1000, 0.1): mean 100, standard deviation 9.5; ±4 standard deviations.
    assert!((62..=138).contains(&v2), "v2 took {v2} of 1000: {counts:?}");
    assert_eq!(
        counts.get("v1").copied().unwrap_or(0) + v2,
        1000,
        "{counts:?}"
    );
    // What the backend received: the path, the Service's host, the client's address appended.
    let first = &lines[0];
    assert_eq!(first["path"], "/canary/0");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], plan::service_vip_v4(0).to_string());
    let xff = first["headers"]["x-forwarded-for"][0]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        xff,
        client.ipv4.to_string(),
        "x-forwarded-for is the client's address"
    );
    // Envoy's request id, made up for a request without one (a UUID), one per request.
    let request_id = first["headers"]["x-request-id"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(request_id.len(), 36, "{first}");
    assert_ne!(lines[1]["headers"]["x-request-id"][0], request_id.as_str());

    // Header-based A/B: every request with `x-version: v2` lands on v2.
    let mut args: Vec<String> = vec!["-H".into(), "x-version: v2".into()];
    args.extend((0..50).map(|i| url(&format!("/ab/{i}"))));
    let counts = backends(&curl(&client, &args));
    assert_eq!(counts, BTreeMap::from([("v2".to_owned(), 50)]));

    // h2c through the waypoint: HTTP/2 end to end.
    let lines = curl(
        &client,
        &[
            "--http2-prior-knowledge".into(),
            "-H".into(),
            "x-version: v2".into(),
            "-H".into(),
            "x-request-id: the-client-s-own".into(),
            url("/h2"),
        ],
    );
    assert_eq!(lines.len(), 1);
    assert_eq!(
        lines[0]["headers"]["x-request-id"][0], "the-client-s-own",
        "kept"
    );
    assert_eq!(lines[0]["protocol"], "HTTP/2.0");
    assert_eq!(lines[0]["backend"], "v2");

    canary_telemetry(&bed, &client, v2, &request_id);
}

/// The waypoint's metrics, scraped from inside its pod.
fn waypoint_metrics(pod: &Pod) -> Vec<mesh_tests::telemetry::Sample> {
    let bin = mesh_tests::agent::binary("mesh-probe", "mesh-tests").expect("mesh-probe");
    let out = mesh_tests::process::run(pod.command(bin).args([
        "http",
        "GET",
        "127.0.0.1:15020",
        "/metrics",
    ]))
    .expect("scraping the waypoint");
    let (status, body) = out.split_once('\n').expect("status line");
    assert_eq!(status.trim(), "200", "{body}");
    parse_prometheus(body).expect("Prometheus text")
}

#[test]
fn other_protocols_pass_through_the_waypoint_as_tcp() {
    let mut bed = bed(&canary_route());
    let client = bed.client().clone();
    let v2 = bed.mesh.pod(1, 1).clone();
    let _tcp_echo = mesh_tests::probe::serve(&v2, SocketAddr::new(IpAddr::V4(v2.ipv4), 9000))
        .expect("TCP echo server");
    let bound = format!("istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}");
    // A port named `tcp` (passed through at once) and an unnamed one (sniffed).
    for (name, vip, port_name, port) in [
        ("raw", 3, "name: tcp", 9000),
        ("any", 4, "appProtocol: example.com/x", 9001),
    ] {
        let text = port_service_yaml(
            name,
            vip,
            ("version", "v2"),
            &bound,
            (port_name, port, 9000),
        );
        bed.mesh
            .files
            .write(&format!("service-{name}.yaml"), &text)
            .unwrap();
    }
    bed.wait_for_services(5, "the TCP Services");
    for (vip, port) in [(3, 9000), (4, 9001)] {
        let addr = SocketAddr::new(IpAddr::V4(plan::service_vip_v4(vip)), port);
        let from = bed.waypoint.process.line_count();
        let out = mesh_tests::probe::connect(&client, addr, "not http, byte for byte")
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert!(out.starts_with("echo ok"), "{addr}: {out}");
        // The waypoint logs the tunnel once both halves have closed, which can be just
        // after the client has its echo: wait for the line rather than racing it.
        bed.waypoint
            .process
            .wait_for_line_from(
                from,
                "the TCP tunnel's end at the waypoint",
                LOG_WAIT,
                |l| l.contains("TCP tunnel done"),
            )
            .unwrap_or_else(|e| panic!("{addr} did not pass through the waypoint: {e}"));
    }
    let done = bed
        .waypoint
        .process
        .lines()
        .iter()
        .filter(|l| l.contains("TCP tunnel done"))
        .count();
    assert_eq!(done, 2, "both through the waypoint, and nothing else");
}

#[test]
fn a_websocket_echo_through_the_waypoint() {
    let bed = bed(&canary_route());
    let client = bed.client().clone();
    let bin = mesh_tests::agent::binary("mesh-probe", "mesh-tests").expect("mesh-probe");
    let addr = format!("{}:80", plan::service_vip_v4(0));
    let out = mesh_tests::process::run(client.command(bin).args([
        "ws",
        &addr,
        "hello over the waypoint",
        "--count",
        "20",
    ]))
    .expect("WebSocket client");
    assert!(out.starts_with("ws ok messages=20 backend=v"), "{out}");
    assert!(out.contains("status=101"), "{out}");
    let mut waypoint = bed.waypoint;
    waypoint
        .process
        .wait_for_line("the upgraded connection's end", LOG_WAIT, |l| {
            l.contains("upgraded connection done")
        })
        .unwrap();
    let upgraded = |r: &Value| r["path"] == "/ws" && r["status"] == 101;
    let records = access_records_once(
        || waypoint.process.lines(),
        LOG_WAIT,
        |r| r.iter().any(upgraded),
    );
    assert!(
        records.iter().any(upgraded),
        "the upgrade's record: {records:?}"
    );
}

#[test]
fn h2_streams_multiplexed_on_one_connection_are_each_routed() {
    let bed = bed(&canary_route());
    let client = bed.client().clone();
    // 200 requests, 50 at a time, multiplexed on one h2c connection by h2load (curl 7.88's
    // `--parallel` with prior knowledge fails on its own, against any server).
    let out = client
        .command("h2load")
        .args(["-n", "200", "-c", "1", "-m", "50", &url("/mux")])
        .output()
        .expect("running h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "h2load: {text}");
    assert!(
        text.contains("requests: 200 total, 200 started, 200 done, 200 succeeded"),
        "{text}"
    );
    assert!(text.contains("status codes: 200 2xx"), "{text}");
    assert!(text.contains("Application protocol: h2c"), "{text}");
    // Each stream was routed on its own: both backends answered.
    let counts = served_settled(&[&bed.backends[0], &bed.backends[1]], 200);
    assert_eq!(counts.iter().sum::<usize>(), 200, "{counts:?}");
    assert!(
        counts[1] > 0 && counts[0] > counts[1],
        "90/10 over the streams: {counts:?}"
    );
}

#[test]
fn a_waypoint_restart_under_load() {
    let bed = bed(&canary_route());
    let client = bed.client().clone();
    let wp_pod = bed.mesh.pod(0, 1).clone();
    let Bed { mesh, waypoint, .. } = bed;
    // 600 requests at 100/s, each answered or failed on its own (`000`). `-o` applies to one
    // URL: each gets its own, so no body runs into the next status code.
    let urls = (0..600).flat_map(|i| {
        [
            "-o".to_owned(),
            "/dev/null".to_owned(),
            url(&format!("/load/{i}")),
        ]
    });
    let mut cmd = client.command("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "5",
        "--rate",
        "100/s",
        "-w",
        "%{http_code}\\n",
    ])
    .args(urls);
    let mut load = Process::spawn("load", &mut cmd).expect("curl");
    load.wait_for_line("the load to run", LOG_WAIT, |l| l == "200")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SIGTERM: the waypoint drains (finishes what it has, takes nothing new) and exits.
    let mut old = waypoint.process;
    let status = old
        .terminate(Duration::from_secs(10))
        .expect("the waypoint stops");
    assert!(status.success(), "the waypoint exits cleanly: {status}");
    assert!(old
        .lines()
        .iter()
        .any(|l| l.contains("draining the waypoint's connections")));
    let _new = Waypoint::start(&wp_pod, &mesh.options, PLAIN_NS, "wp").expect("restarts");
    load.wait(Duration::from_secs(30)).expect("the load ends");
    let codes: Vec<String> = load.lines().into_iter().filter(|l| l.len() == 3).collect();
    assert_eq!(codes.len(), 600, "one code per request");
    let ok = codes.iter().filter(|c| *c == "200").count();
    let failed = codes.iter().filter(|c| *c == "000").count();
    eprintln!("waypoint restart under load: {ok} of 600 answered, {failed} failed");
    assert_eq!(ok + failed, 600, "only answers and failures: {codes:?}");
    assert!(failed < 300, "{failed} failed");
    assert!(
        codes[500..].iter().all(|c| c == "200"),
        "after the restart, all answered"
    );
}

#[test]
fn virtual_service_faults_and_destination_rule_subsets() {
    let istio = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  hosts: [web]\n  http:\n  - name: alice\n    match: [{{headers: {{x-user: {{exact: alice}}}}}}]\n    route: [{{destination: {{host: web, subset: v2}}}}]\n  - name: faulty\n    match: [{{uri: {{prefix: /faulty}}}}]\n    fault: {{abort: {{httpStatus: 503, percentage: {{value: 50}}}}}}\n    route: [{{destination: {{host: web, subset: v1}}}}]\n  - name: slow\n    match: [{{uri: {{prefix: /slow}}}}]\n    fault: {{delay: {{fixedDelay: 300ms, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: web, subset: v1}}}}]\n  - name: rest\n    route: [{{destination: {{host: web, subset: v1}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n"
    );
    let bed = bed(&istio);
    let client = bed.client().clone();
    // Header-based A/B to DestinationRule subsets of one Service.
    let urls: Vec<String> = (0..30).map(|i| url(&format!("/ab/{i}"))).collect();
    assert_eq!(
        backends(&curl(&client, &urls)),
        BTreeMap::from([("v1".to_owned(), 30)])
    );
    let mut args: Vec<String> = vec!["-H".into(), "x-user: alice".into()];
    args.extend(urls.iter().cloned());
    assert_eq!(
        backends(&curl(&client, &args)),
        BTreeMap::from([("v2".to_owned(), 30)])
    );
    // Abort injected in half of 200 requests, before any backend sees them.
    let served_before = served(&bed.backends[0]);
    // `-o` applies to the first URL only: the others' bodies come out too, on lines of their own.
    let mut args: Vec<&str> = vec!["-o", "/dev/null", "-w", "\\n%{http_code}\\n"];
    let faulty: Vec<String> = (0..200).map(|i| url(&format!("/faulty/{i}"))).collect();
    args.extend(faulty.iter().map(String::as_str));
    let codes = curl_raw(&client, &args);
    let aborted = codes.lines().filter(|c| *c == "503").count();
    let ok = codes.lines().filter(|c| *c == "200").count();
    eprintln!("fault abort 50%: {aborted} of 200 aborted");
    // Binomial(200, 0.5): standard deviation 7.1; ±5 of them.
    assert!((65..=135).contains(&aborted), "{aborted} aborted");
    assert_eq!(aborted + ok, 200);
    assert_eq!(
        served_settled(&[&bed.backends[0]], served_before + ok)[0] - served_before,
        ok,
        "aborted requests reach no backend"
    );
    // A delay injected in every request.
    let started = std::time::Instant::now();
    let slow: Vec<String> = (0..3).map(|i| url(&format!("/slow/{i}"))).collect();
    assert_eq!(curl(&client, &slow).len(), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let samples = waypoint_metrics(bed.mesh.pod(0, 1));
    let fault = [("response_flags", "FI"), ("response_code", "503")];
    assert_eq!(
        count(&samples, "istio_requests_total", &fault),
        aborted as u64
    );
    assert_eq!(
        count(
            &samples,
            "istio_requests_total",
            &[("response_flags", "DI")]
        ),
        3
    );
}

#[test]
fn grpc_unary_and_streaming_calls_routed_by_a_grpc_route() {
    let mut bed = bed(&canary_route());
    let client = bed.client().clone();
    let bin = mesh_tests::agent::binary("mesh-probe", "mesh-tests").expect("mesh-probe");
    // A gRPC health server on each backend, answering SERVING for its own name only.
    let _servers: Vec<Process> = [(0, "v1"), (1, "v2")]
        .iter()
        .map(|&(j, name)| {
            let pod = bed.mesh.pod(1, j).clone();
            let mut cmd = pod.command(&bin);
            cmd.args(["grpc-serve", &format!("{}:7070", pod.ipv4), "--name", name]);
            let mut p = Process::spawn(format!("grpc {name}"), &mut cmd).expect("gRPC server");
            p.wait_for_line("the gRPC server", LOG_WAIT, |l| l.starts_with("listening "))
                .expect("listens");
            p
        })
        .collect();
    let bound = format!("istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}");
    let files = &bed.mesh.files;
    for (name, vip, selector, labels) in [
        ("grpc", 5, ("svc", "web"), bound.as_str()),
        ("grpc-v1", 6, ("version", "v1"), ""),
        ("grpc-v2", 7, ("version", "v2"), ""),
    ] {
        let text = port_service_yaml(name, vip, selector, labels, ("name: grpc", 7070, 7070));
        files.write(&format!("service-{name}.yaml"), &text).unwrap();
    }
    files
        .write(
            "grpcroute.yaml",
            &format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: grpc, namespace: {NS}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: grpc}}]\n  rules:\n  - matches: [{{method: {{service: grpc.health.v1.Health, method: Watch}}}}]\n    backendRefs: [{{name: grpc-v2, port: 7070}}]\n  - backendRefs:\n    - {{name: grpc-v1, port: 7070, weight: 80}}\n    - {{name: grpc-v2, port: 7070, weight: 20}}\n"
            ),
        )
        .unwrap();
    bed.wait_for_services(6, "the gRPC Services");
    let addr = format!("{}:7070", plan::service_vip_v4(5));
    // 200 unary calls on one h2c connection, split 80/20 between the backends.
    let out = mesh_tests::process::run(client.command(&bin).args([
        "grpc",
        &addr,
        "--service",
        "v1",
        "--count",
        "200",
    ]))
    .expect("gRPC client");
    let field = |name: &str| -> usize {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {out:?}"))
    };
    let (v1, v2) = (field("serving"), field("not_found"));
    eprintln!("gRPC 80/20: v1 {v1}, v2 {v2}");
    assert_eq!(v1 + v2, 200);
    // Binomial(200, 0.8): standard deviation 5.7; ±5 of them.
    assert!((132..=188).contains(&v1), "v1 took {v1} of 200");
    // A server-streaming call, matched by its method: always v2.
    let watch = |service: &str| {
        client
            .command(&bin)
            .args(["grpc", &addr, "--service", service, "--watch"])
            .output()
            .expect("gRPC watch")
    };
    let on_v2 = watch("v2");
    assert_eq!(
        String::from_utf8_lossy(&on_v2.stdout).trim(),
        "watch status=SERVING"
    );
    let not_v1 = watch("v1");
    assert!(!not_v1.status.success(), "v1's name is unknown to v2");
    assert!(String::from_utf8_lossy(&not_v1.stderr).contains("service not registered"));
    // gRPC statuses from the trailers, in the waypoint's metrics.
    let samples = waypoint_metrics(bed.mesh.pod(0, 1));
    let grpc = |status: &str| {
        count(
            &samples,
            "istio_requests_total",
            &[
                ("request_protocol", "grpc"),
                ("grpc_response_status", status),
            ],
        )
    };
    assert_eq!(grpc("0"), v1 as u64, "the SERVING checks");
    // Istio's gRPC message counters: a unary call is one message each way.
    let ok = [("request_protocol", "grpc"), ("grpc_response_status", "0")];
    let messages = |name: &str| count(&samples, name, &ok);
    assert_eq!(messages("istio_request_messages_total"), v1 as u64);
    assert_eq!(messages("istio_response_messages_total"), v1 as u64);
    assert_eq!(
        grpc("5"),
        v2 as u64 + 1,
        "NOT_FOUND: the checks v2 answered and the refused watch"
    );
    grpc_method_denied_by_policy(&mut bed, &bin, &addr);
}

/// An `AuthorizationPolicy` denying the streaming method of the Service at `addr` (by its path,
/// as Istio writes gRPC methods): the client gets `PERMISSION_DENIED` with Envoy's message, unary
/// calls go on.
fn grpc_method_denied_by_policy(bed: &mut Bed, bin: &std::path::Path, addr: &str) {
    let client = bed.client().clone();
    let deny = "  targetRefs: [{kind: Service, name: grpc}]\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/grpc.health.v1.Health/Watch]}}]\n";
    bed.mesh
        .files
        .write("authz-grpc.yaml", &authz_policy(NS, "no-watch", deny))
        .unwrap();
    wait_for_policies(bed, 1);
    let denied = client
        .command(bin)
        .args(["grpc", addr, "--service", "v2", "--watch"])
        .output()
        .expect("gRPC watch");
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success(), "the watch is denied");
    assert!(
        stderr.to_lowercase().contains("permission") && stderr.contains("RBAC: access denied"),
        "{stderr}"
    );
    let unary = mesh_tests::process::run(client.command(bin).args([
        "grpc",
        addr,
        "--service",
        "v1",
        "--count",
        "1",
    ]))
    .expect("a unary call is still allowed");
    assert!(
        unary.contains("serving=") || unary.contains("not_found="),
        "{unary}"
    );
    let samples = waypoint_metrics(bed.mesh.pod(0, 1));
    let denied_count = count(
        &samples,
        "istio_requests_total",
        &[("request_protocol", "grpc"), ("grpc_response_status", "7")],
    );
    assert_eq!(
        denied_count, 1,
        "the denied watch, counted as PERMISSION_DENIED"
    );
}

/// Whether a plain curl from `pod` to `target` gets an answer.
fn answered(pod: &Pod, target: &str) -> bool {
    pod.command("curl")
        .args(["-sS", "-o", "/dev/null", "--max-time", "10", target])
        .status()
        .expect("curl")
        .success()
}

#[test]
fn bypassing_the_waypoint_is_refused_unless_allowed_and_an_unready_waypoint_fails_closed() {
    let bed = bed(&canary_route());
    let client = bed.client().clone();
    let Bed {
        mut mesh, waypoint, ..
    } = bed;
    let v1 = mesh.pod(1, 0).clone();
    let v1_direct = format!("http://{}:{APP_PORT}/", v1.ipv4);
    let v1_service = format!("http://{}/", plan::service_vip_v4(1));
    // Through the waypoint: answered (the control).
    assert!(answered(&client, &url("/")));
    // v1 serves `web`, bound to the waypoint: its agent refuses connections that skip it, by
    // its own unbound Service or by its address.
    let from = mesh.agents[1].log_len();
    assert!(
        !answered(&client, &v1_service),
        "past the waypoint by web-v1"
    );
    assert!(
        !answered(&client, &v1_direct),
        "past the waypoint by the pod's address"
    );
    mesh.agents[1]
        .wait_for_log_from(from, "the refusal at v1's agent", LOG_WAIT, |l| {
            l.contains("\"waypoint_bypass\"") && l.contains("waypoint plain/wp")
        })
        .unwrap();
    // The node itself (its kubelet's health probes, from the node's own address on the pod's
    // link) is no bypass: an HTTP probe from v1's node answers, logged as the node's.
    let from = mesh.agents[1].log_len();
    let node = mesh.tb.node(1).clone();
    let probe = node
        .command("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg(&v1_direct)
        .output()
        .expect("curl from the node");
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout),
        "200",
        "the node's probe"
    );
    mesh.agents[1]
        .wait_for_log_from(from, "the node's probe in the access log", LOG_WAIT, |l| {
            l.contains("\"log\":\"access\"") && l.contains("\"node_local\"")
        })
        .unwrap();
    // An ALLOW policy that names the client lets it past the waypoint, explicitly.
    let from = mesh.agents[1].log_len();
    mesh.files
        .write(
            "authz-direct.yaml",
            &format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: direct\n  namespace: {NS}\nspec:\n  selector: {{matchLabels: {{version: v1}}}}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/{NS}/sa/sa-{}\"]}}}}]\n",
                client.name
            ),
        )
        .unwrap();
    mesh.agents[1]
        .wait_for_log_from(from, "the policy", LOG_WAIT, |l| {
            l.contains("cluster state updated") && l.contains("authorization_policies=1")
        })
        .unwrap();
    assert!(answered(&client, &v1_service), "explicitly allowed");
    mesh.files.remove("authz-direct.yaml").unwrap();

    // The waypoint's pod is no longer ready: the source agent refuses the connection instead
    // of sending it past the waypoint.
    drop(waypoint);
    let wp_pod = mesh.pod(0, 1).clone();
    let from = mesh.agents[0].log_len();
    mesh.files
        .write(
            &format!("pod-{PLAIN_NS}-{}.yaml", wp_pod.name),
            &waypoint_pod(&wp_pod, false),
        )
        .unwrap();
    // Each try fails; once the agent has read the pod's readiness, it says why.
    let refused = |l: &str| {
        l.contains("connection refused") && l.contains("waypoint plain/wp has no ready pod")
    };
    let deadline = std::time::Instant::now() + LOG_WAIT;
    loop {
        assert!(
            !answered(&client, &url("/")),
            "no answer past an unready waypoint"
        );
        if mesh.agents[0].logs()[from..].iter().any(|l| refused(l)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no refusal logged");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A route of `web` with one rule (`rule`: YAML at the rule's indentation, without the dash).
fn one_rule_route(rule: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\n  namespace: {NS}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: web, port: 80}}\n  rules:\n  - {rule}"
    )
}

/// How many requests a backend has served so far (its `served` lines).
fn served(backend: &Process) -> usize {
    backend
        .lines()
        .iter()
        .filter(|l| l.starts_with("served "))
        .count()
}

/// How many requests the backends have served, once their output has caught up with at least
/// `at_least` in all (a line is read from the pipe a moment after the answer went out), or after
/// the log wait if it never does.
fn served_settled(backends: &[&Process], at_least: usize) -> Vec<usize> {
    let deadline = std::time::Instant::now() + LOG_WAIT;
    loop {
        let counts: Vec<usize> = backends.iter().map(|b| served(b)).collect();
        if counts.iter().sum::<usize>() >= at_least || std::time::Instant::now() >= deadline {
            // A moment more, so that a count above `at_least` would show.
            std::thread::sleep(Duration::from_millis(100));
            return backends.iter().map(|b| served(b)).collect();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn retries_turn_503s_into_200s_and_stop_at_the_attempt_limit() {
    // v1 fails its first 2 requests, v2 its first 5; the rule retries 503 up to 2 times.
    let route = |backend: &str| {
        one_rule_route(&format!(
            "backendRefs: [{{name: {backend}, port: 80}}]\n    retry: {{codes: [503], attempts: 2, backoff: 10ms}}\n"
        ))
    };
    // A `connectionPool` without `maxRetries` limits no retry (it stopped them all before).
    let pool = format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web-v1, namespace: {NS}}}\nspec:\n  host: web-v1\n  trafficPolicy: {{connectionPool: {{http: {{http2MaxRequests: 100, idleTimeout: 1h}}}}}}\n"
    );
    let bed = bed_with(
        &format!("{}{pool}", route("web-v1")),
        &["--fail-first", "2"],
        &["--fail-first", "5"],
    );
    let client = bed.client().clone();
    let code = |path: &str| {
        curl_raw(
            &client,
            &["-o", "/dev/null", "-w", "%{http_code}", &url(path)],
        )
    };
    assert_eq!(code("/retry"), "200", "two 503s retried into a 200");
    assert_eq!(
        served_settled(&[&bed.backends[0]], 3),
        [3],
        "the first attempt and two retries"
    );
    bed.mesh
        .files
        .write("httproute-web.yaml", &route("web-v2"))
        .unwrap();
    let mut waypoint = bed.waypoint;
    waypoint
        .process
        .wait_for_line("the new route", LOG_WAIT, |l| {
            l.contains("cluster state updated") && l.contains("generation=2")
        })
        .unwrap();
    assert_eq!(code("/limit"), "503", "still failing after the last retry");
    assert_eq!(
        served_settled(&[&bed.backends[1]], 3),
        [3],
        "no more than the attempt limit"
    );
    // The next request's third attempt is v2's sixth request, its first 200.
    assert_eq!(code("/limit"), "200");
    assert_eq!(served_settled(&[&bed.backends[1]], 6), [6]);
}

#[test]
fn timeouts_answer_504_within_tolerance() {
    // v1 answers after 2 s; the request timeout is 500 ms.
    let route =
        one_rule_route("backendRefs: [{name: web-v1, port: 80}]\n    timeouts: {request: 500ms}\n");
    let bed = bed_with(&route, &["--delay-ms", "2000"], &[]);
    let client = bed.client().clone();
    let started = std::time::Instant::now();
    let code = curl_raw(
        &client,
        &["-o", "/dev/null", "-w", "%{http_code}", &url("/slow")],
    );
    let took = started.elapsed();
    assert_eq!(code, "504");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1900),
        "answered after {took:?}, expected about 500 ms"
    );
}

#[test]
fn redirects_rewrites_header_modifiers_and_mirrors() {
    let route = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\n  namespace: {NS}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: web, port: 80}}\n  rules:\n  - matches: [{{path: {{value: /old}}}}]\n    filters:\n    - type: RequestRedirect\n      requestRedirect: {{scheme: https, hostname: example.com, statusCode: 301, path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}}}\n  - matches: [{{path: {{value: /app}}}}]\n    filters:\n    - type: URLRewrite\n      urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {{set: [{{name: x-added, value: yes}}], remove: [x-secret]}}\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {{add: [{{name: x-route, value: app}}]}}\n    - type: RequestMirror\n      requestMirror: {{backendRef: {{name: web-v2, port: 80}}}}\n    backendRefs: [{{name: web-v1, port: 80}}]\n"
    );
    let bed = bed(&route);
    let client = bed.client().clone();
    // Redirect: 301 to https://example.com (443 left out), the prefix replaced, query kept.
    let out = curl_raw(
        &client,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            &url("/old/page?q=1"),
        ],
    );
    assert_eq!(out, "301 https://example.com/new/page?q=1");
    // Rewrite and request headers: v1 gets `/x/y`, `x-added`, no `x-secret`.
    let lines = curl(
        &client,
        &["-H".into(), "x-secret: s".into(), url("/app/x/y?z=1")],
    );
    assert_eq!(lines[0]["backend"], "v1");
    assert_eq!(lines[0]["path"], "/x/y?z=1");
    assert_eq!(lines[0]["headers"]["x-added"][0], "yes");
    assert!(
        lines[0]["headers"].get("x-secret").is_none(),
        "{}",
        lines[0]
    );
    // Response headers: `x-route` added.
    let head = curl_raw(&client, &["-D", "-", "-o", "/dev/null", &url("/app/")]);
    assert!(head.to_ascii_lowercase().contains("x-route: app"), "{head}");
    // Mirror: every `/app` request also reached v2, whose answers were dropped.
    let deadline = std::time::Instant::now() + LOG_WAIT;
    while served(&bed.backends[1]) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        served(&bed.backends[1]),
        2,
        "both /app requests mirrored to v2"
    );
    assert_eq!(served_settled(&[&bed.backends[0]], 2), [2]);
    // Unmatched paths: 404 from the waypoint.
    let code = curl_raw(
        &client,
        &["-o", "/dev/null", "-w", "%{http_code}", &url("/nothing")],
    );
    assert_eq!(code, "404");
    // A client making up a `Host` per request (the attack: a label set per request in the
    // waypoint's metrics, without bound): its 404s are counted under the Service it addressed.
    let url_nothing = url("/nothing");
    let hosts: Vec<String> = (0..20)
        .map(|i| format!("Host: made-up-{i}.example"))
        .collect();
    let mut args: Vec<&str> = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        if i > 0 {
            args.push("--next");
        }
        args.extend(["-sS", "-o", "/dev/null", "-w", "%{http_code}\n", "-H", host]);
        args.push(&url_nothing);
    }
    let codes = curl_raw(&client, &args);
    assert_eq!(codes.lines().filter(|c| *c == "404").count(), 20, "{codes}");
    let samples = waypoint_metrics(bed.mesh.pod(0, 1));
    let no_route = [
        ("destination_service", "web.mesh.svc.cluster.local"),
        ("response_flags", "NR"),
    ];
    assert_eq!(count(&samples, "istio_requests_total", &no_route), 21);
    let made_up: Vec<_> = samples
        .iter()
        .filter(|s| s.labels.values().any(|v| v.contains(".example")))
        .collect();
    assert!(made_up.is_empty(), "{made_up:#?}");
}

/// The attack: a client sends requests that a route mirrors to a backend that answers slowly (or
/// never), each leaving a copy in flight. The waypoint holds at most `--max-mirrors-in-flight`;
/// beyond that mirrors are skipped and counted, the requests themselves unaffected; a mirror
/// ends at the route's request timeout, which frees its place.
#[test]
fn mirrors_in_flight_are_bounded_and_end_at_the_timeout() {
    let route = one_rule_route(
        "filters:\n    - type: RequestMirror\n      requestMirror: {backendRef: {name: web-v2, port: 80}}\n    backendRefs: [{name: web-v1, port: 80}]\n    timeouts: {request: 3s}\n",
    );
    let bed = bed_full(
        &route,
        (&[], &["--delay-ms", "60000"]),
        false,
        &["--max-mirrors-in-flight", "3"],
    );
    let client = bed.client().clone();
    let skipped = || {
        count(
            &waypoint_metrics(bed.mesh.pod(0, 1)),
            "mesh_waypoint_mirrors_skipped_total",
            &[],
        )
    };
    let send = |n: usize| {
        let started = std::time::Instant::now();
        let lines = curl(&client, &vec![url("/m"); n]);
        assert_eq!(backends(&lines), BTreeMap::from([("v1".to_owned(), n)]));
        started.elapsed()
    };
    // Three mirrors held by the slow v2, five skipped; the requests are answered at once.
    let took = send(8);
    assert!(took < Duration::from_secs(2), "8 requests took {took:?}");
    assert_eq!(skipped(), 5);
    // After the route's 3 s timeout the three mirrors have ended: three more go, one is skipped.
    std::thread::sleep(Duration::from_secs(4));
    send(4);
    assert_eq!(skipped(), 6);
}

/// The spans of a trace as Jaeger gives them: `(service, span id, parent span id, name)`.
fn spans_of(trace: &Value) -> Vec<(String, String, Option<String>, String)> {
    let processes = &trace["processes"];
    trace["spans"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|span| {
            let process = span["processID"].as_str().unwrap_or_default();
            let parent = span["references"]
                .as_array()
                .and_then(|refs| refs.iter().find(|r| r["refType"] == "CHILD_OF"))
                .and_then(|r| r["spanID"].as_str())
                .map(str::to_owned);
            (
                processes[process]["serviceName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                span["spanID"].as_str().unwrap_or_default().to_owned(),
                parent,
                span["operationName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

/// The values of resource attribute `key` of a trace's processes (Jaeger's process tags).
fn process_tags(trace: &Value, key: &str) -> Vec<String> {
    trace["processes"]
        .as_object()
        .into_iter()
        .flat_map(|p| p.values())
        .filter_map(|p| p["tags"].as_array())
        .flatten()
        .filter(|t| t["key"] == key)
        .filter_map(|t| t["value"].as_str().map(str::to_owned))
        .collect()
}

/// The `traceparent` an echo line's request carried, as `(trace id, parent span id)`.
fn traceparent_of(line: &Value) -> (String, String) {
    let value = line["headers"]["traceparent"][0]
        .as_str()
        .unwrap_or_else(|| panic!("the backend got no traceparent: {line}"));
    let fields: Vec<&str> = value.split('-').collect();
    assert_eq!(fields.len(), 4, "{value}");
    assert_eq!(fields[3], "01", "sampled: {value}");
    (fields[1].to_owned(), fields[2].to_owned())
}

#[test]
fn spans_from_the_source_through_the_waypoint_to_the_destination_share_one_trace() {
    let route = one_rule_route("backendRefs: [{name: web-v1, port: 80}]\n");
    let mut bed = bed_full(&route, (&[], &[]), true, &[]);
    let client = bed.client().clone();

    // A request without trace context: the source agent starts the trace in its CONNECT, the
    // waypoint continues it in the request and in its own CONNECT to the endpoint.
    let first = curl(&client, &[url("/traced")]);
    let (trace_id, waypoint_span) = traceparent_of(&first[0]);
    // A request of an application's own trace: the waypoint's span joins it.
    let app_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let app_span = "00f067aa0ba902b7";
    let second = curl(
        &client,
        &[
            "-H".into(),
            format!("traceparent: 00-{app_trace}-{app_span}-01"),
            "-H".into(),
            "tracestate: vendor=kept".into(),
            url("/app-traced"),
        ],
    );
    let (second_trace, second_parent) = traceparent_of(&second[0]);
    assert_eq!(second_trace, app_trace, "the application's trace is kept");
    assert_ne!(
        second_parent, app_span,
        "the waypoint's own span is the parent"
    );
    assert_eq!(second[0]["headers"]["tracestate"][0], "vendor=kept");

    // The waypoint's access log names the traces.
    let ids = [trace_id.as_str(), app_trace];
    let named = |records: &[Value], id: &str| records.iter().any(|r| r["trace_id"] == id);
    let records = access_records_once(
        || bed.waypoint.process.lines(),
        LOG_WAIT,
        |r| ids.iter().all(|id| named(r, id)),
    );
    for id in ids {
        assert!(named(&records, id), "waypoint access log names trace {id}");
    }
    // The waypoint's tunnel to the endpoint ends when it stops (it keeps its connections), so
    // does the destination agent's span; the waypoint flushes its spans as it goes.
    bed.waypoint
        .process
        .terminate(Duration::from_secs(10))
        .expect("the waypoint stops");
    let jaeger = bed.jaeger.as_ref().expect("traced bed");
    let trace = jaeger
        .wait_trace(&trace_id, 3, Duration::from_secs(30))
        .expect("the trace in Jaeger");
    let spans = spans_of(&trace);
    eprintln!("trace {trace_id}: {spans:#?}");
    let find = |service: &str, name_start: &str| {
        spans
            .iter()
            .find(|(s, _, _, n)| s == service && n.starts_with(name_start))
            .unwrap_or_else(|| panic!("no {service} span {name_start}…: {spans:#?}"))
            .clone()
    };
    let source = find("mesh-agent", "outbound");
    let waypoint = find("mesh-waypoint", "GET");
    let destination = find("mesh-agent", "inbound");
    assert_eq!(source.2, None, "the source agent's span is the root");
    assert_eq!(
        waypoint.1, waypoint_span,
        "the backend saw the waypoint's span"
    );
    assert_eq!(
        waypoint.2.as_ref(),
        Some(&source.1),
        "waypoint ← source agent"
    );
    assert_eq!(
        destination.2.as_ref(),
        Some(&waypoint.1),
        "destination agent ← waypoint"
    );
    assert!(source.3.contains("web.mesh.svc"), "{source:?}");
    let nodes = process_tags(&trace, "k8s.node.name");
    assert!(
        nodes.iter().any(|n| n == "n0") && nodes.iter().any(|n| n == "n1"),
        "both agents: {nodes:?}"
    );

    // The application's trace holds the waypoint's span, the child of the application's.
    let app = jaeger
        .wait_trace(app_trace, 1, Duration::from_secs(30))
        .expect("the application's trace in Jaeger");
    let app_spans = spans_of(&app);
    assert!(
        app_spans
            .iter()
            .any(|(s, id, parent, _)| s == "mesh-waypoint"
                && *id == second_parent
                && parent.as_deref() == Some(app_span)),
        "{app_spans:#?}"
    );
    // The source agent's access log names its trace too.
    let agent_logs = bed.mesh.agents[0].logs();
    assert!(
        agent_logs
            .iter()
            .any(|l| l.contains("\"log\":\"access\"") && l.contains(&trace_id)),
        "source agent access log names trace {trace_id}"
    );
}

/// Sends `payload` on a TCP connection from `pod` to `addr`, after `delay_ms` of silence, and
/// returns what came back (up to the end of an answer's head, at most 4 KiB) before the peer
/// closed or `wait_s` passed, as text.
fn raw_exchange(pod: &Pod, addr: SocketAddr, delay_ms: u64, payload: &[u8], wait_s: u64) -> String {
    use std::io::Write as _;
    const SCRIPT: &str = "import socket, sys, time
addr, port, delay, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
payload = sys.stdin.buffer.read()
s = socket.create_connection((addr, port), timeout=wait)
time.sleep(delay / 1000)
got = b''
try:
    s.sendall(payload)
    while b'\\r\\n\\r\\n' not in got and len(got) < 4096:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
except OSError as e:
    sys.stderr.write(repr(e))
sys.stdout.write(got.decode('latin-1'))
";
    let mut child = pod
        .command("python3")
        .args(["-c", SCRIPT])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(delay_ms.to_string())
        .arg(wait_s.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running python3");
    let mut stdin = child.stdin.take().expect("python3's stdin");
    stdin.write_all(payload).expect("the payload to python3");
    drop(stdin);
    let out = child.wait_with_output().expect("python3's output");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status line of an HTTP/1.1 answer, or what came instead.
fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("(nothing)")
}

#[test]
fn a_routed_port_is_http_whatever_a_client_sends_first() {
    // Service `open` has an undeclared port (no name Istio knows, no appProtocol), which a
    // waypoint would sniff, and a route that sends `/public` to v1 and answers anything else
    // 404; `/stalled` is retried and has a 1 s request timeout.
    let mut bed = bed(&canary_route());
    let client = bed.client().clone();
    let route = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: open\n  namespace: {NS}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: open, port: 8081}}\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /public}}}}]\n    backendRefs: [{{name: web-v1, port: 80}}]\n  - matches: [{{path: {{type: PathPrefix, value: /stalled}}}}]\n    backendRefs: [{{name: web-v1, port: 80}}]\n    timeouts: {{request: 1s}}\n    retry: {{codes: [503], attempts: 2}}\n"
    );
    bed.mesh.files.write("httproute-open.yaml", &route).unwrap();
    let bound = format!("istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}");
    let service = port_service_yaml(
        "open",
        3,
        ("version", "v1"),
        &bound,
        ("name: site", 8081, APP_PORT),
    );
    bed.mesh.files.write("service-open.yaml", &service).unwrap();
    bed.wait_for_services(4, "Service open");
    let open = SocketAddr::new(IpAddr::V4(plan::service_vip_v4(3)), 8081);
    let request =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: open\r\nConnection: close\r\n\r\n");
    let public = raw_exchange(&client, open, 0, request("/public").as_bytes(), 10);
    assert!(public.starts_with("HTTP/1.1 200"), "{public}");
    // Each is what the waypoint must answer itself. The first three would have gone past the
    // sniffer as TCP, to the Service's pod, which answers any path (an HTTP server skips a
    // blank line before a request and takes any method).
    let upgrade =
        "GET /public HTTP/1.1\r\nHost: open\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n";
    let big = format!(
        "GET /public HTTP/1.1\r\nHost: open\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let stalled = "POST /stalled HTTP/1.1\r\nHost: open\r\nContent-Length: 100\r\n\r\nonly part";
    let attacks: [(&str, u64, String, &str); 6] = [
        (
            "a blank line first",
            0,
            format!("\r\n{}", request("/secret")),
            "404",
        ),
        (
            "a method the sniffer does not list",
            0,
            request("/secret").replacen("GET", "PROPFIND", 1),
            "404",
        ),
        (
            "silence past the sniffing timeout",
            1_500,
            request("/secret"),
            "404",
        ),
        // An upgrade other than WebSocket: refused, as Envoy refuses one it is not configured
        // for (a backend that switched would take the connection's later requests past the
        // routes).
        (
            "an upgrade to a made-up protocol",
            0,
            upgrade.to_owned(),
            "403",
        ),
        // A head larger than the waypoint reads: 431, not a 400 KiB buffer held for it.
        ("a 100 KiB head", 0, big, "431"),
        // A body announced and not sent, on a retried route: the body is read for the retries
        // within the request timeout, so 504 after about 1 s, not a request held open.
        ("a body that stalls", 0, stalled.to_owned(), "504"),
    ];
    let mut failed = Vec::new();
    for (what, delay_ms, payload, status) in attacks {
        let started = std::time::Instant::now();
        let answer = raw_exchange(&client, open, delay_ms, payload.as_bytes(), 10);
        let took = started.elapsed();
        let line = status_line(&answer);
        if !line.starts_with(&format!("HTTP/1.1 {status}")) {
            failed.push(format!("{what}: {status} expected, got {line:?}"));
        } else if took > Duration::from_millis(delay_ms) + Duration::from_secs(5) {
            failed.push(format!("{what}: answered after {took:?}"));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(
        served(&bed.backends[0]),
        1,
        "v1 saw the one /public request and nothing else"
    );
}

/// An `AuthorizationPolicy` `namespace/name` with `spec` (YAML, indented by two).
fn authz_policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

/// Waits until the waypoint sees `count` `AuthorizationPolicies`.
fn wait_for_policies(bed: &mut Bed, count: usize) {
    wait_for_objects(bed, "authorization_policies", count);
}

/// Waits until the waypoint's cluster view has `count` objects of the `kind` its log names
/// (`authorization_policies`, `envoy_filters`, ...).
fn wait_for_objects(bed: &mut Bed, kind: &str, count: usize) {
    let seen = format!("{kind}={count}");
    bed.waypoint
        .process
        .wait_for_line(&seen, LOG_WAIT, |l| {
            l.contains("cluster state updated") && l.contains(&seen)
        })
        .unwrap();
}

#[test]
fn authorization_policies_at_the_waypoint_enforce_http_fields_whatever_the_path_spelling() {
    // Before, a policy with `targetRefs` was enforced nowhere: every request below reached a
    // backend. Now the waypoint enforces it on each request, with its HTTP fields, on the path
    // as it normalizes it (and sends on), so `/./admin`, `/%61dmin`, `//admin` or `/\admin`
    // are `/admin`; a path with `%00` is refused.
    let mut bed = bed(&canary_route());
    let client = bed.client().clone();
    let principal = format!("cluster.local/ns/{NS}/sa/sa-{}", client.name);
    let files = &bed.mesh.files;
    // Service `web`: only this client, only GET, only with `x-team: blue`; never `/admin`.
    let allow = format!(
        "  targetRefs: [{{kind: Service, group: \"\", name: web}}]\n  rules:\n  - from: [{{source: {{principals: [\"{principal}\"]}}}}]\n    to: [{{operation: {{methods: [GET]}}}}]\n    when: [{{key: \"request.headers[x-team]\", values: [blue]}}]\n"
    );
    let deny_admin = "  targetRefs: [{kind: Service, name: web}]\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/admin, /admin/*]}}]\n";
    // The waypoint itself (its Gateway, in its namespace): every Service it serves.
    let deny_gateway = "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/gw/{*}/blocked\"]}}]\n";
    // A TCP Service through the waypoint whose only ALLOW rule needs HTTP: nothing passes.
    let allow_raw = "  targetRefs: [{kind: Service, name: raw}]\n  rules:\n  - to: [{operation: {methods: [GET]}}]\n";
    for (file, text) in [
        (
            "authz-web-allow.yaml",
            authz_policy(NS, "web-allow", &allow),
        ),
        (
            "authz-web-deny.yaml",
            authz_policy(NS, "web-deny-admin", deny_admin),
        ),
        (
            "authz-wp.yaml",
            authz_policy(PLAIN_NS, "wp-deny", deny_gateway),
        ),
        ("authz-raw.yaml", authz_policy(NS, "raw-allow", allow_raw)),
    ] {
        files.write(file, &text).unwrap();
    }
    let v2 = bed.mesh.pod(1, 1).clone();
    let _tcp_echo = mesh_tests::probe::serve(&v2, SocketAddr::new(IpAddr::V4(v2.ipv4), 9000))
        .expect("TCP echo server");
    let bound = format!("istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}");
    let raw = port_service_yaml(
        "raw",
        3,
        ("version", "v2"),
        &bound,
        ("name: tcp", 9000, 9000),
    );
    files.write("service-raw.yaml", &raw).unwrap();
    bed.wait_for_services(4, "Service raw");
    wait_for_policies(&mut bed, 4);

    let web = SocketAddr::new(IpAddr::V4(plan::service_vip_v4(0)), 80);
    let ask = |method: &str, path: &str, team: bool| {
        let team = if team { "X-Team: blue\r\n" } else { "" };
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: web\r\n{team}Content-Length: 0\r\nConnection: close\r\n\r\n");
        raw_exchange(&client, web, 0, request.as_bytes(), 10)
    };
    // (method, path as sent, with the header, the status expected)
    let table: &[(&str, &str, bool, &str)] = &[
        ("GET", "/", true, "200"),
        ("GET", "/", false, "403"),
        ("POST", "/", true, "403"),
        ("GET", "/admin", true, "403"),
        ("GET", "/admin/users", true, "403"),
        ("GET", "/./admin", true, "403"),
        ("GET", "/x/../admin", true, "403"),
        ("GET", "/%61dmin", true, "403"),
        ("GET", "/%2e%2e/admin/users", true, "403"),
        ("GET", "//admin", true, "403"),
        ("GET", "/\\admin", true, "403"),
        ("GET", "/x%00y", true, "400"),
        ("GET", "/administrator", true, "200"),
        ("GET", "/gw/a/blocked", true, "403"),
        ("GET", "/gw/a/b/blocked", true, "200"),
        ("GET", "/x/../public?p=/admin", true, "200"),
    ];
    let mut failed = Vec::new();
    for (method, path, team, status) in table {
        let answer = ask(method, path, *team);
        let line = status_line(&answer);
        if !line.starts_with(&format!("HTTP/1.1 {status}")) {
            failed.push(format!(
                "{method} {path} (x-team: {team}): {status} expected, got {line:?}"
            ));
        } else if *status == "403" && !answer.contains("RBAC: access denied") {
            failed.push(format!(
                "{method} {path}: 403 without Envoy's body: {answer:?}"
            ));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
    // The endpoint got the normalized path.
    let echoed = ask("GET", "/x/../public?p=/admin", true);
    let body = echoed.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(
        body.contains(r#""path":"/public?p=/admin""#) || body.contains(r#""path":"/public""#),
        "{echoed}"
    );
    let allowed = table.iter().filter(|case| case.3 == "200").count() + 1;
    let counts = served_settled(&[&bed.backends[0], &bed.backends[1]], allowed);
    assert_eq!(
        counts.iter().sum::<usize>(),
        allowed,
        "only the allowed requests reached a backend"
    );

    // The access log names what denied each request.
    let records = access_records_once(
        || bed.waypoint.process.lines(),
        LOG_WAIT,
        |r| r.len() > table.len(),
    );
    let authz_of = |path: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["path"] == path)
            .map(|r| r["authz"].as_str().unwrap_or("-").to_owned())
            .collect()
    };
    assert_eq!(authz_of("/admin"), ["denied by mesh/web-deny-admin"; 6]);
    assert_eq!(authz_of("/gw/a/blocked"), ["denied by plain/wp-deny"]);
    assert!(
        authz_of("/").contains(&"denied: no ALLOW policy matched".to_owned()),
        "{:?}",
        authz_of("/")
    );

    // TCP through the waypoint: as in Istio, a DENY rule whose fields are all HTTP holds for
    // every connection (the Gateway's `wp-deny`), and an ALLOW rule with one matches none
    // (`raw-allow`, once `wp-deny` is gone).
    let raw_addr = SocketAddr::new(IpAddr::V4(plan::service_vip_v4(3)), 9000);
    let tcp_refused = |bed: &mut Bed, why: &str| {
        let from = bed.waypoint.process.line_count();
        let out = mesh_tests::probe::connect(&client, raw_addr, "not http")
            .unwrap_or_else(|e| e.to_string());
        assert!(!out.starts_with("echo ok"), "{out}");
        bed.waypoint
            .process
            .wait_for_line_from(from, "the refusal of the TCP tunnel", LOG_WAIT, |l| {
                l.contains("TCP tunnel refused by policy") && l.contains(why)
            })
            .unwrap();
    };
    tcp_refused(&mut bed, "denied by plain/wp-deny");

    // Policies change without a restart: with the DENYs gone, `/admin` is served, and TCP is
    // still refused by the ALLOW policy.
    bed.mesh.files.remove("authz-web-deny.yaml").unwrap();
    bed.mesh.files.remove("authz-wp.yaml").unwrap();
    wait_for_policies(&mut bed, 2);
    assert!(status_line(&ask("GET", "/%61dmin", true)).starts_with("HTTP/1.1 200"));
    assert!(status_line(&ask("GET", "/%61dmin", false)).starts_with("HTTP/1.1 403"));
    tcp_refused(&mut bed, "no ALLOW policy matched");
}

/// curl from `pod` to Service `web` at `path` with `headers`: the status, the answer's head and
/// its body.
fn curl_answer(pod: &Pod, path: &str, headers: &[String]) -> (u16, String, String) {
    let mut args: Vec<&str> = vec!["-i"];
    for header in headers {
        args.extend(["-H", header]);
    }
    let target = url(path);
    args.push(&target);
    let out = curl_raw(pod, &args);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// `web`'s JWT rules (issuer `a` with its keys inline and a claim to a header, issuer `b` with
/// its keys at `keys_addr`), Istio's "require a JWT" and an ALLOW of `a`'s `dev` group and of
/// anyone of `b`.
fn write_jwt_policies(bed: &mut Bed, keys_addr: SocketAddr) {
    let jwks_rsa = serde_json::to_string(&format!("http://{keys_addr}/jwks.json")).unwrap();
    let jwks_ec = serde_json::to_string(jwt::JWKS_EC).unwrap();
    let authn = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: web-jwt, namespace: {NS}}}\nspec:\n  targetRefs: [{{kind: Service, name: web}}]\n  jwtRules:\n  - issuer: https://a.example\n    jwks: {jwks_ec}\n    outputClaimToHeaders: [{{header: x-jwt-team, claim: team}}]\n  - issuer: https://b.example\n    jwksUri: {jwks_rsa}\n  - issuer: http://{keys_addr}\n"
    );
    let require = "  targetRefs: [{kind: Service, name: web}]\n  action: DENY\n  rules:\n  - from: [{source: {notRequestPrincipals: [\"*\"]}}]\n";
    let allow = "  targetRefs: [{kind: Service, name: web}]\n  rules:\n  - from: [{source: {requestPrincipals: [\"https://a.example/*\"]}}]\n    when: [{key: \"request.auth.claims[groups]\", values: [dev]}]\n  - from: [{source: {requestPrincipals: [\"https://b.example/*\"]}}]\n";
    // The third issuer's keys are discovered from its OpenID configuration.
    let allow = format!(
        "{allow}  - from: [{{source: {{requestPrincipals: [\"http://{keys_addr}/*\"]}}}}]\n"
    );
    let files = &bed.mesh.files;
    files.write("authn-web.yaml", &authn).unwrap();
    files
        .write(
            "authz-require.yaml",
            &authz_policy(NS, "require-jwt", require),
        )
        .unwrap();
    files
        .write("authz-allow.yaml", &authz_policy(NS, "jwt-allow", &allow))
        .unwrap();
    wait_for_policies(bed, 2);
    wait_for_objects(bed, "request_authentications", 1);
}

/// A request of the JWT test: what it is, its headers, its path, the status and 401 reason.
type JwtCase = (&'static str, Vec<String>, String, u16, &'static str);

/// The JWT test's requests, and a valid token of issuer `b` (whose keys are fetched).
fn jwt_cases() -> (Vec<JwtCase>, String) {
    let now = jwt::now();
    let a = |extra: Value| {
        let mut claims = serde_json::json!({"iss": "https://a.example", "sub": "alice", "exp": now + 600, "groups": ["dev"], "team": "blue"});
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        sign(TestKey::Ec, &claims)
    };
    let bearer = |token: &str| format!("Authorization: Bearer {token}");
    let good = a(serde_json::json!({}));
    let ops = a(serde_json::json!({"groups": ["ops"]}));
    let expired = a(serde_json::json!({"exp": now - 600}));
    let stranger = sign(
        TestKey::Ec,
        &serde_json::json!({"iss": "https://evil.example", "sub": "x"}),
    );
    let forged = {
        let parts: Vec<&str> = good.split('.').collect();
        let other = a(serde_json::json!({"sub": "root"}));
        format!(
            "{}.{}.{}",
            parts[0],
            other.split('.').nth(1).unwrap(),
            parts[2]
        )
    };
    let b = sign(
        TestKey::Rsa,
        &serde_json::json!({"iss": "https://b.example", "sub": "bob", "exp": now + 600}),
    );

    // (what, headers, path, status, the 401's reason)
    let table: Vec<JwtCase> = vec![
        ("no token", vec![], "/".into(), 403, ""),
        (
            "a valid token of a group the policy allows",
            vec![bearer(&good), "x-jwt-team: forged".into()],
            "/".into(),
            200,
            "",
        ),
        (
            "the token in the query",
            vec![],
            format!("/?access_token={good}"),
            200,
            "",
        ),
        (
            "a valid token of another group",
            vec![bearer(&ops)],
            "/".into(),
            403,
            "",
        ),
        (
            "an expired token",
            vec![bearer(&expired)],
            "/".into(),
            401,
            "Jwt is expired",
        ),
        (
            "a token whose payload was swapped",
            vec![bearer(&forged)],
            "/".into(),
            401,
            "Jwt verification fails",
        ),
        (
            "an issuer no rule has",
            vec![bearer(&stranger)],
            "/".into(),
            401,
            "Jwt issuer is not configured",
        ),
        (
            "a token of the jwksUri issuer before its keys are served",
            vec![bearer(&b)],
            "/".into(),
            401,
            "Jwks remote fetch is failed",
        ),
    ];
    (table, b)
}

/// What is wrong with the answer to `case`, if anything.
fn check_jwt_case(client: &Pod, (what, headers, path, status, reason): &JwtCase) -> Option<String> {
    let (got, head, body) = curl_answer(client, path, headers);
    if got != *status {
        return Some(format!(
            "{what}: {status} expected, got {got}: {head} {body}"
        ));
    }
    if *status == 401
        && !(body.trim() == *reason
            && head
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer realm=\"http://"))
    {
        return Some(format!(
            "{what}: 401 without Envoy's answer: {head} {body:?}"
        ));
    }
    if *status == 200 {
        // The backend got neither the token's header nor the client's forged claim header,
        // and the claim the rule outputs.
        let echo: Value = serde_json::from_str(body.trim()).expect("an echo line");
        let headers = &echo["headers"];
        if !headers["authorization"].is_null()
            || headers["x-jwt-team"] != serde_json::json!(["blue"])
        {
            return Some(format!("{what}: the backend got {headers}"));
        }
    }
    None
}

#[test]
fn request_authentication_validates_tokens_for_the_waypoints_policies() {
    // Before, no `RequestAuthentication` was read: a policy asking for a JWT principal matched
    // no request, so Istio's "require a JWT" refused everyone and "allow these principals"
    // allowed no one. Now the waypoint checks the tokens (inline keys, and keys it fetches
    // from `jwksUri`), refuses a bad one with 401, and the policies read the verified token.
    let mut bed = bed(&canary_route());
    let client = bed.client().clone();
    let waypoint_pod = bed.mesh.pod(0, 1).clone();
    let keys_addr = SocketAddr::new(IpAddr::V4(waypoint_pod.ipv4), 18080);
    write_jwt_policies(&mut bed, keys_addr);

    let (cases, b) = jwt_cases();
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|case| check_jwt_case(&client, case))
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");

    // The access log says why each was refused.
    let records = access_records_once(
        || bed.waypoint.process.lines(),
        LOG_WAIT,
        |r| r.len() >= cases.len(),
    );
    let notes: Vec<&str> = records.iter().filter_map(|r| r["authz"].as_str()).collect();
    for expected in [
        "token refused: Jwt is expired",
        "token refused: Jwks remote fetch is failed",
        "denied by mesh/require-jwt",
        "denied: no ALLOW policy matched",
    ] {
        assert!(notes.contains(&expected), "{expected:?} in {notes:?}");
    }

    // The issuer whose keys are discovered: refused until its document and set are served.
    let discovered = sign(
        TestKey::Rsa,
        &serde_json::json!({"iss": format!("http://{keys_addr}"), "sub": "dora", "exp": jwt::now() + 600}),
    );
    let with_discovered = [format!("Authorization: Bearer {discovered}")];
    let (status, _, body) = curl_answer(&client, "/", &with_discovered);
    assert_eq!((status, body.trim()), (401, "Jwks remote fetch is failed"));

    // Serve the key set, and the discovery document naming it: the waypoint fetches them
    // (retrying), and both tokens pass.
    let keys_dir = std::env::temp_dir().join(format!("mesh-jwks-{}", std::process::id()));
    std::fs::create_dir_all(keys_dir.join(".well-known")).unwrap();
    std::fs::write(keys_dir.join("jwks.json"), jwt::JWKS_RSA).unwrap();
    std::fs::write(
        keys_dir.join(".well-known/openid-configuration"),
        format!(
            r#"{{"issuer": "http://{keys_addr}", "jwks_uri": "http://{keys_addr}/jwks.json"}}"#
        ),
    )
    .unwrap();
    let mut server_cmd = waypoint_pod.command("python3");
    server_cmd
        .args(["-u", "-m", "http.server", "18080", "--bind"])
        .arg(waypoint_pod.ipv4.to_string())
        .arg("--directory")
        .arg(&keys_dir);
    let _keys_server = Process::spawn("jwks", &mut server_cmd).expect("python3 http.server");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let fetched = |lines: Vec<String>| {
        lines
            .iter()
            .filter(|l| l.contains("fetched a JSON Web Key Set"))
            .count()
    };
    while fetched(bed.waypoint.process.lines()) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "both sets fetched within 90 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, head, body) = curl_answer(&client, "/", &[format!("Authorization: Bearer {b}")]);
    let discovered = curl_answer(&client, "/", &with_discovered);
    let _ = std::fs::remove_dir_all(&keys_dir);
    assert_eq!(status, 200, "{head} {body}");
    assert_eq!(discovered.0, 200, "{discovered:?}");
}

/// An `EnvoyFilter` as Istio documents local rate limiting, for a waypoint: `name`, targeting
/// `target` (YAML flow), in `context`, with a bucket of `max_tokens` (never refilled within a
/// test).
fn rate_limit_filter(name: &str, target: &str, context: &str, max_tokens: u32) -> String {
    // Istio's rule: a `waypoint` match only with context WAYPOINT.
    let on = if context == "WAYPOINT" {
        "waypoint"
    } else {
        "listener"
    };
    format!(
        "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  targetRefs: [{target}]\n  configPatches:\n  - applyTo: HTTP_FILTER\n    match:\n      context: {context}\n      {on}: {{portNumber: 80}}\n    patch:\n      operation: INSERT_BEFORE\n      value:\n        name: envoy.filters.http.local_ratelimit\n        typed_config:\n          \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct\n          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n          value:\n            stat_prefix: http_local_rate_limiter\n            token_bucket: {{max_tokens: {max_tokens}, tokens_per_fill: {max_tokens}, fill_interval: 3600s}}\n            filter_enabled: {{runtime_key: local_rate_limit_enabled, default_value: {{numerator: 100, denominator: HUNDRED}}}}\n            filter_enforced: {{runtime_key: local_rate_limit_enforced, default_value: {{numerator: 100, denominator: HUNDRED}}}}\n            response_headers_to_add: [{{append_action: APPEND_IF_EXISTS_OR_ADD, header: {{key: x-local-rate-limit, value: \"true\"}}}}]\n            enable_x_ratelimit_headers: DRAFT_VERSION_03\n"
    )
}

#[test]
fn local_rate_limits_by_envoy_filter_refuse_with_429() {
    // Before, no `EnvoyFilter` was read: Istio's documented way to rate-limit requests at a
    // waypoint limited nothing. Now its local rate limit is enforced: a bucket of 5, and every
    // request past it answered 429 before it reaches a backend.
    let mut bed = bed(&canary_route());
    let client = bed.client().clone();
    let files = &bed.mesh.files;
    let web = "{kind: Service, group: \"\", name: web}";
    files
        .write(
            "ef-web.yaml",
            &rate_limit_filter("web-limit", web, "WAYPOINT", 5),
        )
        .unwrap();
    // A filter for sidecars' inbound listeners: not a waypoint's, so it applies to nothing.
    let gateway = "{kind: Gateway, group: gateway.networking.k8s.io, name: wp}";
    files
        .write(
            "ef-sidecar.yaml",
            &rate_limit_filter("sidecar-limit", gateway, "SIDECAR_INBOUND", 1),
        )
        .unwrap();
    wait_for_objects(&mut bed, "envoy_filters", 2);
    bed.waypoint
        .process
        .wait_for_line("the warning", LOG_WAIT, |l| {
            l.contains("context SIDECAR_INBOUND is not the waypoints'")
        })
        .unwrap();

    let answers: Vec<(u16, String, String)> =
        (0..12).map(|_| curl_answer(&client, "/", &[])).collect();
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(
        statuses,
        [[200; 5].as_slice(), &[429; 7]].concat(),
        "{answers:#?}"
    );
    for (i, (status, head, body)) in answers.iter().enumerate() {
        let head = head.to_ascii_lowercase();
        let remaining = format!("x-ratelimit-remaining: {}", 4usize.saturating_sub(i));
        assert!(
            head.contains("x-ratelimit-limit: 5") && head.contains(&remaining),
            "{head}"
        );
        if *status == 429 {
            assert_eq!(body.trim(), "local_rate_limited");
            assert!(head.contains("x-local-rate-limit: true"), "{head}");
        }
    }
    let served = served_settled(&[&bed.backends[0], &bed.backends[1]], 5);
    assert_eq!(
        served.iter().sum::<usize>(),
        5,
        "only the first five reached a backend"
    );
    let metrics = waypoint_metrics(&bed.mesh.pod(0, 1).clone());
    let limited = [("response_code", "429"), ("response_flags", "RL")];
    assert_eq!(count(&metrics, "istio_requests_total", &limited), 7);
    // The access log names the filter.
    let records = access_records_once(|| bed.waypoint.process.lines(), LOG_WAIT, |r| r.len() >= 12);
    let notes: Vec<&str> = records.iter().filter_map(|r| r["authz"].as_str()).collect();
    assert_eq!(notes, ["rate limited by mesh/web-limit"; 7]);

    // The filter changed (a bucket of 100): a new bucket, full.
    bed.mesh
        .files
        .write(
            "ef-web.yaml",
            &rate_limit_filter("web-limit", web, "WAYPOINT", 100),
        )
        .unwrap();
    bed.waypoint
        .process
        .wait_for_line("the new filter", LOG_WAIT, |l| {
            l.contains("cluster state updated") && l.contains("generation=")
        })
        .unwrap();
    let fresh = (0..40)
        .map(|_| curl_answer(&client, "/", &[]))
        .find(|a| a.1.to_ascii_lowercase().contains("x-ratelimit-limit: 100"));
    let (status, head, _) = fresh.expect("the new limit applies");
    assert_eq!(status, 200, "{head}");
}

/// Writes `web`'s `DestinationRule` (`rule`), and waits for the waypoint's view to have it.
fn write_destination_rule(bed: &mut Bed, rule: &str) {
    let from = bed.waypoint.process.line_count();
    bed.mesh
        .files
        .write("destinationrule-web.yaml", rule)
        .unwrap();
    bed.waypoint
        .process
        .wait_for_line_from(from, "the DestinationRule", LOG_WAIT, |l| {
            l.contains("cluster state updated")
        })
        .unwrap();
}

#[test]
fn outlier_detection_ejects_an_endpoint_that_keeps_failing() {
    // Before, a `DestinationRule` with `outlierDetection` was refused whole. Now the waypoint
    // leaves out an endpoint that answered 5xx twice in a row: of 20 requests spread round
    // robin over `web`'s two pods, v2 (which always answers 503) gets two, then none.
    let route = one_rule_route("backendRefs: [{name: web, port: 80}]\n");
    let mut bed = bed_with(&route, &[], &["--fail-first", "1000"]);
    let client = bed.client().clone();
    let rule = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web.{NS}.svc.cluster.local\n  trafficPolicy:\n    loadBalancer: {{simple: ROUND_ROBIN}}\n    tls: {{mode: ISTIO_MUTUAL}}\n    outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}\n"
    );
    write_destination_rule(&mut bed, &rule);
    let statuses: Vec<u16> = (0..20).map(|_| curl_answer(&client, "/", &[]).0).collect();
    let failed = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(
        failed, 2,
        "two 503s from v2, then it is left out: {statuses:?}"
    );
    assert!(statuses[4..].iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(served(&bed.backends[1]), 2, "v2 answered twice");
}

/// Runs `requests` at once from `pod` (one curl each, every request asking the echo to wait
/// `delay_ms`), `pause` apart; each answer with the time it took.
fn at_once(
    pod: &Pod,
    requests: usize,
    headers: &[String],
    pause: Duration,
) -> Vec<((u16, String, String), Duration)> {
    std::thread::scope(|scope| {
        let running: Vec<_> = (0..requests)
            .map(|i| {
                std::thread::sleep(pause * u32::from(i > 0));
                scope.spawn(move || {
                    let started = std::time::Instant::now();
                    let answer = curl_answer(pod, "/", headers);
                    (answer, started.elapsed())
                })
            })
            .collect();
        running.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

#[test]
fn connection_pool_limits_refuse_with_503_uo_and_queue_as_envoy() {
    // Before, a `DestinationRule` with `connectionPool` was refused whole (Istio's
    // circuit-breaking task could not be followed). Now its limits hold at the waypoint.
    let route = one_rule_route("backendRefs: [{name: web, port: 80}]\n");
    let mut bed = bed_with(&route, &[], &[]);
    let client = bed.client().clone();
    let apply = |bed: &mut Bed, policy: &str| {
        let rule = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web.{NS}.svc.cluster.local\n  trafficPolicy:\n    loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}\n    {policy}\n"
        );
        write_destination_rule(bed, &rule);
    };
    // Every request to one endpoint (the same `x-user`), each answered after 1.5 s.
    let slow = ["x-user: alice".to_owned(), "x-delay-ms: 1500".to_owned()];

    // Istio's circuit-breaking task: one connection, one request waiting for it. Of three at
    // once, the first is served, the second waits for its connection and is served after it,
    // the third is refused at once.
    apply(
        &mut bed,
        "connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}",
    );
    let answers = at_once(&client, 3, &slow, Duration::from_millis(300));
    let statuses: Vec<u16> = answers.iter().map(|a| a.0 .0).collect();
    assert_eq!(statuses, [200, 200, 503], "{answers:#?}");
    let ((_, head, body), took) = &answers[2];
    assert!(
        head.to_ascii_lowercase()
            .contains("x-envoy-overloaded: true"),
        "{head}"
    );
    assert_eq!(
        body.trim(),
        "upstream connect error or disconnect/reset before headers. reset reason: overflow"
    );
    assert!(
        *took < Duration::from_millis(1500),
        "refused at once: {took:?}"
    );
    assert!(
        answers[1].1 >= Duration::from_millis(2500),
        "the second waited for the first's connection: {:?}",
        answers[1].1
    );

    // `http2MaxRequests: 2` for port 80 (`portLevelSettings`, over the rule's pool): two in
    // flight; a third at once is refused, whatever the endpoint.
    apply(
        &mut bed,
        "connectionPool: {http: {http2MaxRequests: 50}}\n    portLevelSettings: [{port: {number: 80}, connectionPool: {http: {http2MaxRequests: 2}}}]",
    );
    let mixed = |user: &str| vec![format!("x-user: {user}"), "x-delay-ms: 1500".to_owned()];
    let answers: Vec<u16> = std::thread::scope(|scope| {
        let running: Vec<_> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, user)| {
                let headers = mixed(user);
                let client = &client;
                scope.spawn(move || {
                    std::thread::sleep(Duration::from_millis(300) * u32::try_from(i).unwrap());
                    curl_answer(client, "/", &headers).0
                })
            })
            .collect();
        running.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(answers, [200, 200, 503]);
    // Once they are done, their places are free again.
    assert_eq!(curl_answer(&client, "/", &slow[..1]).0, 200);

    // Istio's metrics and the access log say why (`UO`).
    let metrics = waypoint_metrics(&bed.mesh.pod(0, 1).clone());
    let refused = [("response_code", "503"), ("response_flags", "UO")];
    assert_eq!(count(&metrics, "istio_requests_total", &refused), 2);
    let records = access_records_once(|| bed.waypoint.process.lines(), LOG_WAIT, |r| r.len() >= 7);
    let flags: Vec<&str> = records
        .iter()
        .filter_map(|r| r["response_flags"].as_str())
        .collect();
    assert_eq!(
        flags.iter().filter(|f| **f == "UO").count(),
        2,
        "{records:#?}"
    );

    // Without the rule's pool, nothing is limited: three at once are served.
    apply(&mut bed, "connectionPool: {http: {idleTimeout: 1h}}");
    let answers = at_once(&client, 3, &slow, Duration::from_millis(100));
    assert!(answers.iter().all(|a| a.0 .0 == 200), "{answers:#?}");
}

#[test]
fn another_namespaces_virtual_service_or_destination_rule_cannot_take_a_services_traffic() {
    // The attack: a tenant with rights over its own namespace `evil` only writes, for `web`:
    // a VirtualService aborting every request, and a DestinationRule (first by name, so the one
    // in force before) whose subset v2 selects v1's pod. Before, both applied to every client:
    // the mesh's requests got 503, or went to the pod the tenant chose.
    let own = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  hosts: [web]\n  http: [{{route: [{{destination: {{host: web, subset: v2}}}}]}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n"
    );
    let mut bed = bed(&own);
    let client = bed.client().clone();
    let attack = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: grab, namespace: evil}}\nspec:\n  hosts: [web.{NS}.svc.cluster.local]\n  http:\n  - fault: {{abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: web.{NS}.svc.cluster.local}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: grab, namespace: evil}}\nspec:\n  host: web.{NS}.svc.cluster.local\n  subsets: [{{name: v2, labels: {{version: v1}}}}]\n"
    );
    let from = bed.waypoint.process.line_count();
    bed.mesh.files.write("evil.yaml", &attack).unwrap();
    bed.waypoint
        .process
        .wait_for_line_from(from, "the tenant's rules", LOG_WAIT, |l| {
            l.contains("cluster state updated")
        })
        .unwrap();
    let urls: Vec<String> = (0..10).map(|i| url(&format!("/own/{i}"))).collect();
    let answers = curl_raw(
        &client,
        &[
            ["-s", "-w", "\\n%{http_code}\\n"].as_slice(),
            &urls.iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat(),
    );
    assert!(
        !answers.lines().any(|l| l == "503"),
        "the tenant's abort applied: {answers}"
    );
    assert_eq!(
        backends(&curl(&client, &urls)),
        BTreeMap::from([("v2".to_owned(), 10)]),
        "the mesh's own routes and subsets"
    );
    let warning =
        format!("DestinationRule evil/grab: spec.host: Service {NS}/web is in another namespace");
    assert!(
        bed.waypoint
            .process
            .lines()
            .iter()
            .any(|l| l.contains(&warning)),
        "{warning:?} logged"
    );
    // Then `web`'s own namespace aborts: its rules are the producer's, for every client.
    bed.mesh
        .files
        .write(
            "httproute-web.yaml",
            &own.replace(
                "http: [{route:",
                "http: [{fault: {abort: {httpStatus: 418, percentage: {value: 100}}}, route:",
            ),
        )
        .unwrap();
    let deadline = std::time::Instant::now() + LOG_WAIT;
    while curl_answer(&client, "/", &[]).0 != 418 {
        assert!(
            std::time::Instant::now() < deadline,
            "own abort never applied"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `Set-Cookie` values of an answer's head.
fn set_cookies(head: &str) -> Vec<String> {
    head.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("set-cookie")
                .then(|| value.trim().to_owned())
        })
        .collect()
}

#[test]
fn sticky_sessions_presence_matches_and_grpc_aborts() {
    // Before, a `DestinationRule`'s `httpCookie` `ttl` was read and ignored (no sticky session),
    // and `withoutHeaders`, an empty (presence) match and `abort.grpcStatus` refused the
    // `VirtualService` whole.
    let istio = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  hosts: [web]\n  http:\n  - name: grpc-fault\n    match: [{{headers: {{x-fault: {{}}}}}}]\n    fault: {{abort: {{grpcStatus: UNAVAILABLE, percentage: {{value: 100}}}}}}\n    route: [{{destination: {{host: web, subset: v1}}}}]\n  - name: canary\n    match: [{{headers: {{x-canary: {{}}}}, withoutHeaders: {{x-opt-out: {{}}}}}}]\n    route: [{{destination: {{host: web, subset: v2}}}}]\n  - name: rest\n    route: [{{destination: {{host: web}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web\n  trafficPolicy:\n    loadBalancer: {{consistentHash: {{httpCookie: {{name: route, ttl: 0s, path: /}}}}}}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n"
    );
    let bed = bed(&istio);
    let client = bed.client().clone();
    let backend_of = |body: &str| -> String {
        let line: Value = serde_json::from_str(body.trim()).expect(body);
        line["backend"].as_str().unwrap_or("?").to_owned()
    };

    // Sticky sessions: a client without the cookie gets one (a session cookie: no Max-Age), set
    // by the waypoint; every request that carries it goes where the first went.
    let mut first = Vec::new();
    for _ in 0..16 {
        let (status, head, body) = curl_answer(&client, "/", &[]);
        assert_eq!(status, 200, "{head}");
        let cookies = set_cookies(&head);
        assert_eq!(cookies.len(), 1, "{head}");
        first.push((cookies[0].clone(), backend_of(&body)));
    }
    let (cookie, backend) = first[0].clone();
    assert!(
        cookie.starts_with("route=\"") && cookie.ends_with("\"; Path=/; HttpOnly"),
        "{cookie}"
    );
    let values: std::collections::BTreeSet<&str> = first.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(values.len(), 16, "a cookie per connection: {first:?}");
    let landed: std::collections::BTreeSet<&str> = first.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(
        landed.len(),
        2,
        "new clients spread over v1 and v2: {first:?}"
    );
    let value = cookie.split(';').next().unwrap().to_owned();
    for sent in [format!("cookie: {value}"), format!("cookie: a=1; {value}")] {
        for _ in 0..10 {
            let (status, head, body) = curl_answer(&client, "/", std::slice::from_ref(&sent));
            assert_eq!(
                (status, backend_of(&body)),
                (200, backend.clone()),
                "{sent}"
            );
            assert!(
                set_cookies(&head).is_empty(),
                "nothing set once it is sent: {head}"
            );
        }
    }

    // Presence and absence: a header with any value, unless the opt-out header is there.
    let canary = |headers: &[&str]| {
        let headers: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
        (0..6)
            .map(|_| backend_of(&curl_answer(&client, "/", &headers).2))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let v2 = std::collections::BTreeSet::from(["v2".to_owned()]);
    assert_eq!(canary(&["x-canary: 1", &format!("cookie: {value}")]), v2);
    assert_eq!(canary(&["x-canary: anything"]), v2);
    let opted_out = canary(&["x-canary: 1", "x-opt-out: yes", &format!("cookie: {value}")]);
    assert_eq!(
        opted_out,
        std::collections::BTreeSet::from([backend.clone()])
    );

    // `grpcStatus`: a gRPC request gets the status trailers-only (HTTP 200), any other a 503.
    let served_before = served(&bed.backends[0]) + served(&bed.backends[1]);
    let grpc = curl_raw(
        &client,
        &[
            "-i",
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-H",
            "x-fault: 1",
            "--data-binary",
            "",
            &url("/echo.Echo/Say"),
        ],
    );
    let grpc = grpc.to_ascii_lowercase();
    assert!(grpc.starts_with("http/2 200"), "{grpc}");
    assert!(grpc.contains("grpc-status: 14"), "{grpc}");
    assert!(grpc.contains("grpc-message: fault filter abort"), "{grpc}");
    let (status, _, body) = curl_answer(&client, "/", &["x-fault: 1".to_owned()]);
    assert_eq!((status, body.trim()), (503, "fault filter abort"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        served(&bed.backends[0]) + served(&bed.backends[1]),
        served_before,
        "aborted requests reach no backend"
    );
    let samples = waypoint_metrics(bed.mesh.pod(0, 1));
    let aborted = [("response_flags", "FI"), ("grpc_response_status", "14")];
    assert_eq!(count(&samples, "istio_requests_total", &aborted), 1);
}

/// The value of header `name` in an answer's head, if there.
fn header_in(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

#[test]
fn cors_preflights_are_answered_and_answers_marked_for_allowed_origins() {
    // Before, a `VirtualService` with `corsPolicy` (and an `HTTPRoute` with a `CORS` filter) was
    // refused whole: a browser application's Service lost its routes.
    let istio = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  hosts: [web]\n  http:\n  - name: app\n    corsPolicy:\n      allowOrigins: [{{exact: \"https://app.example\"}}, {{regex: 'https://[a-z]+\\.shop\\.example'}}]\n      allowMethods: [GET, POST]\n      allowHeaders: [x-user]\n      exposeHeaders: [x-trace]\n      maxAge: 1h\n      allowCredentials: true\n    route: [{{destination: {{host: web}}}}]\n"
    );
    let bed = bed(&istio);
    let client = bed.client().clone();
    let total = |bed: &Bed| served(&bed.backends[0]) + served(&bed.backends[1]);
    let preflight = |origin: &str| {
        let out = curl_raw(
            &client,
            &[
                "-i",
                "-X",
                "OPTIONS",
                "-H",
                &format!("origin: {origin}"),
                "-H",
                "access-control-request-method: POST",
                "-H",
                "access-control-request-headers: x-user",
                &url("/api"),
            ],
        );
        out.split_once("\r\n\r\n")
            .map_or(out.clone(), |(h, _)| h.to_owned())
    };

    // A preflight from an allowed origin: answered by the waypoint, never forwarded.
    let before = total(&bed);
    for origin in ["https://app.example", "https://eu.shop.example"] {
        let head = preflight(origin);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let expected = [
            ("access-control-allow-origin", origin),
            ("access-control-allow-methods", "GET,POST"),
            ("access-control-allow-headers", "x-user"),
            ("access-control-max-age", "3600"),
            ("access-control-allow-credentials", "true"),
        ];
        for (name, value) in expected {
            assert_eq!(
                header_in(&head, name).as_deref(),
                Some(value),
                "{name} in {head}"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(total(&bed), before, "preflights answered at the waypoint");

    // A request from an allowed origin: the backend's answer, marked.
    let (status, head, body) =
        curl_answer(&client, "/api", &["origin: https://app.example".to_owned()]);
    assert_eq!(status, 200, "{head}");
    assert!(body.contains("\"backend\""), "{body}");
    assert_eq!(
        header_in(&head, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(
        header_in(&head, "access-control-expose-headers").as_deref(),
        Some("x-trace")
    );

    // Another origin: its request served unmarked, its preflight forwarded (FORWARD, the
    // default) and answered by the backend without CORS headers.
    for origin in ["https://evil.example", "https://app.example.evil"] {
        let (status, head, _) = curl_answer(&client, "/api", &[format!("origin: {origin}")]);
        assert_eq!(status, 200);
        assert_eq!(
            header_in(&head, "access-control-allow-origin"),
            None,
            "{head}"
        );
        let before = total(&bed);
        let head = preflight(origin);
        assert_eq!(
            header_in(&head, "access-control-allow-origin"),
            None,
            "{head}"
        );
        assert_eq!(
            served_settled(&[&bed.backends[0], &bed.backends[1]], before + 1)
                .iter()
                .sum::<usize>(),
            before + 1,
            "forwarded"
        );
    }
}

#[test]
fn direct_responses_and_several_mirrors_of_a_virtual_service() {
    // Before, `directResponse` and `mirrors` refused the `VirtualService` whole.
    let istio = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  hosts: [web]\n  http:\n  - name: down\n    match: [{{uri: {{prefix: /down}}}}]\n    directResponse: {{status: 503, body: {{string: '{{\"error\": \"down for maintenance\"}}'}}}}\n    headers: {{response: {{set: {{content-type: application/json}}}}}}\n  - name: shadowed\n    route: [{{destination: {{host: web, subset: v1}}}}]\n    mirrors:\n    - {{destination: {{host: web, subset: v2}}, percentage: {{value: 100}}}}\n    - {{destination: {{host: web, subset: v2}}, percentage: {{value: 0}}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n"
    );
    let bed = bed(&istio);
    let client = bed.client().clone();
    let pods = [&bed.backends[0], &bed.backends[1]];

    // The direct response: its status, body and the rule's response header; no backend sees it.
    let (status, head, body) = curl_answer(&client, "/down/now", &[]);
    assert_eq!(
        (status, body.as_str()),
        (503, r#"{"error": "down for maintenance"}"#)
    );
    assert_eq!(
        header_in(&head, "content-type").as_deref(),
        Some("application/json"),
        "{head}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(served_settled(&pods, 0), [0, 0], "answered at the waypoint");

    // Ten requests answered by v1, each mirrored once to v2 (the second mirror at 0 %).
    let urls: Vec<String> = (0..10).map(|i| url(&format!("/shadow/{i}"))).collect();
    let answered = curl(&client, &urls);
    assert_eq!(backends(&answered), BTreeMap::from([("v1".to_owned(), 10)]));
    assert_eq!(
        served_settled(&pods, 20),
        [10, 10],
        "one mirror each at 100 %, none at 0 %"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(served(&bed.backends[1]), 10);
}

#[test]
fn grpc_statuses_in_retry_on_retry_a_trailers_only_unavailable() {
    // Before, `retryOn: unavailable` (and Istio's default, which has it) was read and never
    // retried on: a gRPC server's UNAVAILABLE went straight to the client.
    let istio = |retry_on: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  hosts: [web]\n  http:\n  - route: [{{destination: {{host: web, subset: v1}}}}]\n    retries: {{attempts: 3, retryOn: \"{retry_on}\"}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n"
        )
    };
    // v1 sheds its first 2 gRPC calls with a trailers-only UNAVAILABLE.
    let mut bed = bed_with(&istio("unavailable"), &["--fail-first", "2"], &[]);
    let client = bed.client().clone();
    let call = |client: &Pod| {
        curl_raw(
            client,
            &[
                "-i",
                "--http2-prior-knowledge",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "--data-binary",
                "",
                &url("/grpc.health.v1.Health/Check"),
            ],
        )
        .to_ascii_lowercase()
    };
    let started = std::time::Instant::now();
    let answer = call(&client);
    // Envoy's default back-off before each retry: at least 25 ms (a lower bound only).
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );
    assert!(answer.starts_with("http/2 200"), "{answer}");
    assert!(
        !answer.contains("grpc-status: 14"),
        "retried into v1's third answer: {answer}"
    );
    assert!(answer.contains("\"backend\":\"v1\""), "{answer}");
    assert_eq!(served_settled(&[&bed.backends[0]], 3), [3], "two retries");

    // Retried on `5xx` only, a gRPC UNAVAILABLE (HTTP 200) is the answer. The backend restarts
    // its count of failures with a fresh process, so restart it.
    let from = bed.waypoint.process.line_count();
    bed.mesh
        .files
        .write("httproute-web.yaml", &istio("5xx"))
        .unwrap();
    bed.waypoint
        .process
        .wait_for_line_from(from, "the new rule", LOG_WAIT, |l| {
            l.contains("cluster state updated")
        })
        .unwrap();
    drop(bed.backends.remove(0));
    let fresh = echo(bed.mesh.pod(1, 0), "v1", &["--fail-first", "1"]);
    bed.backends.insert(0, fresh);
    let answer = call(&client);
    assert!(
        answer.contains("grpc-status: 14"),
        "not retried on 5xx: {answer}"
    );
    assert!(answer.contains("grpc-message: shedding load"), "{answer}");
}

#[test]
fn h2_upgrade_policy_sends_http1_requests_to_the_endpoints_over_http2() {
    // Before, a `DestinationRule` with `h2UpgradePolicy: UPGRADE` was refused whole.
    let route = one_rule_route("backendRefs: [{name: web, port: 80}]\n");
    let mut bed = bed(&route);
    let client = bed.client().clone();
    let protocols = |client: &Pod| {
        let urls: Vec<String> = (0..4).map(|i| url(&format!("/p/{i}"))).collect();
        curl(client, &urls)
            .iter()
            .map(|l| {
                let host = l["host"].as_str().unwrap_or("?").to_owned();
                (l["protocol"].as_str().unwrap_or("?").to_owned(), host)
            })
            .collect::<std::collections::BTreeSet<_>>()
    };
    let vip = plan::service_vip_v4(0).to_string();
    assert_eq!(
        protocols(&client),
        std::collections::BTreeSet::from([("HTTP/1.1".to_owned(), vip.clone())]),
        "as the client spoke"
    );
    let rule = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web.{NS}.svc.cluster.local\n  trafficPolicy:\n    connectionPool: {{http: {{h2UpgradePolicy: UPGRADE}}}}\n"
    );
    write_destination_rule(&mut bed, &rule);
    // The client still speaks and hears HTTP/1.1; the endpoints hear HTTP/2, the `Host` as
    // `:authority`.
    assert_eq!(
        protocols(&client),
        std::collections::BTreeSet::from([("HTTP/2.0".to_owned(), vip)]),
        "upgraded"
    );
    let (status, head, _) = curl_answer(&client, "/p/x", &[]);
    assert!(head.starts_with("HTTP/1.1 200"), "{status}: {head}");
}

#[test]
fn virtual_service_tcp_routes_split_connections_by_weight() {
    // Before, a `VirtualService` with `tcp` rules was refused whole: no canary for a TCP
    // Service behind the waypoint.
    let mut bed = bed(&canary_route());
    let client = bed.client().clone();
    let servers: Vec<Process> = [bed.mesh.pod(1, 0).clone(), bed.mesh.pod(1, 1).clone()]
        .iter()
        .map(|pod| {
            mesh_tests::probe::serve(pod, SocketAddr::new(IpAddr::V4(pod.ipv4), 9000))
                .expect("TCP echo server")
        })
        .collect();
    let bound = format!("istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}");
    let text = port_service_yaml("raw", 3, ("svc", "web"), &bound, ("name: tcp", 9000, 9000));
    bed.mesh.files.write("service-raw.yaml", &text).unwrap();
    bed.wait_for_services(4, "the TCP Service");
    let rules = |weights: (u32, u32)| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: raw, namespace: {NS}}}\nspec:\n  hosts: [raw]\n  tcp:\n  - match: [{{port: 9000}}]\n    route:\n    - {{destination: {{host: raw, subset: v1}}, weight: {}}}\n    - {{destination: {{host: raw, subset: v2}}, weight: {}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: raw, namespace: {NS}}}\nspec:\n  host: raw\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n",
            weights.0, weights.1
        )
    };
    let addr = SocketAddr::new(IpAddr::V4(plan::service_vip_v4(3)), 9000);
    let connections = |n: usize| {
        for i in 0..n {
            let out = mesh_tests::probe::connect(&client, addr, &format!("bytes {i}"))
                .unwrap_or_else(|e| panic!("{addr}: {e}"));
            assert!(out.starts_with("echo ok"), "{out}");
        }
    };
    for (generation, weights, expected) in [(1, (0, 100), [0, 10]), (2, (100, 0), [10, 10])] {
        let from = bed.waypoint.process.line_count();
        bed.mesh
            .files
            .write("virtualservice-raw.yaml", &rules(weights))
            .unwrap();
        bed.waypoint
            .process
            .wait_for_line_from(
                from,
                &format!("the TCP rules, take {generation}"),
                LOG_WAIT,
                |l| l.contains("cluster state updated"),
            )
            .unwrap();
        connections(10);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(accepted(&servers), expected, "weights {weights:?}");
    }
}

#[test]
fn outlier_detection_ejects_an_endpoint_tcp_tunnels_cannot_reach() {
    // Before, outlier detection counted HTTP answers only: a TCP Service's endpoint that
    // refused every connection kept getting its share of the tunnels.
    let mut bed = bed(&canary_route());
    let client = bed.client().clone();
    // Only v2 listens on 9000: tunnels to v1 cannot be made.
    let v2 = bed.mesh.pod(1, 1).clone();
    let _server = mesh_tests::probe::serve(&v2, SocketAddr::new(IpAddr::V4(v2.ipv4), 9000))
        .expect("TCP echo server");
    let bound = format!("istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}");
    let text = port_service_yaml("raw", 3, ("svc", "web"), &bound, ("name: tcp", 9000, 9000));
    bed.mesh.files.write("service-raw.yaml", &text).unwrap();
    bed.wait_for_services(4, "the TCP Service");
    let addr = SocketAddr::new(IpAddr::V4(plan::service_vip_v4(3)), 9000);
    let answered = |n: usize| {
        (0..n)
            .filter(|i| {
                mesh_tests::probe::connect(&client, addr, &format!("bytes {i}"))
                    .is_ok_and(|out| out.starts_with("echo ok"))
            })
            .count()
    };
    let rule = |outlier: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: raw, namespace: {NS}}}\nspec:\n  host: raw\n  trafficPolicy:\n    loadBalancer: {{simple: ROUND_ROBIN}}\n    {outlier}\n"
        )
    };
    let from = bed.waypoint.process.line_count();
    bed.mesh
        .files
        .write("destinationrule-raw.yaml", &rule(""))
        .unwrap();
    bed.waypoint
        .process
        .wait_for_line_from(from, "the DestinationRule", LOG_WAIT, |l| {
            l.contains("cluster state updated")
        })
        .unwrap();
    assert_eq!(answered(10), 5, "round robin: v1's half cannot be reached");
    let from = bed.waypoint.process.line_count();
    let outlier = "outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}";
    bed.mesh
        .files
        .write("destinationrule-raw.yaml", &rule(outlier))
        .unwrap();
    bed.waypoint
        .process
        .wait_for_line_from(from, "the outlier detection", LOG_WAIT, |l| {
            l.contains("cluster state updated")
        })
        .unwrap();
    // Two failed tunnels to v1 in a row eject it: of 20, two fail, then v2 takes them all.
    assert_eq!(answered(20), 18, "v1 left out after two failures");
}

#[test]
fn max_concurrent_streams_opens_more_http2_connections_to_an_endpoint() {
    // Before, `maxConcurrentStreams` refused the `DestinationRule` whole, and the waypoint kept
    // one HTTP/2 connection per endpoint whatever the load.
    let route = one_rule_route("backendRefs: [{name: web, port: 80}]\n");
    let mut bed = bed(&route);
    let client = bed.client().clone();
    // The connections the endpoints' agent (node 1) has taken in (or seen closed), all from
    // the waypoint.
    let at_endpoints = |bed: &Bed, metric: &str| {
        let samples = mesh_tests::telemetry::scrape(bed.mesh.tb.node(1)).expect("metrics");
        count(&samples, metric, &[("reporter", "destination")])
    };
    let opened = |bed: &Bed| at_endpoints(bed, "istio_tcp_connections_opened_total");
    let closed = |bed: &Bed| at_endpoints(bed, "istio_tcp_connections_closed_total");
    // 40 h2c requests, 10 at a time on one client connection, each held 200 ms by the echo;
    // h2load's report.
    let burst = |client: &Pod| -> String {
        let out = client
            .command("h2load")
            .args([
                "-n",
                "40",
                "-c",
                "1",
                "-m",
                "10",
                "-H",
                "x-delay-ms: 200",
                &url("/s"),
            ])
            .output()
            .expect("running h2load");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let all_served = |text: &str| {
        assert!(
            text.contains("40 succeeded") && text.contains("status codes: 40 2xx"),
            "{text}"
        );
    };
    let before = opened(&bed);
    all_served(&burst(&client));
    let shared = opened(&bed) - before;
    assert!(
        shared <= 2,
        "one HTTP/2 connection per endpoint: {shared} opened"
    );
    let rule = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web.{NS}.svc.cluster.local\n  trafficPolicy:\n    connectionPool: {{http: {{maxConcurrentStreams: 1}}}}\n"
    );
    write_destination_rule(&mut bed, &rule);
    let before = opened(&bed);
    all_served(&burst(&client));
    let capped = opened(&bed) - before;
    // Ten requests in flight at a time, one per connection: about ten connections.
    assert!(
        capped >= 6,
        "a connection per request in flight: {capped} opened"
    );
    // With `maxConnections: 2` too, the two endpoints' connections are all there are: the
    // other requests wait for room on them, as in Envoy's pool (before, they opened more).
    let pool = |extra: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web.{NS}.svc.cluster.local\n  trafficPolicy:\n    connectionPool: {{tcp: {{maxConnections: 2}}, http: {{maxConcurrentStreams: 1{extra}}}}}\n"
        )
    };
    let closed_before = closed(&bed);
    write_destination_rule(&mut bed, &pool(""));
    // The connections kept under the settings just replaced are let go at once (before, they
    // stayed until they had been idle for 5 minutes).
    let started = std::time::Instant::now();
    while closed(&bed) - closed_before < capped {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} of the {capped} connections kept under the old settings closed",
            closed(&bed) - closed_before
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = opened(&bed);
    all_served(&burst(&client));
    let bounded = opened(&bed) - before;
    assert!(bounded <= 2, "within maxConnections: {bounded} opened");
    // And with one request allowed to wait, those beyond it are refused at once (503, `UO`).
    write_destination_rule(&mut bed, &pool(", http1MaxPendingRequests: 1"));
    let text = burst(&client);
    let refused = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("status codes: "))
        .and_then(|codes| codes.split(", ").find_map(|c| c.strip_suffix(" 5xx")))
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no status codes: {text}"));
    assert!(
        (1..40).contains(&refused),
        "some refused, some served: {refused} of 40 refused\n{text}"
    );
    let metrics = waypoint_metrics(&bed.mesh.pod(0, 1).clone());
    let overflowed = count(
        &metrics,
        "istio_requests_total",
        &[("response_code", "503"), ("response_flags", "UO")],
    );
    assert_eq!(u64::from(refused), overflowed, "counted UO");
}

/// A TLS server (`openssl s_server`) in `pod` on port 9443 whose certificate names `name`.
fn tls_server(bed: &Bed, pod: &Pod, name: &str) -> Process {
    let dir = bed.mesh.tb.scratch_dir();
    let (key, cert) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.crt")),
    );
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl req");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mut cmd = pod.command("openssl");
    cmd.args(["s_server", "-accept", "9443", "-www", "-cert"])
        .arg(&cert)
        .arg("-key")
        .arg(&key);
    let mut server = Process::spawn(format!("tls server {name}"), &mut cmd).expect("s_server");
    server
        .wait_for_line("s_server to listen", LOG_WAIT, |l| l.contains("ACCEPT"))
        .expect("s_server listens");
    server
}

#[test]
fn virtual_service_tls_routes_go_by_the_server_name_asked_for() {
    // Before, a `VirtualService` with `tls` rules was refused whole.
    let mut bed = bed(&canary_route());
    let client = bed.client().clone();
    let _servers = [
        tls_server(&bed, &bed.mesh.pod(1, 0).clone(), "v1"),
        tls_server(&bed, &bed.mesh.pod(1, 1).clone(), "v2"),
    ];
    let bound = format!("istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}");
    let text = port_service_yaml(
        "secure",
        3,
        ("svc", "web"),
        &bound,
        ("name: tls", 443, 9443),
    );
    bed.mesh.files.write("service-secure.yaml", &text).unwrap();
    bed.wait_for_services(4, "the TLS Service");
    let from = bed.waypoint.process.line_count();
    let rules = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: secure, namespace: {NS}}}\nspec:\n  hosts: [secure]\n  tls:\n  - match: [{{sniHosts: [a.example], port: 443}}]\n    route: [{{destination: {{host: secure, subset: v1}}}}]\n  - match: [{{sniHosts: [\"*.example\"]}}]\n    route: [{{destination: {{host: secure, subset: v2}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: secure, namespace: {NS}}}\nspec:\n  host: secure\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n"
    );
    bed.mesh
        .files
        .write("virtualservice-secure.yaml", &rules)
        .unwrap();
    bed.waypoint
        .process
        .wait_for_line_from(from, "the TLS rules", LOG_WAIT, |l| {
            l.contains("cluster state updated")
        })
        .unwrap();
    let vip = plan::service_vip_v4(3);
    for _ in 0..5 {
        assert_eq!(tls_answered(&client, vip, "a.example"), "v1");
        assert_eq!(tls_answered(&client, vip, "b.example"), "v2");
    }
}

#[test]
fn uri_regex_rewrite_of_a_virtual_service() {
    // Before, `rewrite.uriRegexRewrite` refused the `VirtualService` whole.
    let istio = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  hosts: [web]\n  http:\n  - match: [{{uri: {{prefix: /service/}}}}]\n    rewrite: {{uriRegexRewrite: {{match: '^/service/([^/]+)(/.*)$', rewrite: '/customprefix\\2/\\1'}}}}\n    route: [{{destination: {{host: web}}}}]\n"
    );
    let bed = bed(&istio);
    let client = bed.client().clone();
    let lines = curl(&client, &[url("/service/update/v1/api?x=1")]);
    assert_eq!(lines[0]["path"], "/customprefix/v1/api/update?x=1");
}

/// `x-forwarded-client-cert`: a client's own is never passed on (it could claim anyone), and
/// with Istio 1.30's annotation on the waypoint's `Gateway` the endpoint gets the source's
/// identity as the waypoint proved it (`By` the waypoint, `URI` the client).
#[test]
fn the_client_identity_reaches_the_endpoint_only_as_the_waypoint_proved_it() {
    let route = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\n  namespace: {NS}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: web, port: 80}}\n  rules:\n  - backendRefs: [{{name: web-v1, port: 80}}]\n"
    );
    let bed = bed(&route);
    let client = bed.client().clone();
    let forged = "x-forwarded-client-cert: By=spiffe://cluster.local/ns/istio-system/sa/gw;URI=spiffe://cluster.local/ns/kube-system/sa/admin";
    let ask = || curl(&client, &["-H".to_owned(), forged.to_owned(), url("/who")]);
    let line = &ask()[0];
    assert!(
        line["headers"]["x-forwarded-client-cert"].is_null(),
        "the client's own XFCC reached the endpoint: {line}"
    );

    bed.mesh
        .files
        .write(
            "gateway-wp.yaml",
            &format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wp\n  namespace: {PLAIN_NS}\n  labels: {{istio.io/waypoint-for: service}}\n  annotations: {{ambient.istio.io/xfcc-include-client-identity: \"true\"}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {{namespaces: {{from: All}}}}}}\n"
            ),
        )
        .unwrap();
    let expected = format!(
        "By=spiffe://cluster.local/ns/{PLAIN_NS}/sa/wp;URI=spiffe://cluster.local/ns/{NS}/sa/sa-{}",
        client.name
    );
    let deadline = std::time::Instant::now() + LOG_WAIT;
    loop {
        let line = &ask()[0];
        let seen = &line["headers"]["x-forwarded-client-cert"];
        if !seen.is_null() {
            assert_eq!(seen, &serde_json::json!([expected]), "{line}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no XFCC after the annotation: {line}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Warnings a waypoint writes in any one second about one client's requests, at most
/// (`mesh-trace/src/log_budget.rs`).
const WARNINGS_PER_CLIENT_PER_SECOND: usize = 10;

/// The victim's failing requests during the flood, each of which must have its warning.
const VICTIM_REQUESTS: usize = 3;

/// The attack on a waypoint's log: a client sends requests it knows no endpoint will answer, as
/// fast as it can (h2load, 20 streams at a time), to make the waypoint (shared by every client
/// of its services) write a warning per request and bury the others' warnings. The waypoint
/// writes at most the attacker's share a second and a line saying how many it held back and
/// from whom; the access log has every request; another client's failed requests during the
/// flood each have their warning.
#[test]
fn a_flood_of_failing_requests_does_not_flood_the_waypoints_log() {
    let route = one_rule_route("backendRefs: [{name: web-v1, port: 80}]\n");
    let mut bed = bed(&route);
    // v1's server gone: its endpoint stays, and nothing answers on its port.
    drop(bed.backends.remove(0));
    let (attacker, victim) = (bed.client().clone(), bed.mesh.pod(1, 1).clone());
    let log_from = bed.waypoint.process.lines().len();
    let started = std::time::Instant::now();
    let (flood, victim_codes) = std::thread::scope(|scope| {
        let victim = scope.spawn(|| {
            (0..VICTIM_REQUESTS)
                .map(|_| {
                    std::thread::sleep(Duration::from_millis(400));
                    curl_answer(&victim, "/victim", &[]).0
                })
                .collect::<Vec<u16>>()
        });
        let out = attacker
            .command("h2load")
            .args(["-D", "2", "-c", "2", "-m", "10", &url("/flood")])
            .output()
            .expect("running h2load");
        let flood = String::from_utf8_lossy(&out.stdout).into_owned();
        (flood, victim.join().expect("the victim's requests"))
    });
    let flood_secs = started.elapsed().as_secs_f64();
    assert!(flood.contains("Application protocol: h2c"), "{flood}");
    assert_eq!(victim_codes, [503; VICTIM_REQUESTS], "the victim's answers");
    // The failed requests, as the access log has them.
    let failed_of = |records: &[Value], pod: &Pod| {
        records
            .iter()
            .filter(|r| r["response_flags"] == "UF" && r["src"]["workload"] == pod.name.as_str())
            .count()
    };
    // Every failure is either written or counted in a line saying how many were held back (the
    // next warning, or the waypoint's report every 10 s, within LOG_WAIT).
    let warnings_in = |lines: &[String], pod: &Pod| {
        warnings_from(lines, "no response from the endpoint", pod.ipv4)
    };
    // One snapshot of the log, once the access records and the warnings agree (the last
    // records come in the log's next batch, the last held-back count within 10 s).
    let logs = lines_once(
        || bed.waypoint.process.lines()[log_from..].to_vec(),
        LOG_WAIT,
        |l| {
            let records = access_records_in(l);
            failed_of(&records, &victim) == VICTIM_REQUESTS
                && (warnings_in(l, &attacker) + warnings_in(l, &victim)) as u64
                    + warnings_held_back(l)
                    == (failed_of(&records, &attacker) + VICTIM_REQUESTS) as u64
        },
    );
    let failed = failed_of(&access_records_in(&logs), &attacker);
    assert!(
        failed > 10 * WARNINGS_PER_CLIENT_PER_SECOND,
        "the flood made only {failed} failed requests: {flood}"
    );
    let (warnings, held) = (warnings_in(&logs, &attacker), warnings_held_back(&logs));
    eprintln!(
        "{failed} failed requests in {flood_secs:.1} s: {warnings} warnings written, {held} held \
         back"
    );
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let most = (flood_secs.ceil() as usize + 1) * WARNINGS_PER_CLIENT_PER_SECOND;
    assert!(
        (1..=most).contains(&warnings),
        "{warnings} warnings for {failed} failed requests in {flood_secs:.1} s (budget {most})"
    );
    assert_eq!(
        warnings_in(&logs, &victim),
        VICTIM_REQUESTS,
        "the victim's warnings during the flood"
    );
    assert_eq!(
        warnings as u64 + held,
        failed as u64,
        "warnings written ({warnings}) and held back ({held}) against the failed requests"
    );
    assert!(
        held_back_most_from(&logs, attacker.ipv4),
        "no held-back line names the attacker"
    );
}

/// Gateway API's L4 routes at the waypoint: a `TCPRoute` on an undeclared port splits its
/// connections by weight (all to `v2`, then all to `v1`), and `TLSRoute`s send TLS connections
/// by the server name they ask for, the exact name before the older wildcard route.
#[test]
fn tcp_routes_split_connections_and_tls_routes_go_by_server_name() {
    // Before, `TCPRoute` and `TLSRoute` were not read: Istio's "TCP traffic shifting" task
    // could not be followed, and its connections went to the Service whatever the route said.
    let mut bed = bed(&canary_route());
    let client = bed.client().clone();
    let (v1, v2) = (bed.mesh.pod(1, 0).clone(), bed.mesh.pod(1, 1).clone());
    let servers: Vec<Process> = [&v1, &v2]
        .iter()
        .map(|pod| {
            mesh_tests::probe::serve(pod, SocketAddr::new(IpAddr::V4(pod.ipv4), 9000))
                .expect("TCP echo server")
        })
        .collect();
    let _tls_servers = [tls_server(&bed, &v1, "v1"), tls_server(&bed, &v2, "v2")];
    let bound = format!("istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}");
    // `raw`'s port declares no protocol: only the TCPRoute says what it carries.
    let undeclared = ("protocol: TCP", 9000, 9000);
    let tls = ("name: tls", 443, 9443);
    for (name, vip, selector, labels, port) in [
        ("raw", 3, ("svc", "web"), bound.as_str(), undeclared),
        ("raw-v1", 4, ("version", "v1"), "", undeclared),
        ("raw-v2", 5, ("version", "v2"), "", undeclared),
        ("secure", 6, ("svc", "web"), bound.as_str(), tls),
        ("secure-v1", 7, ("version", "v1"), "", tls),
        ("secure-v2", 8, ("version", "v2"), "", tls),
    ] {
        let text = port_service_yaml(name, vip, selector, labels, port);
        bed.mesh
            .files
            .write(&format!("service-{name}.yaml"), &text)
            .unwrap();
    }
    bed.wait_for_services(9, "the TCP and TLS Services");

    let tcp_route = |weights: (u32, u32)| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata: {{name: raw, namespace: {NS}}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: raw, port: 9000}}]\n  rules:\n  - backendRefs:\n    - {{name: raw-v1, port: 9000, weight: {}}}\n    - {{name: raw-v2, port: 9000, weight: {}}}\n",
            weights.0, weights.1
        )
    };
    let addr = SocketAddr::new(IpAddr::V4(plan::service_vip_v4(3)), 9000);
    for (generation, weights, expected) in [(1, (0, 100), [0, 10]), (2, (100, 0), [10, 10])] {
        let from = bed.waypoint.process.line_count();
        bed.mesh
            .files
            .write("tcproute-raw.yaml", &tcp_route(weights))
            .unwrap();
        bed.waypoint
            .process
            .wait_for_line_from(
                from,
                &format!("the TCPRoute, take {generation}"),
                LOG_WAIT,
                |l| l.contains("cluster state updated"),
            )
            .unwrap();
        for i in 0..10 {
            let out = mesh_tests::probe::connect(&client, addr, &format!("bytes {i}"))
                .unwrap_or_else(|e| panic!("{addr}: {e}"));
            assert!(out.starts_with("echo ok"), "{out}");
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(accepted(&servers), expected, "weights {weights:?}");
    }

    // The wildcard route is the older; the exact name takes its connections all the same.
    let tls_route = |name: &str, created: &str, hostname: &str, backend: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: TLSRoute\nmetadata: {{name: {name}, namespace: {NS}, creationTimestamp: \"{created}\"}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: secure, sectionName: tls}}]\n  hostnames: [\"{hostname}\"]\n  rules:\n  - backendRefs: [{{name: {backend}, port: 443}}]\n"
        )
    };
    let from = bed.waypoint.process.line_count();
    let routes = [
        tls_route("wild", "2026-01-01T00:00:00Z", "*.example", "secure-v2"),
        tls_route("exact", "2026-02-01T00:00:00Z", "a.example", "secure-v1"),
    ]
    .join("---\n");
    bed.mesh
        .files
        .write("tlsroute-secure.yaml", &routes)
        .unwrap();
    bed.waypoint
        .process
        .wait_for_line_from(from, "the TLSRoutes", LOG_WAIT, |l| {
            l.contains("cluster state updated")
        })
        .unwrap();
    let vip = plan::service_vip_v4(6);
    for _ in 0..3 {
        assert_eq!(tls_answered(&client, vip, "a.example"), "v1");
        assert_eq!(tls_answered(&client, vip, "b.example"), "v2");
    }
    assert!(
        !bed.waypoint
            .process
            .lines()
            .iter()
            .any(|l| l.contains("TCPRoute") || l.contains("TLSRoute")),
        "no warning about the routes"
    );
}

/// Which TLS server (`v1` or `v2`, from its certificate's subject) answered curl in `client`
/// asking for server name `name` at `vip`:443 (the client's TLS goes through untouched).
fn tls_answered(client: &Pod, vip: std::net::Ipv4Addr, name: &str) -> &'static str {
    let out = client
        .command("curl")
        .args(["-sk", "-v", "--max-time", "10", "-o", "/dev/null"])
        .args(["--connect-to", &format!("{name}:443:{vip}:443")])
        .arg(format!("https://{name}/"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{name}: {text}");
    ["v1", "v2"]
        .into_iter()
        .find(|v| text.contains(&format!("subject: CN={v}")))
        .unwrap_or_else(|| panic!("{name}: no subject: {text}"))
}

/// How many connections each TCP echo server of `servers` accepted.
fn accepted(servers: &[Process]) -> Vec<usize> {
    servers
        .iter()
        .map(|s| {
            s.lines()
                .iter()
                .filter(|l| l.starts_with("accepted "))
                .count()
        })
        .collect()
}

/// A Service asking for `trafficDistribution: PreferClose` behind the waypoint: its requests go
/// to the endpoints of the waypoint's own zone (the waypoint finds its pod by the address its
/// tunnels come to, and the pod's node's zone), and to the others once those are gone. Both
/// backends run on n1; their own `istio-locality` labels place v1 in the waypoint's zone and
/// v2 in another. Then a `DestinationRule`'s `localityLbSetting`
/// ([`locality_distribution_at_the_waypoint`]).
#[test]
fn a_service_preferring_close_endpoints_is_served_from_the_waypoints_zone() {
    let route = one_rule_route("backendRefs: [{name: web, port: 80}]\n");
    let mut bed = bed(&route);
    let client = bed.client().clone();
    let files = &bed.mesh.files;
    let node = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n0\n  labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-a}\n";
    files.write("node-n0.yaml", node).unwrap();
    for (j, version, zone) in [(0, "v1", "eu.eu-a"), (1, "v2", "eu.eu-b")] {
        let pod = bed.mesh.pod(1, j).clone();
        let labels = [
            ("svc", "web"),
            ("version", version),
            ("istio-locality", zone),
        ];
        files.pod(&pod, "n1", NS, &labels).unwrap();
    }
    let bound = format!("istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}");
    let web = service_yaml("web", 0, ("svc", "web"), &bound)
        .replace("spec:\n", "spec:\n  trafficDistribution: PreferClose\n");
    files.write("service-web.yaml", &web).unwrap();
    let urls: Vec<String> = (0..20).map(|i| url(&format!("/near/{i}"))).collect();
    let only_v1 = BTreeMap::from([("v1".to_owned(), 20)]);
    let started = std::time::Instant::now();
    while backends(&curl(&client, &urls)) != only_v1 {
        assert!(
            started.elapsed() < LOG_WAIT,
            "never only the waypoint's zone"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(backends(&curl(&client, &urls)), only_v1);
    // v1 no longer selected: v2, in the other zone, takes over.
    let v1 = bed.mesh.pod(1, 0).clone();
    files.pod(&v1, "n1", NS, &[("version", "v1")]).unwrap();
    let only_v2 = BTreeMap::from([("v2".to_owned(), 20)]);
    let started = std::time::Instant::now();
    while backends(&curl(&client, &urls)) != only_v2 {
        assert!(started.elapsed() < LOG_WAIT, "never failed over");
        std::thread::sleep(Duration::from_millis(200));
    }
    locality_distribution_at_the_waypoint(&mut bed, &v1);
}

/// Istio's "locality weighted distribution" task at the waypoint: a `DestinationRule` with
/// outlier detection and `distribute` from eu-a (the waypoint's zone) of 80 to eu-a and 20 to
/// eu-b (over the Service's preference), then v1 (eu-a) back: of 200 requests, v1's share lands
/// within ±5 standard deviations of 160.
fn locality_distribution_at_the_waypoint(bed: &mut Bed, v1: &Pod) {
    let rule = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: {NS}}}\nspec:\n  host: web.{NS}.svc.cluster.local\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        distribute:\n        - from: eu/eu-a/*\n          to: {{\"eu/eu-a/*\": 80, \"eu/eu-b/*\": 20}}\n    outlierDetection: {{consecutive5xxErrors: 100, interval: 1s, baseEjectionTime: 1m}}\n"
    );
    write_destination_rule(bed, &rule);
    let labels = [
        ("svc", "web"),
        ("version", "v1"),
        ("istio-locality", "eu.eu-a"),
    ];
    bed.mesh.files.pod(v1, "n1", NS, &labels).unwrap();
    let client = bed.client().clone();
    let probes: Vec<String> = (0..20).map(|i| url(&format!("/back/{i}"))).collect();
    let started = std::time::Instant::now();
    while !backends(&curl(&client, &probes)).contains_key("v1") {
        assert!(started.elapsed() < LOG_WAIT, "v1 never back");
        std::thread::sleep(Duration::from_millis(200));
    }
    let urls: Vec<String> = (0..200).map(|i| url(&format!("/spread/{i}"))).collect();
    let counts = backends(&curl(&client, &urls));
    let v1 = counts.get("v1").copied().unwrap_or(0);
    eprintln!("locality distribute 80/20: {counts:?}");
    // Binomial(200, 0.8): standard deviation 5.7.
    assert!((132..=188).contains(&v1), "{counts:?}");
}

#[test]
fn an_egress_waypoint_routes_and_authorizes_a_service_entrys_requests() {
    // Istio's egress waypoint: a `ServiceEntry` for a host outside the cluster (an HTTP echo
    // server on node n1's own address), bound to the waypoint; a route on the entry and a
    // policy targeting it, as Istio's users write them.
    let mut bed = bed(&canary_route());
    let node = bed.mesh.tb.node(1).clone();
    let outside = SocketAddr::new(IpAddr::V4(node.link_ipv4), 9080);
    let server = mesh_tests::probe::on_node(
        &node,
        &["http-echo", &outside.to_string(), "--name", "outside"],
    )
    .expect("echo server outside the cluster");
    let vip = plan::service_vip_v4(9);
    let files = &bed.mesh.files;
    files
        .write(
            "serviceentry-api.yaml",
            &format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: api\n  namespace: {NS}\n  labels: {{istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}}}\nspec:\n  hosts: [api.example.com]\n  addresses: [{vip}]\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {port}}}]\n  resolution: STATIC\n  endpoints: [{{address: {ip}}}]\n",
                ip = outside.ip(),
                port = outside.port(),
            ),
        )
        .unwrap();
    files
        .write(
            "httproute-api.yaml",
            &format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: api\n  namespace: {NS}\nspec:\n  parentRefs: [{{group: networking.istio.io, kind: ServiceEntry, name: api, port: 80}}]\n  rules:\n  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {{set: [{{name: x-egress, value: waypoint}}]}}\n    backendRefs: [{{group: networking.istio.io, kind: Hostname, name: api.example.com, port: 80}}]\n"
            ),
        )
        .unwrap();
    files
        .write(
            "authz-api.yaml",
            &authz_policy(
                NS,
                "api-no-admin",
                "  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: api}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin/*\"]}}]}]\n",
            ),
        )
        .unwrap();
    bed.wait_for_services(4, "the entry");
    wait_for_policies(&mut bed, 1);
    let client = bed.client().clone();
    let lines = curl(&client, &[format!("http://{vip}/hello")]);
    assert_eq!(lines[0]["backend"], "outside", "{}", lines[0]);
    assert_eq!(
        lines[0]["headers"]["x-egress"][0], "waypoint",
        "{}",
        lines[0]
    );
    let code = curl_raw(
        &client,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{vip}/admin/keys"),
        ],
    );
    assert_eq!(code, "403", "the policy on the entry refuses /admin");
    let samples = waypoint_metrics(bed.mesh.pod(0, 1));
    let requests = |code: &str| {
        count(
            &samples,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("destination_service", "api.example.com"),
                ("destination_service_name", "api.example.com"),
                ("destination_service_namespace", NS),
                ("response_code", code),
            ],
        )
    };
    assert_eq!((requests("200"), requests("403")), (1, 1));
    // Bypassing the waypoint is not possible for the entry's address: the client's agent sends
    // it there, and nothing else serves the address.
    assert_eq!(
        served_settled(&[&server], 1),
        [1],
        "only the allowed request reached the host outside"
    );
}

#[test]
fn an_egress_waypoint_resolves_a_dns_service_entry() {
    // A `ServiceEntry` of resolution DNS: its host resolved by the waypoint, through the name
    // server `--dns-server` names (on node n1's own address; it knows `api.dns.example` as n1's
    // address too, where the HTTP server outside the cluster listens).
    let dns_addr = SocketAddr::new(IpAddr::V4(plan::node_link_v4(1)), 5353);
    let mut bed = bed_full(
        &canary_route(),
        (&[], &[]),
        false,
        &["--dns-server", &dns_addr.to_string()],
    );
    let node = bed.mesh.tb.node(1).clone();
    let outside = SocketAddr::new(IpAddr::V4(node.link_ipv4), 9080);
    let answer = format!("api.dns.example={}", node.link_ipv4);
    let mut dns = mesh_tests::probe::on_node(
        &node,
        &["dns-serve", &dns_addr.to_string(), "--answer", &answer],
    )
    .expect("name server");
    let server = mesh_tests::probe::on_node(
        &node,
        &["http-echo", &outside.to_string(), "--name", "outside"],
    )
    .expect("echo server outside the cluster");
    let vip = plan::service_vip_v4(9);
    let entry = |hosts: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: api\n  namespace: {NS}\n  labels: {{istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: {PLAIN_NS}}}\nspec:\n  hosts: [{hosts}]\n  addresses: [{vip}]\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {port}}}]\n  resolution: DNS\n",
            port = outside.port(),
        )
    };
    bed.mesh
        .files
        .write("serviceentry-api.yaml", &entry("api.dns.example"))
        .unwrap();
    bed.wait_for_services(4, "the entry");
    let client = bed.client().clone();
    let lines = curl(
        &client,
        &[format!("http://{vip}/a"), format!("http://{vip}/b")],
    );
    assert_eq!(backends(&lines).get("outside"), Some(&2), "{lines:?}");
    dns.wait_for_line("the waypoint's query", LOG_WAIT, |l| {
        l == "query api.dns.example A"
    })
    .expect("the waypoint asked the name server");
    assert_eq!(served_settled(&[&server], 2), [2]);
    // A mirror of web's requests to the entry (Istio's `Hostname` backend): the entry's names
    // resolved off the request's path, the copy reaches the host outside.
    bed.mesh
        .files
        .write(
            "httproute-web.yaml",
            &format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\n  namespace: {NS}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: web, port: 80}}\n  rules:\n  - filters:\n    - type: RequestMirror\n      requestMirror: {{backendRef: {{group: networking.istio.io, kind: Hostname, name: api.dns.example, port: 80}}}}\n    backendRefs: [{{name: web-v1, port: 80}}]\n"
            ),
        )
        .unwrap();
    let deadline = std::time::Instant::now() + LOG_WAIT;
    while served(&server) < 3 && std::time::Instant::now() < deadline {
        let lines = curl(&client, &[url("/mirrored")]);
        assert_eq!(lines.len(), 1, "{lines:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        served(&server) >= 3,
        "a mirrored request reached the host outside"
    );
    // A name nobody answers: the request is answered 503 by the waypoint (no endpoint), which
    // says why in its log.
    bed.mesh
        .files
        .write("serviceentry-api.yaml", &entry("nowhere.dns.example"))
        .unwrap();
    let code_after_change = || {
        curl_raw(
            &client,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{vip}/c"),
            ],
        )
    };
    let deadline = std::time::Instant::now() + LOG_WAIT;
    let mut code = code_after_change();
    while code != "503" && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        code = code_after_change();
    }
    assert_eq!(code, "503");
    bed.waypoint
        .process
        .wait_for_line("the resolution failure", LOG_WAIT, |l| {
            l.contains("the entry's names did not all resolve") && l.contains("nowhere.dns.example")
        })
        .expect("the waypoint says why");
}
