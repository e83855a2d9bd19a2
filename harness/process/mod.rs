//! Trainers in other processes, in any language, judged through the driver protocol
//! (`harness/drivers/PROTOCOL.md`): [`wire`] holds the protocol's data (handshake, setup
//! directory, batch and tensor files), [`child`] one driver process with deadlines and its
//! stderr, [`subject`] the [`ProcessFactory`]/[`ProcessTrainer`] every property runs against,
//! and [`serve`] the driver side around any [`Factory`](crate::subject::Factory) (what
//! `tunecheck driver` runs).

pub mod child;
pub mod serve;
pub mod subject;
pub mod wire;

pub use subject::{ProcessFactory, ProcessTrainer};
