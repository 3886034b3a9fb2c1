//! Log output (text or JSON) with a filter that the admin endpoint can change at run time.

use std::sync::Arc;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

use crate::config::LogFormat;

/// Changes the log filter of the running process.
pub type SetLogFilter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installs the global subscriber; returns the handle that changes its filter.
pub fn init(filter: &str, format: LogFormat) -> Result<SetLogFilter, String> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| format!("bad log filter {filter:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(Arc::new(move |spec: &str| {
        let filter =
            EnvFilter::try_new(spec).map_err(|e| format!("bad log filter {spec:?}: {e}"))?;
        handle
            .modify(|f: &mut EnvFilter| *f = filter)
            .map_err(|e| e.to_string())
    }))
}
