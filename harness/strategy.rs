//! proptest strategies for specs and batches. Every range starts at its smallest legal value
//! so that shrinking walks toward the smallest model: one layer, one kv head, tiny vocab.

use proptest::prelude::*;

use crate::spec::{default_layer_types, ArchSpec, Family, Rope, RopeScaling};

prop_compose! {
    /// Sizes shared by all families: (vocab, hidden, intermediate, layers, kv heads, heads per kv, head_dim).
    fn arb_sizes(max_layers: usize)(
        vocab in 8usize..=64,
        hidden in 4usize..=32,
        intermediate in 4usize..=48,
        layers in 1usize..=max_layers,
        kv in 1usize..=2,
        rep in 1usize..=3,
        half_hd in 1usize..=4,
    ) -> (usize, usize, usize, usize, usize, usize, usize) {
        (vocab, hidden, intermediate, layers, kv, kv * rep, 2 * half_hd)
    }
}

fn base(family: Family, s: (usize, usize, usize, usize, usize, usize, usize)) -> ArchSpec {
    let (vocab, hidden, intermediate, layers, kv, heads, hd) = s;
    let mut spec = ArchSpec::tiny(family);
    spec.vocab_size = vocab;
    spec.hidden_size = hidden;
    spec.intermediate_size = intermediate;
    spec.num_layers = layers;
    spec.num_kv_heads = kv;
    spec.num_heads = heads;
    spec.head_dim = hd;
    spec.layer_types = default_layer_types(family, layers, 6);
    if family != Family::Gemma {
        // transformers 5 requires heads to divide hidden for every family but Gemma 1.
        spec.hidden_size = spec.hidden_size.div_ceil(heads) * heads;
    }
    spec
}

prop_compose! {
    /// Llama: GQA, tied or untied, plain or Llama-3-scaled rope.
    pub fn arb_llama()(
        s in arb_sizes(3),
        untied in any::<bool>(),
        theta in prop_oneof![Just(10_000.0), Just(500_000.0)],
        llama3 in any::<bool>(),
    ) -> ArchSpec {
        let mut spec = base(Family::Llama, s);
        spec.tie_word_embeddings = !untied;
        let scaling = if llama3 {
            RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 16 }
        } else {
            RopeScaling::None
        };
        spec.rope = Rope { theta, scaling };
        spec.rope_local = spec.rope;
        spec
    }
}

prop_compose! {
    /// Gemma 1.
    pub fn arb_gemma()(s in arb_sizes(3)) -> ArchSpec {
        base(Family::Gemma, s)
    }
}

prop_compose! {
    /// Gemma 2: soft-caps on or off, windows shorter than typical batches.
    pub fn arb_gemma2()(
        s in arb_sizes(3),
        window in 1usize..=8,
        attn_cap in proptest::option::of(prop_oneof![Just(50.0), Just(2.0)]),
        final_cap in proptest::option::of(prop_oneof![Just(30.0), Just(3.0)]),
        qpas in 1usize..=4,
    ) -> ArchSpec {
        let mut spec = base(Family::Gemma2, s);
        spec.sliding_window = Some(window);
        spec.attn_logit_softcapping = attn_cap;
        spec.final_logit_softcapping = final_cap;
        spec.query_pre_attn_scalar = Some((qpas * spec.head_dim) as f64);
        spec
    }
}

prop_compose! {
    /// Gemma 3 (text): up to 7 layers so a global layer (the 6th) can appear; linear rope
    /// scaling on global layers optional.
    pub fn arb_gemma3()(
        s in arb_sizes(7),
        window in 1usize..=8,
        linear in proptest::option::of(Just(8.0)),
    ) -> ArchSpec {
        let mut spec = base(Family::Gemma3, s);
        spec.sliding_window = Some(window);
        spec.query_pre_attn_scalar = Some(spec.head_dim as f64);
        spec.rope = Rope { theta: 1_000_000.0, scaling: linear.map_or(RopeScaling::None, |factor| RopeScaling::Linear { factor }) };
        spec.rope_local = Rope::plain(10_000.0);
        spec
    }
}

/// Any family.
pub fn arb_spec() -> impl Strategy<Value = ArchSpec> {
    prop_oneof![arb_llama(), arb_gemma(), arb_gemma2(), arb_gemma3()]
}

/// The strategy for one named family.
pub fn arb_family(f: Family) -> BoxedStrategy<ArchSpec> {
    match f {
        Family::Llama => arb_llama().boxed(),
        Family::Gemma => arb_gemma().boxed(),
        Family::Gemma2 => arb_gemma2().boxed(),
        Family::Gemma3 => arb_gemma3().boxed(),
    }
}

/// A batch of token ids `[batch][seq]` valid for `vocab`, rows of equal length.
pub fn arb_batch(vocab: usize, max_batch: usize, max_seq: usize) -> impl Strategy<Value = Vec<Vec<u32>>> {
    (1..=max_batch, 1..=max_seq)
        .prop_flat_map(move |(b, s)| proptest::collection::vec(proptest::collection::vec(0..vocab as u32, s), b))
}

/// A spec with a batch for it and a weight seed.
pub fn arb_case() -> impl Strategy<Value = (ArchSpec, Vec<Vec<u32>>, u64)> {
    arb_spec().prop_flat_map(|spec| {
        let v = spec.vocab_size;
        (Just(spec), arb_batch(v, 3, 12), any::<u64>())
    })
}

/// Which adapter a trainer property exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    /// LoRA on a subset of the projections over an f32 base.
    Lora,
    /// LoRA over an NF4 base (f32 compute).
    QLora,
    /// LoRA plus `embed_tokens` (and an untied `lm_head`) trained in full.
    FullEmbeddings,
}

impl AdapterKind {
    /// All kinds.
    pub const ALL: [AdapterKind; 3] = [AdapterKind::Lora, AdapterKind::QLora, AdapterKind::FullEmbeddings];

    /// The kind with short name `name` ([`AdapterKind::name`]).
    pub fn from_name(name: &str) -> Option<AdapterKind> {
        AdapterKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            AdapterKind::Lora => "lora",
            AdapterKind::QLora => "qlora_nf4",
            AdapterKind::FullEmbeddings => "full_embeddings",
        }
    }
}

/// Which parts of the training recipe a property's setups draw; the others keep
/// [`Recipe::SIMPLEST`]'s values. Real configurations differ in exactly these, and a trainer
/// bug often hides in one of them (a weight decay that is dropped, a clipping norm applied
/// twice, a schedule that restarts), so a property draws every part its invariant does not
/// fix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draws {
    /// The peak learning rate.
    pub lr: bool,
    /// Weight decay (with transformers' parameter groups), betas, epsilon.
    pub optimizer: bool,
    /// Warmup steps (0, 1 or 2), the cosine's floor and horizon.
    pub schedule: bool,
    /// Gradient clipping off or on at several norms.
    pub clipping: bool,
    /// LoRA dropout probabilities to draw from (first: what shrinking goes toward).
    pub dropout: &'static [f64],
}

impl Draws {
    /// Nothing drawn: every setup trains with [`Recipe::SIMPLEST`].
    pub const NONE: Draws = Draws { lr: false, optimizer: false, schedule: false, clipping: false, dropout: &[0.0] };
    /// Learning rate, optimizer and clipping (a property that fixes its own schedule).
    pub const OPTIMIZER: Draws = Draws { lr: true, optimizer: true, clipping: true, ..Draws::NONE };
    /// Learning rate, optimizer, schedule and clipping.
    pub const TRAINING: Draws = Draws { schedule: true, ..Draws::OPTIMIZER };

    /// The knobs drawn, in words (for the README's table).
    pub fn words(&self) -> String {
        let mut w = Vec::new();
        if self.lr {
            w.push("lr");
        }
        if self.optimizer {
            w.push("weight decay, betas, eps");
        }
        if self.schedule {
            w.push("warmup, cosine floor");
        }
        if self.clipping {
            w.push("clipping");
        }
        let dropout = match self.dropout {
            [0.0] => None,
            d => Some(format!("dropout {}", d.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("/"))),
        };
        let mut s = w.join(", ");
        if let Some(d) = dropout {
            if !s.is_empty() {
                s.push_str(", ");
            }
            s.push_str(&d);
        }
        if s.is_empty() {
            "—".into()
        } else {
            s
        }
    }
}

/// One drawn training recipe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recipe {
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam's betas.
    pub betas: (f64, f64),
    /// Adam's epsilon.
    pub eps: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// The cosine's floor as a fraction of the peak.
    pub min_ratio: f64,
    /// The cosine's horizon in optimizer steps.
    pub total_steps: usize,
    /// Gradient clipping norm.
    pub max_grad_norm: Option<f64>,
    /// LoRA dropout.
    pub dropout: f64,
}

impl Recipe {
    /// The recipe shrinking goes toward: AdamW at lr 1e-2 with torch's betas and epsilon, no
    /// weight decay, no warmup, cosine to 0 over 200 steps, no clipping, no dropout.
    pub const SIMPLEST: Recipe = Recipe {
        lr: 1e-2,
        weight_decay: 0.0,
        betas: (0.9, 0.999),
        eps: 1e-8,
        warmup: 0,
        min_ratio: 0.0,
        total_steps: 200,
        max_grad_norm: None,
        dropout: 0.0,
    };

    /// Apply to a training and an adapter configuration.
    pub fn apply(&self, train: &mut crate::train::TrainConfig, lora: &mut crate::adapt::LoraConfig) {
        train.optim.lr = self.lr;
        train.optim.weight_decay = self.weight_decay;
        (train.optim.beta1, train.optim.beta2) = self.betas;
        train.optim.eps = self.eps;
        train.schedule.warmup_steps = self.warmup;
        train.schedule.min_ratio = self.min_ratio;
        train.schedule.total_steps = self.total_steps;
        train.max_grad_norm = self.max_grad_norm;
        lora.dropout = self.dropout;
    }
}

/// Training recipes per `draws`, each part shrinking toward [`Recipe::SIMPLEST`].
pub fn arb_recipe(draws: Draws) -> impl Strategy<Value = Recipe> {
    fn pick<T: Clone + std::fmt::Debug + 'static>(on: bool, choices: Vec<T>) -> BoxedStrategy<T> {
        if on {
            proptest::sample::select(choices).boxed()
        } else {
            Just(choices[0].clone()).boxed()
        }
    }
    let s = Recipe::SIMPLEST;
    (
        pick(draws.lr, vec![s.lr, 3e-3, 3e-2]),
        pick(draws.optimizer, vec![s.weight_decay, 0.01, 0.1]),
        pick(draws.optimizer, vec![s.betas, (0.9, 0.95), (0.8, 0.99)]),
        pick(draws.optimizer, vec![s.eps, 1e-6]),
        pick(draws.schedule, vec![s.warmup, 1, 2]),
        pick(draws.schedule, vec![s.min_ratio, 0.1]),
        pick(draws.schedule, vec![s.total_steps, 8, 12]),
        pick(draws.clipping, vec![s.max_grad_norm, Some(1.0), Some(0.1), Some(10.0)]),
        pick(draws.dropout.len() > 1, draws.dropout.to_vec()),
    )
        .prop_map(|(lr, weight_decay, betas, eps, warmup, min_ratio, total_steps, max_grad_norm, dropout)| {
            Recipe { lr, weight_decay, betas, eps, warmup, min_ratio, total_steps, max_grad_norm, dropout }
        })
}

/// A trainer setup: a spec of one of `families` in one of `dtypes` (each shrinking toward the
/// first), seeded weights,
/// an adapter of `kind` with non-zero B (so that comparisons see it), for QLoRA a 4-bit config
/// with any compute dtype (f32, bf16, f16; the original dtype is the model's), a training
/// recipe per `draws`, and `grad_accum` micro-batches per step. Architectures failing
/// any of `preconditions` are redrawn before any weights are generated (a rejected draw costs
/// no weight generation).
pub fn arb_setup(
    kind: AdapterKind,
    grad_accum: usize,
    dtypes: Vec<candle_core::DType>,
    families: Vec<Family>,
    preconditions: Vec<fn(&ArchSpec) -> bool>,
    draws: Draws,
) -> impl Strategy<Value = crate::subject::Setup> {
    use crate::adapt::lora::{LoraInit, PROJECTIONS};
    use crate::adapt::{LoraConfig, QuantConfig};
    use candle_core::DType;
    assert!(!dtypes.is_empty(), "arb_setup needs at least one dtype");
    assert!(!families.is_empty(), "arb_setup needs at least one family");
    assert!(!draws.dropout.is_empty(), "a property draws from at least one dropout probability");
    (
        proptest::sample::select(families).prop_flat_map(arb_family),
        proptest::sample::select(dtypes),
        0u64..1000,
        1usize..=4,
        prop_oneof![Just(1.0), Just(2.0), Just(8.0)],
        any::<bool>(),
        proptest::sample::subsequence(PROJECTIONS.to_vec(), 1..=PROJECTIONS.len()),
        (
            prop_oneof![Just(32usize), Just(64)],
            any::<bool>(),
            prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
        ),
        arb_recipe(draws),
    )
        .prop_filter("the property's precondition", move |t| preconditions.iter().all(|f| f(&t.0)))
        .prop_map(move |(mut spec, dtype, seed, r, alpha, rslora, targets, (blocksize, dq, compute), recipe)| {
            spec.dtype = dtype;
            let weights = crate::weights::generate(&spec, seed, &candle_core::Device::Cpu).expect("valid spec");
            let mut modules_to_save = Vec::new();
            if kind == AdapterKind::FullEmbeddings {
                modules_to_save.push("embed_tokens".to_string());
                if !spec.tie_word_embeddings {
                    modules_to_save.push("lm_head".to_string());
                }
            }
            let mut lora = LoraConfig {
                r,
                alpha,
                use_rslora: rslora,
                target_modules: targets.iter().map(|s| s.to_string()).collect(),
                modules_to_save,
                init: LoraInit::NonZero(0.05),
                ..LoraConfig::default()
            };
            let quant = (kind == AdapterKind::QLora).then(|| QuantConfig {
                blocksize,
                double_quant: dq,
                compute_dtype: compute,
                ..QuantConfig::default()
            });
            let mut train = crate::train::TrainConfig { grad_accum, ..crate::train::TrainConfig::default() };
            recipe.apply(&mut train, &mut lora);
            crate::subject::Setup { spec, weights, lora, quant, train, adapter_seed: seed + 1 }
        })
}

/// `n` micro-batches of `b` random sequences (3..`max_len`+3 tokens, so token counts are
/// uneven, and every row has a position that attends two keys) over `vocab`, right-padded
/// with label −100, from `seed`.
pub fn random_batches(vocab: usize, seed: u64, n: usize, b: usize, max_len: usize) -> Vec<crate::train::Batch> {
    use rand_core::RngCore;
    let mut rng = crate::weights::stream(seed, "random_batches");
    (0..n)
        .map(|_| {
            let seqs: Vec<Vec<u32>> = (0..b)
                .map(|_| {
                    let len = 3 + (rng.next_u32() as usize) % max_len.max(1);
                    (0..len).map(|_| rng.next_u32() % vocab as u32).collect()
                })
                .collect();
            crate::train::Batch::from_sequences(&seqs, 0)
        })
        .collect()
}
