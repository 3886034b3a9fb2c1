//! `weft`, the command for users. `weft observe` shows the mesh's flows (connections, HTTP
//! requests, verdicts) from every node's tunnel, merged in time order: each tunnel applies the
//! filters where the events are made (`GET /flows` on its admin endpoint) and this command
//! merges, orders and prints.

pub mod render;
pub mod source;
