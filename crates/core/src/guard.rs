//! Panics: a panic on any thread ends the process within moments, non-zero, with a log line
//! naming the thread (so a supervisor restarts it instead of it hanging), except inside
//! [`contain`], where a task's code runs on one record and its panic becomes that record's dead
//! letter. Also the shutdown deadline: after a stop signal the run has `shutdown_grace_ms` to
//! drain before the process exits non-zero, acknowledging nothing more.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

thread_local! {
    static CONTAINED: Cell<u32> = const { Cell::new(0) };
}

static HOOK_INSTALLED: AtomicBool = AtomicBool::new(false);

/// The exit status of a process ended by a panic.
pub const PANIC_EXIT: i32 = 101;
/// The exit status of a process whose sinks could not drain within the grace period.
pub const GRACE_EXIT: i32 = 3;

/// Runs `f`, turning a panic inside it into `Err` with the panic's message. Only for code that
/// handles one record (a task's decode, prepare and finish), where a panic is that record's fault.
pub fn contain<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    CONTAINED.with(|c| c.set(c.get() + 1));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(c.get() - 1));
    result.map_err(|p| p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "a panic".to_string()))
}

/// Installs the process-wide panic hook: a panic outside [`contain`] logs the thread's name
/// and the panic, then exits with [`PANIC_EXIT`]. For the binary; tests that run pipelines
/// in-process leave it out.
pub fn install_panic_hook() {
    if HOOK_INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if CONTAINED.with(|c| c.get()) > 0 {
            tracing::debug!("contained panic: {info}");
            return;
        }
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed").to_string();
        default(info);
        tracing::error!(thread = %name, "thread '{name}' panicked: {info}; exiting so that a supervisor restarts the process");
        eprintln!("error: thread '{name}' panicked; sluice exits (status {PANIC_EXIT}) so that a supervisor restarts it");
        std::process::exit(PANIC_EXIT);
    }));
}

static DEADLINE_MS: AtomicU64 = AtomicU64::new(u64::MAX);

/// Starts the shutdown watchdog: once `stop` is set, the run has `grace` to finish; past it the
/// process exits with [`GRACE_EXIT`]. Nothing that is not durable has been acknowledged, so the
/// input is read again on restart.
pub fn start_watchdog(stop: std::sync::Arc<AtomicBool>, grace: Duration) {
    std::thread::Builder::new()
        .name("sluice-watchdog".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let deadline = crate::record::now_ms() + grace.as_millis() as u64;
            DEADLINE_MS.store(deadline, Ordering::Relaxed);
            std::thread::sleep(grace);
            tracing::error!("the run did not drain within runtime.shutdown_grace_ms ({grace:?}); exiting without acknowledging what is not durable");
            eprintln!("error: sinks did not drain within the shutdown grace period ({grace:?}); exiting (status {GRACE_EXIT})");
            std::process::exit(GRACE_EXIT);
        })
        .expect("cannot start the watchdog thread");
}

/// Whether a stop signal came and the grace period is over.
pub fn past_deadline() -> bool {
    crate::record::now_ms() >= DEADLINE_MS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::contain;

    #[test]
    fn a_contained_panic_is_an_error_with_its_message() {
        assert_eq!(contain(|| 7), Ok(7));
        let e = contain(|| -> u32 { panic!("bad record {}", 3) }).unwrap_err();
        assert_eq!(e, "bad record 3");
    }
}
