//! The test-guest kit embedded in the binary (built from
//! `resources/guests/` by `build.rs`).

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The embedded guest named `name`.
pub fn find(name: &str) -> Option<&'static [u8]> {
    GUESTS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Names of all embedded guests.
pub fn names() -> Vec<&'static str> {
    GUESTS.iter().map(|(n, _)| *n).collect()
}

/// Write every embedded guest to `dir` as `<name>.elf`; returns the paths.
pub fn extract(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    GUESTS
        .iter()
        .map(|(n, b)| {
            let p = dir.join(format!("{n}.elf"));
            std::fs::write(&p, b)?;
            Ok(p)
        })
        .collect()
}
