//! Fault points for crash-safety tests: every filesystem step of a save (create, write, fsync,
//! link, rename, exchange, remove) first calls [`point`]. Two ways to fail there:
//!
//! - `TUNECHECK_KILL_AT=N` in the environment makes the process send itself `SIGKILL` at the
//!   N-th point (1-based), which is what a `kill -9` or a power cut at that instant leaves;
//!   `TUNECHECK_FAULT_TRACE=1` prints each point (`tunecheck fault point N: what path`) to
//!   stderr so a test can count them first.
//! - [`inject_write_failure`] makes a file write on this thread fail halfway (an I/O error that
//!   the save must clean up after), for in-process tests.
//!
//! Neither is set in normal use; both cost one relaxed atomic increment per step.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The environment variable naming the point at which to die.
pub const KILL_AT_ENV: &str = "TUNECHECK_KILL_AT";
/// The environment variable that prints every point.
pub const TRACE_ENV: &str = "TUNECHECK_FAULT_TRACE";

static COUNT: AtomicUsize = AtomicUsize::new(0);

fn kill_at() -> Option<usize> {
    static AT: OnceLock<Option<usize>> = OnceLock::new();
    *AT.get_or_init(|| std::env::var(KILL_AT_ENV).ok().and_then(|v| v.trim().parse().ok()))
}

fn trace() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os(TRACE_ENV).is_some_and(|v| v != "0" && !v.is_empty()))
}

/// A filesystem step of a save is about to happen: `what` to `path`.
pub fn point(what: &str, path: &Path) {
    let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    if trace() {
        eprintln!("tunecheck fault point {n}: {what} {}", path.display());
    }
    if kill_at() == Some(n) {
        // SAFETY: plain syscalls; the process does not return from the second one.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        // Not reached: SIGKILL cannot be caught or ignored.
        std::process::abort();
    }
}

thread_local! {
    static FAIL_AFTER: RefCell<Option<usize>> = const { RefCell::new(None) };
}

/// Testing hook: let `n` more file writes succeed on this thread, then make the next one
/// fail halfway through (half its bytes written). `None` disarms it.
#[doc(hidden)]
pub fn inject_write_failure(n: Option<usize>) {
    FAIL_AFTER.with(|f| *f.borrow_mut() = n);
}

/// Whether this file write is the one to fail (see [`inject_write_failure`]).
pub(crate) fn write_fails() -> bool {
    FAIL_AFTER.with(|f| {
        let mut f = f.borrow_mut();
        match *f {
            Some(0) => {
                *f = None;
                true
            }
            Some(n) => {
                *f = Some(n - 1);
                false
            }
            None => false,
        }
    })
}
