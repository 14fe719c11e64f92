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
    /// Pause all vCPUs (PATCH /vm {"state":"Paused"}).
    Pause,
    /// Resume paused vCPUs (PATCH /vm {"state":"Resumed"}).
    Resume,
    /// Show guest memory information (GET /memory).
    Memory,
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
            CtlCommand::Pause => ("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)),
            CtlCommand::Resume => ("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#)),
            CtlCommand::Memory => ("GET", "/memory", None),
            CtlCommand::Get { path } => ("GET", path, None),
            CtlCommand::Patch { path, body } => ("PATCH", path, Some(body)),
            CtlCommand::Put { path, body } => ("PUT", path, Some(body)),
            CtlCommand::Post { path, body } => ("POST", path, Some(body)),
            // Lowered to a generic request by `run_with_output`.
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
        assert!(Top::try_parse_from(["vmm", "ctl", "pause"]).is_err());
        assert!(Top::try_parse_from(["vmm", "ctl", "--api-sock", "/s", "patch", "/vm"]).is_err());
    }
}
