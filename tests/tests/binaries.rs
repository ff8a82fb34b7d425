//! What the built binaries need from the system: glibc's `libc.so.6` and `libgcc_s.so.1`, and
//! no `libm.so.6` (the binaries define the functions they took from it, `pow` and `exp`:
//! `mesh-agent/src/pow.rs`; a loaded libm kept about 0.5 MiB resident in every process). A new
//! dependency that calls another libm function (`exp`, `log`, …) brings libm back and fails
//! here, naming the functions.
//!
//! Reads the binaries of this build (`target/<profile>`, or `$MESH_<NAME>_BIN`) with `readelf`.

use std::process::Command;

use mesh_tests::agent::binary;

/// The shared libraries `path` needs (`DT_NEEDED`), and the functions it takes from others.
fn needs(name: &str) -> (Vec<String>, Vec<String>) {
    let path = binary(name, "mesh-agent").unwrap_or_else(|e| panic!("{name}: {e}"));
    let readelf = |args: &[&str]| {
        let out = Command::new("readelf")
            .args(args)
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("running readelf on {}: {e}", path.display()));
        assert!(
            out.status.success(),
            "readelf {args:?} {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("readelf's output is UTF-8")
    };
    let needed = readelf(&["-dW"])
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split_once('[')?.1.trim_end_matches(']').to_owned()))
        .collect();
    let undefined = readelf(&["--dyn-syms", "-W"])
        .lines()
        .filter(|l| l.contains("FUNC"))
        // `  12: 0000000000000000  0 FUNC  GLOBAL DEFAULT  UND pow@GLIBC_2.29 (3)`
        .filter_map(|l| {
            let mut fields = l.split_whitespace().skip_while(|f| *f != "UND");
            fields.next()?;
            fields.next().map(str::to_owned)
        })
        .collect();
    (needed, undefined)
}

#[test]
fn the_binaries_do_not_load_libm() {
    for name in ["mesh-agent", "mesh-waypoint"] {
        let (needed, undefined) = needs(name);
        assert!(
            needed.iter().any(|n| n == "libc.so.6"),
            "{name} needs {needed:?}: readelf's output not understood"
        );
        let from_libm: Vec<&String> = undefined
            .iter()
            .filter(|f| {
                let base = f.split('@').next().unwrap_or(f);
                LIBM_FUNCTIONS.contains(&base)
            })
            .collect();
        assert!(
            !needed.iter().any(|n| n.starts_with("libm.so")),
            "{name} loads libm again ({needed:?}), for {from_libm:?}: define them as \
             mesh-agent/src/pow.rs defines pow, or avoid them"
        );
    }
}

/// libm functions a Rust dependency may call through `f64`/`f32` methods (`powf`, `exp`, `ln`,
/// the trigonometric ones, …), to name them when libm comes back.
const LIBM_FUNCTIONS: &[&str] = &[
    "pow", "powf", "exp", "expf", "exp2", "exp2f", "exp_m1", "expm1", "log", "logf", "log2",
    "log2f", "log10", "log10f", "log1p", "cbrt", "hypot", "sin", "sinf", "cos", "cosf", "tan",
    "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "tgamma",
    "lgamma_r", "fmod", "fmodf", "fma", "fmaf",
];
