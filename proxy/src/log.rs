//! Logging with `tracing`: human-readable or JSON lines, with a filter that the admin
//! port can change at runtime. Access log lines use the `weft::access` target.

use tracing_subscriber::{layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Layer, Registry};

use crate::config::LogConfig;

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
}

impl LogHandle {
    pub fn set(&self, directive: &str) -> Result<(), String> {
        let filter =
            EnvFilter::try_new(directive).map_err(|e| format!("invalid log filter {directive:?}: {e}"))?;
        self.filter.reload(filter).map_err(|e| e.to_string())
    }

    pub fn current(&self) -> String {
        self.filter.with_current(|f| f.to_string()).unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid WEFT_LOG={filter:?}: {reason}; expected e.g. info or weft_proxy=debug")]
    Filter { filter: String, reason: String },
    #[error("cannot set up logging: {0}")]
    Init(#[from] tracing_subscriber::util::TryInitError),
}

pub fn init(cfg: &LogConfig) -> Result<LogHandle, Error> {
    let filter = EnvFilter::try_new(&cfg.filter)
        .map_err(|e| Error::Filter { filter: cfg.filter.clone(), reason: e.to_string() })?;
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = if cfg.json {
        tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(std::io::stderr).boxed()
    } else {
        // Colours only on a terminal: `weft up`, systemd and kubectl logs read a pipe.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr).boxed()
    };
    tracing_subscriber::registry().with(filter).with(fmt).try_init()?;
    Ok(LogHandle { filter: handle })
}
