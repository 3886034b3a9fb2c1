//! The tunnel's proxy paths: outbound from local pods, inbound HBONE and plaintext to them.

pub mod admission;
pub mod authorize;
pub mod context;
mod copy;
mod counted_io;
mod error;
pub mod hbone;
pub mod http;
pub mod inbound_plaintext;
pub mod outbound;
pub mod send_budget;

pub use error::ProxyError;

use crate::telemetry::ConnectionRecorder;
use copy::Totals;

/// Closes a connection's record from how its copy ended; `forward` went to the destination.
fn finish(recorder: ConnectionRecorder, result: Result<Totals, ProxyError>) {
    match result {
        Ok(totals) => recorder.close(totals.forward, totals.backward, None, None, None),
        Err(error) => fail(recorder, &error),
    }
}

/// Closes the record of a connection that failed.
fn fail(recorder: ConnectionRecorder, error: &ProxyError) {
    recorder.close(
        0,
        0,
        Some(error.response_flags()),
        Some(error),
        error.policy(),
    );
}
