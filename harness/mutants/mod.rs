//! Planted-bug subjects ("mutants"): each reproduces a real-world bug, names the property that
//! must catch it and the clause it must trip (a mutant counts as caught only for that reason,
//! never because something crashed). A property that no mutant fails is not done. Trainer
//! mutants are factory values ([`Mutant`]) that carry their bug through save and load.
//!
//! The catalogue lives here; the bugs themselves by layer: [`forward`] (the model's forward
//! pass), [`trainer`] (trainer mutants as factory values), [`kernels`] (the 4-bit kernels).

pub mod forward;
pub mod kernels;
pub mod trainer;

pub use forward::{forward_mutants, ForwardMutant};
pub use kernels::KernelBug;
pub use trainer::{Mutant, TrainerBug};

/// What a mutant is run as.
#[derive(Debug, Clone, Copy)]
pub enum MutantSubject {
    /// A model with forward faults, under a forward property of one family.
    Forward(ForwardMutant),
    /// A trainer factory ([`Mutant`]s of [`TrainerBug`]) under a catalogue property.
    Trainer(TrainerBug),
    /// The quantizer with swapped nibbles, under P7.
    SwappedNibbles,
    /// A 4-bit kernel bug, under P9.
    Kernel(KernelBug),
}

/// One entry of the mutant catalogue: the bug, the property that must catch it and the
/// clause it must trip (`None`: any violation of that property).
#[derive(Debug, Clone, Copy)]
pub struct MutantInfo {
    /// Short id (`--mutant NAME`).
    pub name: &'static str,
    /// The real-world bug it reproduces.
    pub bug: &'static str,
    /// Catalogue id of the property that must catch it (`P3`, `F1`, ...).
    pub caught_by: &'static str,
    /// The violated clause expected.
    pub code: Option<&'static str>,
    /// How it is run.
    pub subject: MutantSubject,
}

impl MutantInfo {
    /// The trainer bug, when this mutant is a trainer (a driver can serve it).
    pub fn trainer_bug(&self) -> Option<TrainerBug> {
        match self.subject {
            MutantSubject::Trainer(b) => Some(b),
            _ => None,
        }
    }
}

/// Every mutant, in report order: forward, trainer, then 4-bit.
pub fn catalogue() -> Vec<MutantInfo> {
    let mut out: Vec<MutantInfo> = forward_mutants()
        .into_iter()
        .map(|m| MutantInfo {
            name: m.name,
            bug: m.bug,
            caught_by: m.caught_by.id(),
            code: None,
            subject: MutantSubject::Forward(m),
        })
        .collect();
    out.extend(TrainerBug::ALL.iter().map(|&b| MutantInfo {
        name: b.name(),
        bug: b.description(),
        caught_by: b.caught_by(),
        code: b.code(),
        subject: MutantSubject::Trainer(b),
    }));
    out.push(MutantInfo {
        name: "swapped_nibbles",
        bug: "element 2i packed in the low nibble (bitsandbytes puts it high)",
        caught_by: "P7",
        code: Some("bitsandbytes_bytes"),
        subject: MutantSubject::SwappedNibbles,
    });
    out.extend(KernelBug::ALL.iter().map(|&k| MutantInfo {
        name: k.name(),
        bug: k.description(),
        caught_by: "P9",
        code: None,
        subject: MutantSubject::Kernel(k),
    }));
    out
}

/// The mutant named `name`.
pub fn by_name(name: &str) -> Option<MutantInfo> {
    catalogue().into_iter().find(|m| m.name == name)
}
