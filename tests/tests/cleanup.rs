//! Privileged: a test that fails, or is killed, leaves no namespace, cgroup or bpffs pin behind.
//!
//! `fails_on_purpose` is the failing test. It is ignored in normal runs and run by the other
//! tests here as a child process of this same test binary, which writes the names it created to
//! the file named by `MESH_TESTBED_RECORD`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{
    mesh::{Mesh, Shortcut},
    process::run,
    sweep_stale, Process, TestbedSpec,
};

const RECORD: &str = "MESH_TESTBED_RECORD";
/// The two tests below run one at a time: a testbed built by one would otherwise sweep the
/// other's deliberate leftovers before it could look at them.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
const HANG: &str = "MESH_TESTBED_HANG";

#[test]
#[ignore = "fails on purpose: run by the cleanup tests in a child process"]
fn fails_on_purpose() {
    let mesh = Mesh::new(
        TestbedSpec {
            nodes: 2,
            pods_per_node: 1,
        },
        Shortcut::Default,
        &[],
    )
    .expect("mesh");
    let (tb, agent) = (&mesh.tb, &mesh.agents[0]);
    #[expect(
        clippy::zombie_processes,
        reason = "left running on purpose: teardown must kill it"
    )]
    let _sleeper = tb
        .pod(1, 0)
        .command("sleep")
        .arg("600")
        .spawn()
        .expect("sleep in a pod");
    let record = std::env::var(RECORD).expect("MESH_TESTBED_RECORD set");
    let lines = [
        tb.id().to_string(),
        tb.cgroup_dir().display().to_string(),
        tb.bpffs_dir().display().to_string(),
        agent.bpffs_dir().display().to_string(),
        tb.scratch_dir().display().to_string(),
    ];
    fs::write(&record, lines.join("\n")).expect("write record");
    if std::env::var_os(HANG).is_some() {
        println!("ready to be killed");
        std::thread::sleep(Duration::from_secs(600));
    }
    panic!("failing on purpose with a testbed and an agent running");
}

struct Recorded {
    id: String,
    paths: Vec<PathBuf>,
}

fn child(record: &Path, hang: bool) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "fails_on_purpose", "--ignored", "--nocapture"])
        .env(RECORD, record);
    if hang {
        cmd.env(HANG, "1");
    }
    cmd
}

fn read_record(record: &Path) -> Recorded {
    let text = fs::read_to_string(record).expect("the child recorded its testbed");
    let mut lines = text.lines();
    let id = lines.next().unwrap().to_string();
    Recorded {
        id,
        paths: lines.map(PathBuf::from).collect(),
    }
}

fn assert_nothing_left(rec: &Recorded) {
    let list = run(Command::new("ip").args(["netns", "list"])).unwrap();
    assert!(
        !list.contains(&rec.id),
        "namespaces of {} left:\n{list}",
        rec.id
    );
    for p in &rec.paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

fn record_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("mesh-cleanup-{}-{name}", std::process::id()))
}

#[test]
fn a_failing_test_leaves_nothing_behind() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let record = record_file("panic");
    let out = child(&record, false)
        .output()
        .expect("run the failing test");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "the child test was meant to fail:\n{output}"
    );
    assert!(
        output.contains("failing on purpose"),
        "child failed for another reason:\n{output}"
    );
    let rec = read_record(&record);
    let _ = fs::remove_file(&record);
    assert_eq!(rec.paths.len(), 4);
    assert_nothing_left(&rec);
}

#[test]
fn a_killed_test_is_swept_by_the_next_testbed() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let record = record_file("kill");
    let mut proc = Process::spawn("killed test", &mut child(&record, true)).expect("spawn");
    proc.wait_for_line(
        "the child to build its testbed",
        Duration::from_secs(60),
        |l| l.contains("ready to be killed"),
    )
    .expect("child ready");
    // SIGKILL: no destructor runs, the agent and the pod's process stay behind.
    proc.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    proc.wait(Duration::from_secs(10)).unwrap();
    let rec = read_record(&record);
    let _ = fs::remove_file(&record);
    let list = run(Command::new("ip").args(["netns", "list"])).unwrap();
    assert!(
        list.contains(&rec.id),
        "expected leftovers right after the kill:\n{list}"
    );

    let swept = sweep_stale().expect("sweep");
    assert!(swept.contains(&rec.id), "swept {swept:?}, not {}", rec.id);
    // The agent was killed with the cgroup; give the kernel a moment to release its links.
    let deadline = Instant::now() + Duration::from_secs(5);
    while rec.paths.iter().any(|p| p.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_nothing_left(&rec);
}
