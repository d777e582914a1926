//! A minimal logger for the library's `log` records: one line each on standard error, at the
//! level `-v` (repeatable) or `VPSTAG_LOG` asks for (warnings only by default). The daemon's own
//! log lines are written by its `log!` macro, not through this.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

struct Stderr;

impl Log for Stderr {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if self.enabled(r.metadata()) {
            let level = r.level().as_str().to_ascii_lowercase();
            let _ = writeln!(std::io::stderr().lock(), "vpstag: {level}: {}", r.args());
        }
    }

    fn flush(&self) {}
}

/// The level: `verbose` counts `-v` (1: info, 2: debug, 3 or more: trace); without any,
/// `VPSTAG_LOG` (`off`, `error`, `warn`, `info`, `debug` or `trace`); else warnings.
pub(crate) fn level(verbose: u8, env: Option<&str>) -> LevelFilter {
    match verbose {
        0 => env.and_then(|v| v.trim().parse().ok()).unwrap_or(LevelFilter::Warn),
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Installs the logger at `level` (once; a second call changes nothing but the level).
pub(crate) fn install(level: LevelFilter) {
    static LOGGER: Stderr = Stderr;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v_wins_over_the_environment_which_wins_over_the_default() {
        assert_eq!(level(0, None), LevelFilter::Warn);
        assert_eq!(level(0, Some("debug")), LevelFilter::Debug);
        assert_eq!(level(0, Some("INFO")), LevelFilter::Info);
        assert_eq!(level(0, Some("nonsense")), LevelFilter::Warn);
        assert_eq!(level(1, Some("warn")), LevelFilter::Info);
        assert_eq!(level(2, None), LevelFilter::Debug);
        assert_eq!(level(5, None), LevelFilter::Trace);
    }
}
