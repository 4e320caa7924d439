//! Child processes that must not outlive the process that started them.

use std::process::Command;

/// Asks the kernel to SIGKILL the child started by `cmd` when the thread that
/// spawns it dies (its process killed with SIGKILL included), so nothing it
/// started is left running. Spawn from a thread that lives as long as the
/// process (the main thread, or a current-thread runtime).
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec; it makes one
    // raw system call (prctl), which is async-signal-safe, allocates nothing
    // and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}
