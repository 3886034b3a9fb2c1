//! Log output (text or JSON) with a filter that the admin endpoint can change at run time.
//! Lines go to stderr in batches, written by a thread of their own (`log_writer.rs`).

use std::sync::Arc;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

use crate::config::LogFormat;
use crate::log_writer::{FlushGuard, batched_stderr};

/// Changes the log filter of the running process.
pub type SetLogFilter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installs the global subscriber; returns the handle that changes its filter, and the
/// writer's guard: hold it until exit (dropping it flushes what is queued).
pub fn init(filter: &str, format: LogFormat) -> Result<(SetLogFilter, FlushGuard), String> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| format!("bad log filter {filter:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let (writer, guard) = batched_stderr();
    let result = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(writer))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(writer),
            )
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    let set_filter: SetLogFilter = Arc::new(move |spec: &str| {
        let filter =
            EnvFilter::try_new(spec).map_err(|e| format!("bad log filter {spec:?}: {e}"))?;
        handle
            .modify(|f: &mut EnvFilter| *f = filter)
            .map_err(|e| e.to_string())
    });
    Ok((set_filter, guard))
}
