//! Minimal stderr logger: `vmm: LEVEL: message`, level from `--log-level`
//! or the `VMM_LOG` environment variable (error, warn, info, debug, trace).

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            let lvl = match r.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            eprintln!("vmm: {lvl}: {}", r.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Install the logger at `level` (or VMM_LOG, or warn).
pub fn init(level: Option<&str>) {
    let env = std::env::var("VMM_LOG").ok();
    let filter = level
        .or(env.as_deref())
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Warn);
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(filter);
}
