//! What the agent's and the controller's test crates share; each uses part of it.
#![allow(dead_code)]

pub mod apiserver;
