//! Driving the Linux guest's serial shell (resources/linux's initramfs,
//! prompt `vmm-guest# `) from a test: boot to `VMM-GUEST ready`, run a
//! command and collect its output, read /proc files, power off.
//!
//! The serial console carries both the shell's output and the kernel's
//! console messages, and with 2 vCPUs a kernel message can be printed in
//! the middle of a shell line. Two defences: right after boot the console
//! log level is set to [`CONSOLE_LOGLEVEL`] (`dmesg -n`), so only critical
//! messages reach the console later (tests read the kernel log with
//! `dmesg`), and every line is read through [`guest_line`], which cuts
//! kernel records out of shell lines and joins the pieces again. Markers
//! are matched anywhere in a line and are computed by the shell, so the
//! echo of the typed command never matches.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::Vmm;

/// Limit for one shell command or wait. Generous: on hosts that emulate
/// guest ring 0 a system call costs ~0.5 ms and a fork+exec ~1 s, and CI
/// runs two guests side by side on 2 cores.
pub const T: Duration = Duration::from_secs(240);
/// Limit from `vmm` exec to `VMM-GUEST ready` (measured on this project's
/// emulated-ring-0 machines: ~16 s with 1 or 2 vCPUs on an idle machine,
/// docs/benchmarks.md; ~1 s on hardware KVM).
pub const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// Console log level once the shell is up: only messages below it (emerg,
/// alert, crit: panics, oopses, `reboot: Restarting system`) still reach
/// the serial console. `Memory failure: ...`, MCE and balloon messages are
/// KERN_ERR or lower and are read with `dmesg`.
pub const CONSOLE_LOGLEVEL: u32 = 3;

/// Where a kernel console record (`[<seconds>.<6 digits>] `, CONFIG_PRINTK_TIME)
/// starts in `s` after its first byte, if one does. A record at index 0 is
/// a whole line (or a `dmesg` output line) and is left alone.
pub fn kernel_record_after_start(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (1..b.len()).find(|&i| {
        if b[i] != b'[' {
            return false;
        }
        let mut j = i + 1;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        let int = j;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j == int || j >= b.len() || b[j] != b'.' {
            return false;
        }
        let frac = j + 1;
        j = frac;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        j - frac == 6 && b[j..].starts_with(b"] ")
    })
}

/// Feeds one raw serial line; returns the guest line it completes, if any.
/// The kernel writes a console record (up to its newline) under the UART's
/// lock, so a shell line `abcdef` interrupted by a record arrives as
/// `abc[    5.123456] some message` + `def`: the record is cut out and
/// `abc` waits in `pending` for the rest of its line.
pub fn splice(pending: &mut String, raw: &str) -> Option<String> {
    pending.push_str(raw);
    match kernel_record_after_start(pending) {
        Some(at) => {
            pending.truncate(at);
            None
        }
        None => Some(std::mem::take(pending)),
    }
}

/// The next line of guest output, with kernel console records that were
/// printed in the middle of it cut out ([`splice`]).
pub fn guest_line(vm: &mut Vmm, deadline: Instant) -> Option<String> {
    let mut pending = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some(l) = splice(&mut pending, &vm.next_line(left)?) {
            return Some(l);
        }
    }
}

/// Wait until `deadline` for a guest line containing `needle`; returns it.
pub fn wait_guest_until(vm: &mut Vmm, needle: &str, deadline: Instant) -> String {
    loop {
        match guest_line(vm, deadline) {
            Some(l) if l.contains(needle) => return l,
            Some(_) => {}
            None => panic!(
                "no guest line containing {needle:?} in time; log:\n{}",
                vm.seen().join("\n")
            ),
        }
    }
}

/// The kernel and initramfs to boot, with the kernel's System.map.
pub struct LinuxGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl LinuxGuest {
    /// resources/linux's guest ([`crate::linux_guest`]); None = skip.
    pub fn find(test: &str) -> Option<Self> {
        let (kernel, initrd) = crate::linux_guest(test)?;
        Some(LinuxGuest { kernel, initrd })
    }

    /// Address of `symbol` in the kernel's System.map (next to vmlinux).
    pub fn symbol(&self, symbol: &str) -> u64 {
        let map = self.kernel.with_file_name("System.map");
        let text = std::fs::read_to_string(&map)
            .unwrap_or_else(|e| panic!("{}: {e} (build-kernel.sh keeps it)", map.display()));
        text.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                let (a, _, name) = (w.next()?, w.next()?, w.next()?);
                (name == symbol).then(|| u64::from_str_radix(a, 16).ok())?
            })
            .unwrap_or_else(|| panic!("{symbol} not in {}", map.display()))
    }

    /// Start `vmm run` with this guest, wait for `VMM-GUEST ready` and
    /// quiet the console; prints the boot timeline.
    pub fn boot(&self, name: &str, vcpus: u32, mem_mib: u64, extra: &[&str]) -> Vmm {
        let v = vcpus.to_string();
        let mem = mem_mib.to_string();
        let mut args = vec![
            "--kernel",
            path_str(&self.kernel),
            "--initrd",
            path_str(&self.initrd),
            "--vcpus",
            &v,
            "--mem",
            &mem,
        ];
        args.extend_from_slice(extra);
        let start = Instant::now();
        let mut vm = Vmm::start(name, &args);
        wait_ready(&mut vm, vcpus, start);
        vm
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Wait for init's report (`nproc` must be `vcpus`) and `VMM-GUEST ready`,
/// then set the console log level. `start` is when the boot began.
pub fn wait_ready(vm: &mut Vmm, vcpus: u32, start: Instant) {
    let deadline = start + BOOT_LIMIT;
    let l = wait_guest_until(vm, "VMM-GUEST vcpus:", deadline);
    assert!(l.contains(&format!("nproc={vcpus}")), "{l}");
    wait_guest_until(vm, "VMM-GUEST ready", deadline);
    let ready = start.elapsed();
    let out = shell(
        vm,
        &format!("dmesg -n {CONSOLE_LOGLEVEL}; cat /proc/sys/kernel/printk"),
    );
    let level = CONSOLE_LOGLEVEL.to_string();
    assert!(
        out.iter()
            .any(|l| l.split_whitespace().next() == Some(level.as_str())
                && l.split_whitespace().count() == 4),
        "console log level: {out:?}"
    );
    eprintln!(
        "linux boot: {vcpus} vCPU(s), VMM-GUEST ready at {:.1}s, shell answered at {:.1}s",
        ready.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Run `cmd` in the guest shell and return its output lines (everything
/// read before the end marker, the echo of the typed command included).
/// The marker `:DONE:<n>:` is computed by the shell (`$(( ... ))`), so the
/// echoed command line does not contain it; it is found anywhere in a line
/// (text before it, output without a final newline, is kept).
pub fn shell(vm: &mut Vmm, cmd: &str) -> Vec<String> {
    shell_within(vm, cmd, T)
}

/// [`shell`] with its own limit, for commands whose work grows with their
/// input (filling guest RAM: every page is zeroed by the guest kernel, which
/// runs emulated on some hosts).
pub fn shell_within(vm: &mut Vmm, cmd: &str, limit: Duration) -> Vec<String> {
    let n = SEQ.fetch_add(1, Ordering::Relaxed) + 1000;
    let sep = if cmd.trim_end().ends_with('&') {
        " "
    } else {
        "; "
    };
    vm.send(&format!("{cmd}{sep}echo \":DONE:$(( {n} + 0 )):\"\n"));
    let done = format!(":DONE:{n}:");
    let mut out = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        let l = guest_line(vm, deadline)
            .unwrap_or_else(|| panic!("{cmd}: no {done}; log:\n{}", vm.seen().join("\n")));
        if let Some(at) = l.find(&done) {
            if at > 0 {
                out.push(l[..at].to_string());
            }
            return out;
        }
        out.push(l);
    }
}

/// `key` of /proc/meminfo in kB.
pub fn meminfo_kib(vm: &mut Vmm, key: &str) -> u64 {
    proc_value(vm, "/proc/meminfo", &format!("{key}:"))
}

/// `key` of /proc/vmstat.
pub fn vmstat(vm: &mut Vmm, key: &str) -> u64 {
    proc_value(vm, "/proc/vmstat", &format!("{key} "))
}

/// The number after `prefix` on the line of `file` that starts with it.
/// Machine-check reports are KERN_EMERG, so they reach the console even at
/// [`CONSOLE_LOGLEVEL`], and a continuation fragment (`pr_cont`, printed
/// without a timestamp) can land inside the shell's line; such a line does
/// not parse and the read is repeated (3 tries).
fn proc_value(vm: &mut Vmm, file: &str, prefix: &str) -> u64 {
    let mut outs = Vec::new();
    for _ in 0..3 {
        let out = shell(vm, &format!("grep '^{prefix}' {file}"));
        let v = out.iter().find_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            let mut w = rest.split_whitespace();
            let v = w.next()?.parse().ok()?;
            match (w.next(), w.next()) {
                (None | Some("kB"), None) => Some(v),
                _ => None,
            }
        });
        if let Some(v) = v {
            return v;
        }
        outs.push(out);
    }
    panic!("{file}: no clean {prefix:?} line in 3 reads: {outs:?}")
}

/// The number after `key=` anywhere in `lines` (skipping occurrences not
/// followed by a number, e.g. the echo of `echo key=$?`); a leading `-`
/// is kept.
pub fn number_after(lines: &[String], key: &str) -> Option<i64> {
    lines.iter().find_map(|l| {
        l.match_indices(key).find_map(|(i, _)| {
            let rest = &l[i + key.len()..];
            let neg = rest.starts_with('-');
            let digits = &rest[usize::from(neg)..];
            let end = digits
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(digits.len());
            let v: i64 = digits[..end].parse().ok()?;
            Some(if neg { -v } else { v })
        })
    })
}

/// Touch all but `leave_mib` MiB of the guest's free RAM (MemFree) in a
/// process that then exits: its pages go back to the guest's free lists.
/// `poison-victim -n` maps the pages with MAP_POPULATE, writes and checks a
/// pattern in each and exits 0; unlike a tmpfs file it is not capped at
/// half of RAM. Returns the MiB touched.
pub fn touch_guest_ram(vm: &mut Vmm, leave_mib: u64) -> u64 {
    let mib = (meminfo_kib(vm, "MemFree") >> 10).saturating_sub(leave_mib);
    touch_mib(vm, mib);
    mib
}

/// `poison-victim -n` over `mib` MiB; asserts it exits 0. The limit grows
/// with the size: measured ~0.6 s per MiB with two guests side by side on
/// an emulated-ring-0 host, several times that with builds running beside.
pub fn touch_mib(vm: &mut Vmm, mib: u64) {
    let out = shell_within(
        vm,
        &format!(
            "poison-victim -n -p {} >/dev/null 2>&1; echo \"TOUCH-EXIT=$?\"",
            mib << 8
        ),
        T + Duration::from_secs(3 * mib),
    );
    assert_eq!(
        number_after(&out, "TOUCH-EXIT="),
        Some(0),
        "poison-victim -n -p {}: {out:?}",
        mib << 8
    );
}

/// The kernel's log lines (`dmesg`) that contain any of `patterns`
/// (case-insensitive).
pub fn dmesg_grep(vm: &mut Vmm, patterns: &[&str]) -> Vec<String> {
    let args: Vec<String> = patterns.iter().map(|p| format!("-e '{p}'")).collect();
    shell(vm, &format!("dmesg | grep -i {}", args.join(" ")))
        .into_iter()
        .filter(|l| l.starts_with('['))
        .collect()
}

/// `poweroff` in the guest must end `vmm` with status 0 (i8042 reset).
pub fn poweroff(mut vm: Vmm) {
    vm.send("poweroff\n");
    let (code, log, err) = vm.finish(T);
    assert_eq!(code, 0, "poweroff must end vmm with 0: {err}\n{log}");
    assert!(log.contains("reboot: Restarting system"), "{log}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The console splicing on made-up serial lines (no VM needed).
    #[test]
    fn console_splicing_cuts_kernel_records_out_of_shell_lines() {
        let feed = |raw: &[&str]| -> Vec<String> {
            let mut pending = String::new();
            let out = raw.iter().filter_map(|r| splice(&mut pending, r)).collect();
            assert_eq!(pending, "", "{raw:?}");
            out
        };
        // A record in the middle of the end marker.
        assert_eq!(
            feed(&[":DONE:10[   12.345678] random: crng init done", "00:"]),
            [":DONE:1000:"]
        );
        // Two records back to back inside one shell line.
        assert_eq!(
            feed(&["VICTIM RE[    3.000001] a", "[    3.000002] b", "ADY pid=5"]),
            ["VICTIM READY pid=5"]
        );
        // A record right before the shell line's newline.
        assert_eq!(feed(&["MemFree: 1 kB[ 1.000000] x", ""]), ["MemFree: 1 kB"]);
        // Whole lines stay: kernel records and `dmesg` output start at 0;
        // a `dmesg` line interrupted by a live record is joined again.
        assert_eq!(
            feed(&[
                "[    1.000000] whole record",
                "[    2.000000] Memory fa[    9.000000] live",
                "ilure: 0x1: x",
                "[1]+  Done  poison-victim",
                "vmm-guest# echo [1.5] x",
            ]),
            [
                "[    1.000000] whole record",
                "[    2.000000] Memory failure: 0x1: x",
                "[1]+  Done  poison-victim",
                "vmm-guest# echo [1.5] x",
            ]
        );
        assert_eq!(
            number_after(&["echo \"X=$?\"".into(), "X=135".into()], "X="),
            Some(135)
        );
        assert_eq!(number_after(&["ret=-38 x".into()], "ret="), Some(-38));
    }
}
