//! The property descriptor: what one invariant is (id, test name, the invariant and its
//! tolerances in words, the adapter kinds, dtypes and capabilities it needs) and what it runs
//! (its [`Body`]). Each property file defines its `PROPERTY` with it; the catalogue lists them.

use candle_core::{DType, Device};

use crate::props::verdict::{PropConfig, Verdict};
use crate::props::Check;
use crate::spec::ArchSpec;
use crate::strategy::{AdapterKind, Draws};
use crate::subject::{Capabilities, Factory, Setup};

/// A forward property of the model, run per family (its checks live in
/// [`crate::props::forward`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelProperty {
    /// Two forwards bitwise equal; train == eval without dropout.
    Deterministic,
    /// Logits at t independent of tokens after t.
    Causal,
    /// Cached decode == full forward; identical greedy generations.
    KvCache,
}

/// A trainer check: one setup, subjects from the factory, on a device.
pub type TrainerCheck = fn(&dyn Factory, &Device, &Setup) -> Check;

/// What a property runs against.
#[derive(Clone, Copy)]
pub enum Body {
    /// Subjects of the factory on the device under test.
    Trainer(TrainerCheck),
    /// Subjects on the CPU and on a CUDA device (the check gets the CUDA device); skipped
    /// without one.
    CrossDevice(TrainerCheck),
    /// tunecheck's own 4-bit quantizer and kernels (no trainer involved).
    Kernels(fn(&PropConfig) -> Verdict),
    /// tunecheck's own model, per family (no trainer involved).
    Forward(ModelProperty),
}

/// One property.
#[derive(Clone, Copy)]
pub struct Property {
    /// Short id (`P1`).
    pub id: &'static str,
    /// Test function name stamped by `conformance!` (`p1_eval_train_equivalence`).
    pub test_name: &'static str,
    /// Short title for the `check` table.
    pub title: &'static str,
    /// The invariant in words.
    pub invariant: &'static str,
    /// Its tolerances per dtype, with why.
    pub tolerance: &'static str,
    /// Adapter kinds it exercises.
    pub kinds: &'static [AdapterKind],
    /// Model dtypes it draws (shrinking toward the first).
    pub dtypes: &'static [DType],
    /// Capabilities it needs whatever the kind (`save_load`, ...).
    pub needs: Capabilities,
    /// Micro-batches per optimizer step in its setups.
    pub grad_accum: usize,
    /// Architectures it cannot judge (a precondition): such draws are redrawn before their
    /// weights are generated, never run.
    pub filter: Option<fn(&ArchSpec) -> bool>,
    /// The parts of the training recipe its setups draw (the rest stay at the simplest).
    pub draws: Draws,
    /// The check.
    pub body: Body,
}

impl Property {
    /// A trainer property over `check` with the common defaults — every adapter kind, every
    /// dtype, no extra capability, one micro-batch per step, models where every trainable
    /// tensor gets a gradient ([`every_tensor_exercised`]), the simplest recipe — for struct
    /// update: `Property { id, test_name, title, invariant, tolerance, ..Property::trainer(check) }`
    /// (the words are left empty here; the catalogue test rejects an entry that keeps them).
    pub const fn trainer(check: TrainerCheck) -> Property {
        Property {
            id: "",
            test_name: "",
            title: "",
            invariant: "",
            tolerance: "",
            kinds: &AdapterKind::ALL,
            dtypes: &ALL_DTYPES,
            needs: Capabilities::none(),
            grad_accum: 1,
            filter: Some(every_tensor_exercised),
            draws: Draws::NONE,
            body: Body::Trainer(check),
        }
    }
}

impl std::fmt::Debug for Property {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Property({})", self.id)
    }
}

/// A model where a batch exercises every tensor LoRA can adapt. A sliding window of 1 makes
/// each query see only itself: the softmax over one key is 1 whatever the scores, so the
/// query and key projections of those layers get a structurally zero gradient, and a setup
/// adapting only them cannot train at all (no descent, no change to save) — a model no
/// trainer property can judge a trainer on.
pub fn every_tensor_exercised(spec: &ArchSpec) -> bool {
    spec.sliding_window.is_none_or(|w| w >= 2)
}

/// Every model dtype, f32 first (what shrinking walks toward).
pub const ALL_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];
/// Half precision only.
pub const HALF_DTYPES: [DType; 2] = [DType::BF16, DType::F16];
