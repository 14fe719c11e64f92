//! `vmm ctl`: command-line client of the control API.
//!
//! Wire into the top-level CLI either as
//! `Ctl(CtlArgs)` or as
//! `Ctl { #[arg(long)] api_sock: PathBuf, #[command(subcommand)] cmd: CtlCommand }`,
//! then call [`run`].

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::client::{run_ctl, ClientError};
use super::http::reason;

/// Arguments of `vmm ctl`.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// Path of the API socket given to `vmm run --api-sock`.
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    #[command(subcommand)]
    pub cmd: CtlCommand,
}

/// Requests `vmm ctl` can send. The response body is printed as JSON on stdout;
/// an error response prints its `fault_message` on stderr and exits with status 1.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CtlCommand {
    /// Show the VM state, vCPU count and memory size (GET /vm).
    Info,
    /// Start a VM run with --wait-for-start (PUT /actions {"action_type":"InstanceStart"}).
    Start,
    /// Pause all vCPUs (PATCH /vm {"state":"Paused"}).
    Pause,
    /// Resume paused vCPUs (PATCH /vm {"state":"Resumed"}).
    Resume,
    /// Guest memory: information (default), invariant check, poison.
    Memory {
        #[command(subcommand)]
        cmd: Option<MemoryCommand>,
    },
    /// Send GET to an API path, e.g. `get /vm`.
    Get {
        /// API path, e.g. /vm.
        path: String,
    },
    /// Send PATCH with a JSON body, e.g. `patch /vm '{"state":"Paused"}'`.
    Patch {
        /// API path, e.g. /vm.
        path: String,
        /// JSON request body.
        body: String,
    },
    /// Send PUT with a JSON body.
    Put {
        /// API path.
        path: String,
        /// JSON request body.
        body: String,
    },
    /// Send POST with a JSON body.
    Post {
        /// API path.
        path: String,
        /// JSON request body.
        body: String,
    },
    /// Virtio balloon (Firecracker's balloon endpoints).
    Balloon {
        #[command(subcommand)]
        cmd: BalloonCommand,
    },
}

/// `vmm ctl memory ...`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum MemoryCommand {
    /// Show guest memory information (GET /memory).
    Show,
    /// Compare guestmem, the shadow EPT and the host mappings (GET /memory/check).
    Check,
    /// Grow the frame pool (PATCH /memory {"pool_mib": N}); resumes faults
    /// paused by `--on-oom pause`.
    Pool {
        /// New pool size in MiB (not below today's, at most guest RAM).
        #[arg(long)]
        mib: u64,
    },
    /// Inject a memory failure (POST /memory/poison).
    Poison {
        /// Guest-physical address of the page, decimal or 0x-hex (4 KiB aligned).
        #[arg(long, value_parser = parse_u64)]
        gpa: u64,
        /// hard: memory_failure(), the guest gets a machine check; soft:
        /// soft_offline(), the page moves to a new frame.
        #[arg(long, default_value = "hard", value_parser = ["hard", "soft"])]
        kind: String,
        /// For hard poison: required (reported at the guest's next access)
        /// or optional (reported at once).
        #[arg(long, default_value = "required", value_parser = ["required", "optional"])]
        action: String,
    },
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a number (decimal or 0x-hex): {e}"))
}

impl MemoryCommand {
    /// The generic request this verb sends.
    pub fn lower(&self) -> CtlCommand {
        match self {
            MemoryCommand::Show => CtlCommand::Get {
                path: "/memory".into(),
            },
            MemoryCommand::Check => CtlCommand::Get {
                path: "/memory/check".into(),
            },
            MemoryCommand::Pool { mib } => CtlCommand::Patch {
                path: "/memory".into(),
                body: serde_json::json!({ "pool_mib": mib }).to_string(),
            },
            MemoryCommand::Poison { gpa, kind, action } => CtlCommand::Post {
                path: "/memory/poison".into(),
                body: serde_json::json!({"gpa": gpa, "kind": kind, "action": action}).to_string(),
            },
        }
    }
}

/// `vmm ctl balloon ...`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum BalloonCommand {
    /// Show the configuration (GET /balloon).
    Show,
    /// Set the target in MiB (PATCH /balloon {"amount_mib": N}).
    Set {
        /// Target balloon size in MiB.
        amount_mib: u32,
    },
    /// Show target, actual, guest statistics and counters (GET /balloon/statistics).
    Stats,
    /// Change the statistics polling interval (PATCH /balloon/statistics).
    StatsInterval {
        /// Seconds (non-zero).
        seconds: u16,
    },
    /// Replace the configuration before the guest driver starts (PUT /balloon).
    Configure {
        /// Target balloon size in MiB.
        #[arg(long)]
        amount_mib: u32,
        /// Offer DEFLATE_ON_OOM.
        #[arg(long)]
        deflate_on_oom: bool,
        /// Statistics polling interval in seconds (0 = off).
        #[arg(long, default_value_t = 0)]
        stats_polling_interval_s: u16,
        /// Offer free page reporting.
        #[arg(long)]
        free_page_reporting: bool,
    },
}

impl BalloonCommand {
    /// The generic request this verb sends.
    pub fn lower(&self) -> CtlCommand {
        let path = |p: &str| p.to_string();
        match self {
            BalloonCommand::Show => CtlCommand::Get {
                path: path("/balloon"),
            },
            BalloonCommand::Set { amount_mib } => CtlCommand::Patch {
                path: path("/balloon"),
                body: format!("{{\"amount_mib\":{amount_mib}}}"),
            },
            BalloonCommand::Stats => CtlCommand::Get {
                path: path("/balloon/statistics"),
            },
            BalloonCommand::StatsInterval { seconds } => CtlCommand::Patch {
                path: path("/balloon/statistics"),
                body: format!("{{\"stats_polling_interval_s\":{seconds}}}"),
            },
            BalloonCommand::Configure {
                amount_mib,
                deflate_on_oom,
                stats_polling_interval_s,
                free_page_reporting,
            } => CtlCommand::Put {
                path: path("/balloon"),
                body: serde_json::json!({
                    "amount_mib": amount_mib,
                    "deflate_on_oom": deflate_on_oom,
                    "stats_polling_interval_s": stats_polling_interval_s,
                    "free_page_reporting": free_page_reporting,
                })
                .to_string(),
            },
        }
    }
}

impl CtlCommand {
    /// The HTTP method, path and body this command sends.
    pub fn request(&self) -> (&'static str, &str, Option<&str>) {
        match self {
            CtlCommand::Info => ("GET", "/vm", None),
            CtlCommand::Start => (
                "PUT",
                "/actions",
                Some(r#"{"action_type":"InstanceStart"}"#),
            ),
            CtlCommand::Pause => ("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)),
            CtlCommand::Resume => ("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#)),

            CtlCommand::Get { path } => ("GET", path, None),
            CtlCommand::Patch { path, body } => ("PATCH", path, Some(body)),
            CtlCommand::Put { path, body } => ("PUT", path, Some(body)),
            CtlCommand::Post { path, body } => ("POST", path, Some(body)),
            // Lowered to generic requests by `run_with_output`.
            CtlCommand::Memory { .. } => ("GET", "/memory", None),
            CtlCommand::Balloon { .. } => ("GET", "/balloon", None),
        }
    }
}

/// Runs `cmd` against the API socket `sock`, printing to stdout/stderr.
///
/// Returns the exit status: 0 when the server answered 2xx, 1 when it answered
/// with an error. A request that could not be completed is an `Err`; use
/// [`ClientError::exit_status`] for its exit status.
pub fn run(sock: &Path, cmd: &CtlCommand) -> Result<i32, ClientError> {
    run_with_output(
        sock,
        cmd,
        &mut io::stdout().lock(),
        &mut io::stderr().lock(),
    )
}

/// [`run`] with explicit output streams.
pub fn run_with_output(
    sock: &Path,
    cmd: &CtlCommand,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, ClientError> {
    let lowered;
    let cmd = match cmd {
        CtlCommand::Balloon { cmd } => {
            lowered = cmd.lower();
            &lowered
        }
        CtlCommand::Memory { cmd: Some(cmd) } => {
            lowered = cmd.lower();
            &lowered
        }
        other => other,
    };
    let (method, path, body) = cmd.request();
    let (status, text) = run_ctl(sock, method, path, body)?;
    let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    if (200..300).contains(&status) {
        match (&json, text.is_empty()) {
            (_, true) => {}
            (Some(v), false) => writeln!(out, "{}", pretty(v))?,
            (None, false) => writeln!(out, "{text}")?,
        }
        return Ok(0);
    }
    let message = json
        .as_ref()
        .and_then(|v| v.get("fault_message"))
        .and_then(|m| m.as_str())
        .unwrap_or(&text);
    writeln!(
        err,
        "error: {method} {path}: {status} {}: {message}",
        reason(status)
    )?;
    Ok(1)
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Top {
        #[command(subcommand)]
        cmd: TopCmd,
    }

    #[derive(clap::Subcommand)]
    enum TopCmd {
        Ctl(CtlArgs),
    }

    fn parse(args: &[&str]) -> CtlArgs {
        let TopCmd::Ctl(a) = Top::try_parse_from(args).unwrap().cmd;
        a
    }

    #[test]
    fn parses_verbs() {
        let a = parse(&["vmm", "ctl", "--api-sock", "/s", "get", "/vm"]);
        assert_eq!(a.api_sock, PathBuf::from("/s"));
        assert_eq!(a.cmd.request(), ("GET", "/vm", None));
        let a = parse(&["vmm", "ctl", "--api-sock", "/s", "pause"]);
        assert_eq!(
            a.cmd.request(),
            ("PATCH", "/vm", Some(r#"{"state":"Paused"}"#))
        );
        let a = parse(&["vmm", "ctl", "--api-sock", "/s", "resume"]);
        assert_eq!(a.cmd, CtlCommand::Resume);
        let a = parse(&["vmm", "ctl", "--api-sock", "/s", "info"]);
        assert_eq!(a.cmd, CtlCommand::Info);
        let a = parse(&["vmm", "ctl", "--api-sock", "/s", "patch", "/vm", "{}"]);
        assert_eq!(a.cmd.request(), ("PATCH", "/vm", Some("{}")));
        let a = parse(&["vmm", "ctl", "--api-sock", "/s", "memory"]);
        assert_eq!(a.cmd.request(), ("GET", "/memory", None));
        let a = parse(&[
            "vmm",
            "ctl",
            "--api-sock",
            "/s",
            "memory",
            "poison",
            "--gpa",
            "0x3000",
            "--action",
            "optional",
        ]);
        let CtlCommand::Memory { cmd: Some(m) } = a.cmd else {
            panic!("{:?}", a.cmd)
        };
        let CtlCommand::Post { path, body } = m.lower() else {
            panic!()
        };
        assert_eq!(path, "/memory/poison");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"gpa": 0x3000, "kind": "hard", "action": "optional"})
        );
        let a = parse(&[
            "vmm",
            "ctl",
            "--api-sock",
            "/s",
            "memory",
            "pool",
            "--mib",
            "96",
        ]);
        let CtlCommand::Memory { cmd: Some(m) } = a.cmd else {
            panic!("{:?}", a.cmd)
        };
        assert_eq!(
            m.lower(),
            CtlCommand::Patch {
                path: "/memory".into(),
                body: r#"{"pool_mib":96}"#.into()
            }
        );
        for bad in [
            &["memory", "poison"][..],
            &["memory", "poison", "--gpa", "12k"],
            &["memory", "poison", "--gpa", "0", "--kind", "warm"],
        ] {
            let mut args = vec!["vmm", "ctl", "--api-sock", "/s"];
            args.extend_from_slice(bad);
            assert!(Top::try_parse_from(args).is_err(), "{bad:?}");
        }
        assert!(Top::try_parse_from(["vmm", "ctl", "pause"]).is_err());
        assert!(Top::try_parse_from(["vmm", "ctl", "--api-sock", "/s", "patch", "/vm"]).is_err());
    }
}
