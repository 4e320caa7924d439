//! A server binary's first step: its configuration parsed and validated
//! before any runtime, listener or connection starts.

/// What a server's configuration says about itself at start-up.
pub trait StartupConfig: clap::Parser {
    /// Checks what clap cannot (cross-flag rules, files); the message names
    /// the flag at fault.
    fn check(&self) -> Result<(), String>;
    /// `--check-config`: stop once the configuration is valid.
    fn check_only(&self) -> bool;
}

/// Parses and validates `C` from the command line and environment. Exits
/// 64 ([`crate::EXIT_USAGE`]) with clap's message or `name: invalid
/// configuration: …` when it is bad, and 0 after `--help`, `--version` or
/// a valid `--check-config`; otherwise returns it.
pub fn config_or_exit<C: StartupConfig>(name: &str) -> C {
    let config = match C::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // Errors go to stderr; help and version to stdout (exit 0).
            let code = if e.use_stderr() { crate::EXIT_USAGE } else { 0 };
            std::process::exit(code);
        }
    };
    if let Err(msg) = config.check() {
        eprintln!("{name}: invalid configuration: {msg}");
        std::process::exit(crate::EXIT_USAGE);
    }
    if config.check_only() {
        println!("{name}: configuration is valid");
        std::process::exit(0);
    }
    config
}
