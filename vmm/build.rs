//! Builds the test guests of `resources/guests/` with the host's gcc and ld
//! and writes `$OUT_DIR/guests.rs`, which `src/guests.rs` includes:
//!
//! ```text
//! pub static GUESTS: &[(&str, &[u8])] = &[("demo", include_bytes!("<OUT_DIR>/guests/demo.elf")), ...];
//! ```
//!
//! Every `resources/guests/*.c` is one guest (named after the file), linked
//! with all of `resources/guests/kit/*.{c,S}` and `kit/link.ld`. `demo` comes
//! first. The compiler and linker can be overridden with `GUEST_CC` and
//! `GUEST_LD` (defaults: `gcc`, `ld`).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-O2",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-tree-loop-distribute-patterns",
    "-Wall",
    "-Wextra",
    "-g",
];

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let src = manifest.join("../resources/guests");
    let src = src.canonicalize().unwrap_or_else(|e| {
        fail(&format!(
            "test-guest sources not found at {}: {e}",
            src.display()
        ));
    });
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("guests");
    let obj = out.join("obj");
    fs::create_dir_all(&obj)
        .unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", obj.display())));

    let cc = env::var("GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    let ld = env::var("GUEST_LD").unwrap_or_else(|_| "ld".to_string());
    println!("cargo:rerun-if-env-changed=GUEST_CC");
    println!("cargo:rerun-if-env-changed=GUEST_LD");
    println!("cargo:rerun-if-changed={}", src.display());
    check_tool(&cc, "gcc");
    check_tool(&ld, "binutils");

    let kit_dir = src.join("kit");
    let mut kit_sources = list(&kit_dir, &["c", "S"]);
    kit_sources.sort();
    for f in list(&kit_dir, &["h", "ld"]) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let mut kit_objects = Vec::new();
    for s in &kit_sources {
        println!("cargo:rerun-if-changed={}", s.display());
        let o = obj.join(format!("kit_{}.o", file_name(s)));
        compile(&cc, s, &o, &src);
        kit_objects.push(o);
    }

    let mut guests = list(&src, &["c"]);
    // `demo` (the default guest) first, the rest by name.
    guests.sort_by_key(|p| (stem(p) != "demo", stem(p)));
    if guests.is_empty() {
        fail(&format!("no guests (*.c) in {}", src.display()));
    }
    let linker_script = kit_dir.join("link.ld");
    let mut table = String::from("pub static GUESTS: &[(&str, &[u8])] = &[");
    for g in &guests {
        println!("cargo:rerun-if-changed={}", g.display());
        let name = stem(g);
        let o = obj.join(format!("{name}.o"));
        compile(&cc, g, &o, &src);
        let elf = out.join(format!("{name}.elf"));
        let mut cmd = Command::new(&ld);
        cmd.args([
            "-m",
            "elf_x86_64",
            "-nostdlib",
            "-static",
            "-z",
            "max-page-size=0x1000",
        ])
        .args(["-z", "noexecstack", "--build-id=none", "-T"])
        .arg(&linker_script)
        .arg("-o")
        .arg(&elf)
        .args(&kit_objects)
        .arg(&o);
        run(cmd, &format!("linking guest {name}"));
        let path = elf
            .to_str()
            .unwrap_or_else(|| fail(&format!("non-UTF-8 path {}", elf.display())));
        let _ = write!(table, "({name:?}, include_bytes!({path:?})), ");
    }
    if table.ends_with(", ") {
        table.truncate(table.len() - 2);
    }
    table.push_str("];\n");
    let dest = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("guests.rs");
    fs::write(&dest, table)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", dest.display())));
}

fn fail(msg: &str) -> ! {
    eprintln!("error: building the test guests (resources/guests): {msg}");
    panic!("building the test guests failed: {msg}");
}

fn check_tool(tool: &str, package: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => fail(&format!("`{tool} --version` failed ({}); the test guests need a working {tool}", o.status)),
        Err(e) => fail(&format!(
            "cannot run `{tool}` ({e}): the test guests in resources/guests are compiled with the host toolchain; \
             install it (Debian: `apt-get install {package}`) or point GUEST_CC/GUEST_LD at it"
        )),
    }
}

fn compile(cc: &str, source: &Path, object: &Path, include: &Path) {
    let mut cmd = Command::new(cc);
    cmd.args(CFLAGS)
        .arg("-I")
        .arg(include)
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(object);
    run(cmd, &format!("compiling {}", source.display()));
}

fn run(mut cmd: Command, what: &str) {
    let output = cmd
        .output()
        .unwrap_or_else(|e| fail(&format!("{what}: cannot run {cmd:?}: {e}")));
    // Warnings go to cargo's log of this build script (shown with -vv).
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        fail(&format!(
            "{what} failed ({}):\n{:?}\n{}",
            output.status,
            cmd,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
}

fn list(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", dir.display())));
    let mut v: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| exts.contains(&x))
        })
        .collect();
    v.sort();
    v
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .replace('.', "_")
}
