//! Tests of the limits and of the nesting pre-scan: deep flow and block nesting, what is not
//! counted (quoted, commented, plain and block scalars), and agreement with `serde_yaml` on
//! valid YAML, real Kubernetes lists included.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_yaml::Value;

use super::{
    check_depth, nesting_depth, FileLimits, LimitError, TooDeep, DEFAULT_MAX_DEPTH, MAX_MAX_DEPTH,
    MAX_MAX_FILE_BYTES, MIN_MAX_DEPTH, MIN_MAX_FILE_BYTES,
};

const KUBECTL_LIST: &str = include_str!("../testdata/kubectl-list.yaml");
const CLUSTER: &str = include_str!("../testdata/cluster.yaml");
const PEER_AUTHENTICATION: &str = include_str!("../testdata/peer-authentication.yaml");

/// Nesting of a parsed value: what `serde_yaml`'s recursion limit counts.
fn value_depth(value: &Value) -> usize {
    match value {
        Value::Sequence(items) => 1 + items.iter().map(value_depth).max().unwrap_or(0),
        Value::Mapping(map) => {
            let inner = map.iter().map(|(k, v)| value_depth(k).max(value_depth(v)));
            1 + inner.max().unwrap_or(0)
        }
        Value::Tagged(tagged) => value_depth(&tagged.value),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => 0,
    }
}

/// The deepest document of `text` according to `serde_yaml`.
fn serde_depth(text: &str) -> usize {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| value_depth(&Value::deserialize(doc).expect("valid YAML")))
        .max()
        .unwrap_or(0)
}

/// Asserts that the pre-scan counts exactly what `serde_yaml` builds, and that it is `depth`.
fn assert_depth(text: &str, depth: usize) {
    assert_eq!(serde_depth(text), depth, "serde_yaml's depth of {text:?}");
    assert_eq!(nesting_depth(text), depth, "pre-scan depth of {text:?}");
}

/// A realistic Pod as `kubectl get pod -o yaml` prints it, with the deepest parts real pods have
/// (managed fields, affinity, env from field references, probes).
fn kubectl_pod(i: usize) -> String {
    format!(
        r#"- apiVersion: v1
  kind: Pod
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {{"apiVersion":"v1","kind":"Pod","metadata":{{"annotations":{{}},"name":"web-{i}"}},"spec":{{"containers":[{{"image":"nginx","name":"web"}}]}}}}
    creationTimestamp: "2024-05-01T10:01:00Z"
    labels:
      app: web
    managedFields:
    - apiVersion: v1
      fieldsType: FieldsV1
      fieldsV1:
        f:spec:
          f:containers:
            k:{{"name":"web"}}:
              .: {{}}
              f:env:
                .: {{}}
                k:{{"name":"POD_IP"}}:
                  .: {{}}
                  f:name: {{}}
                  f:valueFrom:
                    .: {{}}
                    f:fieldRef: {{}}
      manager: kubectl-client-side-apply
      operation: Update
      time: "2024-05-01T10:01:00Z"
    name: web-{i}
    namespace: shop
  spec:
    affinity:
      podAntiAffinity:
        requiredDuringSchedulingIgnoredDuringExecution:
        - labelSelector:
            matchExpressions:
            - key: app
              operator: In
              values: [web, "web-[canary]"]
          topologyKey: kubernetes.io/hostname
    containers:
    - args: ["--listen=:8080", '--motd=it''s {{up}} # [not a comment]']
      command:
      - /bin/sh
      - -c
      - >-
        exec nginx -g 'daemon off;' [
        {{ ignored }}
      env:
      - name: POD_IP
        valueFrom:
          fieldRef:
            apiVersion: v1
            fieldPath: status.podIP
      image: nginx:1.25 # the [stable] one
      livenessProbe:
        httpGet: {{path: /healthz, port: 8080, httpHeaders: [{{name: X, value: "a]b"}}]}}
      name: web
      ports:
      - containerPort: 8080
        protocol: TCP
    nodeName: n1
  status:
    phase: Running
    podIP: 10.0.0.{i}
"#
    )
}

fn kubectl_list(pods: usize) -> String {
    let items: String = (0..pods).map(kubectl_pod).collect();
    format!("apiVersion: v1\nitems:\n{items}kind: List\nmetadata:\n  resourceVersion: \"\"\n")
}

#[test]
fn limits_are_validated_with_their_range() {
    FileLimits::default()
        .validate()
        .expect("the defaults are valid");
    let limits = |max_file_bytes, max_depth| FileLimits {
        max_file_bytes,
        max_depth,
    };
    for bad in [0, MIN_MAX_FILE_BYTES - 1, MAX_MAX_FILE_BYTES + 1] {
        let err = limits(bad, DEFAULT_MAX_DEPTH).validate().unwrap_err();
        assert_eq!(err, LimitError::MaxFileBytes(bad));
        let message = err.to_string();
        assert!(
            message.contains(&format!("{bad} bytes is out of range (4096 to 67108864)"))
                && message.contains("--config-max-file-bytes"),
            "{message}"
        );
    }
    for bad in [0, MIN_MAX_DEPTH - 1, MAX_MAX_DEPTH + 1] {
        let err = limits(MIN_MAX_FILE_BYTES, bad).validate().unwrap_err();
        assert_eq!(err, LimitError::MaxDepth(bad));
        let message = err.to_string();
        assert!(
            message.contains(&format!("{bad} is out of range (16 to 128)"))
                && message.contains("--config-max-depth"),
            "{message}"
        );
    }
    limits(MAX_MAX_FILE_BYTES, MAX_MAX_DEPTH)
        .validate()
        .expect("the bounds are valid");
}

#[test]
fn deep_flow_nesting_is_refused_where_it_goes_over() {
    let text = "[".repeat(200_000);
    let started = Instant::now();
    let err = check_depth(&text, 64).expect_err("too deep");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        err,
        TooDeep {
            depth: 200_000,
            line: 1,
            column: 65
        }
    );
    assert_eq!(check_depth(&"[".repeat(64), 64), Ok(()));
    assert!(check_depth(&"{".repeat(65), 64).is_err());

    // Single-pair mappings in flow sequences are a level each (a minute for serde_yaml at
    // 100,000 of them).
    let pairs = "[a: ".repeat(100_000);
    assert_eq!(nesting_depth(&pairs), 200_000);
    let err = check_depth(&pairs, 64).expect_err("too deep");
    assert_eq!((err.line, err.column), (1, 129), "{err:?}");
    // Closed levels no longer count; a flow collection inside block ones adds to them.
    assert_depth("[[[]], [[]], {a: [b: [c]]}]", 5);
    assert_depth("a:\n  b: [[1], {c: [d, e]}]\n", 5);
}

#[test]
fn deep_block_nesting_is_counted_by_indentation() {
    // Mappings, one column deeper each.
    let mut mappings = String::new();
    for level in 0..100 {
        writeln!(mappings, "{}k{level}:", " ".repeat(level)).expect("to a String");
    }
    assert_eq!(nesting_depth(&mappings), 100);
    let err = check_depth(&mappings, 64).expect_err("too deep");
    assert_eq!(
        err,
        TooDeep {
            depth: 100,
            line: 65,
            column: 65
        }
    );
    // Sequences of sequences on one line, two bytes a level.
    let dashes = format!("{}x\n", "- ".repeat(100_000));
    assert_eq!(nesting_depth(&dashes), 100_000);
    assert_eq!(check_depth(&dashes, 64).expect_err("too deep").column, 129);
    // A sequence at its key's indentation is a level of its own.
    let mut indentless = String::from("k0:\n");
    for level in 1..40 {
        writeln!(indentless, "{}- k{level}:", "  ".repeat(level - 1)).expect("to a String");
    }
    writeln!(indentless, "{}- x", "  ".repeat(39)).expect("to a String");
    assert_eq!(nesting_depth(&indentless), 80);
    assert!(check_depth(&indentless, 64).is_err());
    // Small versions, checked against serde_yaml.
    assert_depth(
        &mappings.lines().take(10).collect::<Vec<_>>().join("\n"),
        10,
    );
    assert_depth("- - - - x\n", 4);
    assert_depth("a:\n- b:\n  - c:\n    - d\n  e: 1\nf: 2\n", 6);
}

#[test]
fn quoted_commented_and_scalar_brackets_are_not_counted() {
    let brackets = "[{".repeat(1_000);
    // (text, where the brackets are)
    for (text, what) in [
        (format!("a: \"{brackets}\"\n"), "double-quoted"),
        (format!("a: '{brackets}'\n"), "single-quoted"),
        (
            format!("a: \"b: {brackets}\"\n"),
            "double-quoted, after `: `",
        ),
        (format!("a: 'b: {brackets}'\n"), "single-quoted, after `: `"),
        (
            format!("a: \"x\\\"{brackets}\"\n"),
            "after an escaped double quote",
        ),
        (
            format!("a: 'it''s {brackets}'\n"),
            "after an escaped single quote",
        ),
        (
            format!("a: \"two\n  lines {brackets}\"\n"),
            "a quoted scalar's second line",
        ),
        (format!("a: 1 # {brackets}\n# {brackets}\n"), "comments"),
        (format!("a: b{brackets}\n"), "a plain scalar"),
        (
            format!("a: x \"{brackets}\n"),
            "a plain scalar with a quote",
        ),
        (
            format!("a: plain\n  continued {brackets}\n"),
            "a plain scalar's second line",
        ),
        (
            format!("a: |\n  {brackets}\n  {brackets}\nb: c\n"),
            "a literal block scalar",
        ),
        (
            format!("a: >-\n    {brackets}\n\n    x\n"),
            "a folded one, an empty line",
        ),
        (
            format!("- |2\n   {brackets}\n"),
            "a block scalar, explicit indentation",
        ),
    ] {
        assert_eq!(nesting_depth(&text), 1, "{what}");
        assert_depth(&text, 1);
        assert_eq!(check_depth(&text, MIN_MAX_DEPTH), Ok(()), "{what}");
    }
    // In a flow collection, where a plain scalar would end at the first bracket.
    assert_depth(&format!("a: [\"{brackets}\", '{brackets}']\n"), 2);
    assert_depth(&format!("a: [b, # {brackets}\n  c]\n"), 2);
    assert_depth("a: \"[[[\" # [[[\nb: [\"]]]\", '[[', \"}\"]\n", 2);
    assert_depth("a: [http://x:80/y, {url: \"a]\"}]\n", 3);
    assert_depth("a: |\n  [[[\nb: [[c]]\n", 3);
    // A line less indented than the block scalar's content ends it, and is counted.
    assert_depth("a:\n  b: |\n      [[\n  c: [[[d]]]\n", 5);
    // Tags are skipped; an alias counts as a scalar (serde_yaml expands it, and refuses what
    // that makes too deep itself).
    assert_depth("a: &x [1]\nb: !!str '[['\nc: *x\n", 2);
    assert_eq!(nesting_depth("a: &x [[1]]\nb: [*x]\n"), 3);
}

#[test]
fn documents_and_explicit_keys_are_scanned_like_libyaml() {
    assert_depth(
        "a: [[1]]\n---\n- - - x\n...\n--- {a: {b: {c: {d: 1}}}}\n",
        4,
    );
    assert_depth("? [a, [b]]\n: - c\n  - [d]\n", 3);
    assert_depth("[? a : [b], c]\n", 3);
    assert_depth("{\"a\":[\"b\",{\"c\":{\"d\":[]}}]}\n", 5);
    assert_depth("key:   \n  - a\n  -   - b\n      - c: [d]\n", 5);
    assert_depth("\u{feff}a:\r\n  b: [c]\r\n", 3);
    // A document's unclosed collections do not leak into the next one.
    assert_eq!(nesting_depth("[[[[\n---\n[\n"), 4);
}

#[test]
fn real_kubernetes_lists_are_accepted_with_their_exact_depth() {
    for (name, text) in [
        ("kubectl-list.yaml", KUBECTL_LIST),
        ("cluster.yaml", CLUSTER),
        ("peer-authentication.yaml", PEER_AUTHENTICATION),
    ] {
        let depth = nesting_depth(text);
        assert_eq!(depth, serde_depth(text), "{name}");
        assert!(depth <= 10, "{name}: {depth}");
        assert_eq!(check_depth(text, MIN_MAX_DEPTH), Ok(()), "{name}");
    }
    let list = kubectl_list(3);
    assert_eq!(nesting_depth(&list), 14);
    assert_eq!(serde_depth(&list), 14);
    assert_eq!(check_depth(&list, DEFAULT_MAX_DEPTH), Ok(()));
}

#[test]
fn a_kubectl_list_at_the_default_size_limit_scans_in_milliseconds() {
    let list = kubectl_list(1_400);
    let size = u64::try_from(list.len()).expect("size");
    assert!(
        (FileLimits::default().max_file_bytes / 2..FileLimits::default().max_file_bytes)
            .contains(&size),
        "{size} bytes: about the default limit"
    );
    let started = Instant::now();
    assert_eq!(check_depth(&list, DEFAULT_MAX_DEPTH), Ok(()));
    // Generous for a debug build on a loaded machine; a release build takes a few ms.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
