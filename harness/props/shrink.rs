//! Shrinking that tries the simplest value first. A failing setup is usually still failing at
//! the strategy's simplest draw (one layer, hidden 4, vocab 8, f32, seed 0, rank 1): testing
//! that draw first turns a shrink of ~75 checks (each a training run) into one. When the
//! simplest draw passes (or fails another way), shrinking goes on exactly as proptest's
//! does from the original failure, one check later; so the minimal case is never worse.
//!
//! The simplest draw is the same draw as the failing case (a twin tree from the runner's
//! state before that case was drawn), simplified until nothing is simpler without testing:
//! every range to its start, every choice to its first option, every subsequence to one
//! element. It is built only when a case fails.

use std::sync::Arc;

use proptest::strategy::{NewTree, Strategy, ValueTree};
use proptest::test_runner::{Config, TestRng, TestRunner};

/// Bound on the untested simplification steps toward the simplest draw (each range takes at
/// most 64 halvings; a setup has a few dozen values).
const MAX_SIMPLIFY_STEPS: usize = 100_000;

/// `S`, shrinking to its simplest value first (see the module docs).
#[derive(Debug)]
pub struct SimplestFirst<S>(Arc<S>);

impl<S> SimplestFirst<S> {
    /// Wrap `strategy`.
    pub fn new(strategy: S) -> Self {
        SimplestFirst(Arc::new(strategy))
    }
}

impl<S: Strategy> Strategy for SimplestFirst<S> {
    type Tree = SimplestFirstTree<S>;
    type Value = S::Value;

    fn new_tree(&self, runner: &mut TestRunner) -> NewTree<Self> {
        // The runner's configuration and RNG before the draw: enough to draw it again.
        let stage = Stage::Untried(Box::new((runner.config().clone(), runner.rng().clone())));
        let tree = self.0.new_tree(runner)?;
        Ok(SimplestFirstTree { strategy: self.0.clone(), tree, stage })
    }
}

/// Where the shrink stands.
enum Stage<T> {
    /// No simplification asked yet; what redraws the original case.
    Untried(Box<(Config, TestRng)>),
    /// The simplest draw is the current value (under test).
    Simplest(T),
    /// Proptest's own shrinking of the original draw.
    Normal,
}

/// The value tree of [`SimplestFirst`].
pub struct SimplestFirstTree<S: Strategy> {
    strategy: Arc<S>,
    tree: S::Tree,
    stage: Stage<S::Tree>,
}

impl<S: Strategy> std::fmt::Debug for SimplestFirstTree<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stage = match self.stage {
            Stage::Untried(..) => "untried",
            Stage::Simplest(_) => "simplest",
            Stage::Normal => "normal",
        };
        write!(f, "SimplestFirstTree({stage})")
    }
}

impl<S: Strategy> SimplestFirstTree<S> {
    /// The draw made with `config` and `rng` again, simplified as far as it goes (`None` if it
    /// cannot be redrawn).
    fn simplest(&self, config: Config, rng: TestRng) -> Option<S::Tree> {
        let mut twin = TestRunner::new_with_rng(config, rng);
        let mut t = self.strategy.new_tree(&mut twin).ok()?;
        let mut steps = 0;
        while steps < MAX_SIMPLIFY_STEPS && t.simplify() {
            steps += 1;
        }
        Some(t)
    }
}

impl<S: Strategy> ValueTree for SimplestFirstTree<S> {
    type Value = S::Value;

    fn current(&self) -> S::Value {
        match &self.stage {
            Stage::Simplest(t) => t.current(),
            _ => self.tree.current(),
        }
    }

    fn simplify(&mut self) -> bool {
        match std::mem::replace(&mut self.stage, Stage::Normal) {
            Stage::Untried(twin) => match self.simplest(twin.0, twin.1) {
                Some(t) => {
                    self.stage = Stage::Simplest(t);
                    true
                }
                None => self.tree.simplify(),
            },
            // The simplest draw failed: nothing is simpler, and it stays the current value.
            Stage::Simplest(t) => {
                self.stage = Stage::Simplest(t);
                false
            }
            Stage::Normal => self.tree.simplify(),
        }
    }

    fn complicate(&mut self) -> bool {
        match self.stage {
            // The simplest draw passed: shrink the original draw as usual (its first step is
            // the next value to test).
            Stage::Simplest(_) => {
                self.stage = Stage::Normal;
                self.tree.simplify()
            }
            _ => self.tree.complicate(),
        }
    }
}
