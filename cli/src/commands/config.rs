//! `agentctl config`: the named contexts of `~/.config/agentplane/config.toml`
//! (see `contexts.rs`), as `kubectl config` manages kubeconfig's.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;

use crate::contexts::{Context, UserConfig};
use crate::output::{self, Format};

/// `agentctl config` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum ConfigCommand {
    /// List the contexts (`*` marks the current one).
    GetContexts,
    /// Print the current context's name.
    CurrentContext,
    /// Make NAME the context a plain agentctl uses.
    UseContext {
        /// The context.
        name: String,
    },
    /// Add or replace context NAME.
    SetContext {
        /// The context.
        name: String,
        /// Control-plane address(es), comma-separated.
        #[arg(long, required = true)]
        endpoint: String,
        /// CA certificate (PEM) of the control plane's certificate.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Client certificate (PEM) to present, with --key.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        /// Private key (PEM) of --cert.
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// File whose first line is the bearer token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Also make it current (remembering which was, for delete-context).
        #[arg(long = "use")]
        make_current: bool,
    },
    /// Remove context NAME; if it was current, the one before it (see
    /// `set-context --use`) is current again.
    DeleteContext {
        /// The context.
        name: String,
        /// Only if its first endpoint is this one (a script removing what it
        /// added, not what replaced it).
        #[arg(long)]
        if_endpoint: Option<String>,
    },
}

/// Runs a config subcommand (no server is called).
pub fn run(command: ConfigCommand, fmt: Format) -> anyhow::Result<ExitCode> {
    let mut cfg = UserConfig::load()?;
    match command {
        ConfigCommand::GetContexts => {
            match fmt {
                Format::Json | Format::Yaml => output::document(fmt, &cfg)?,
                Format::Table => {
                    let current = cfg.current_context.as_deref();
                    let rows: Vec<Vec<String>> = cfg
                        .contexts
                        .iter()
                        .map(|(name, c)| {
                            vec![
                                if Some(name.as_str()) == current {
                                    "*"
                                } else {
                                    ""
                                }
                                .to_owned(),
                                name.clone(),
                                c.endpoints.join(","),
                                if c.token_file.is_some() { "token" } else { "-" }.to_owned(),
                            ]
                        })
                        .collect();
                    output::table(&["CURRENT", "NAME", "ENDPOINTS", "AUTH"], &rows);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::CurrentContext => match cfg.current_context {
            Some(c) => {
                println!("{c}");
                Ok(ExitCode::SUCCESS)
            }
            None => bail!("no current context (agentctl config use-context NAME)"),
        },
        ConfigCommand::UseContext { name } => {
            if !cfg.contexts.contains_key(&name) {
                bail!("no context {name} (agentctl config get-contexts lists them)");
            }
            cfg.current_context = Some(name.clone());
            cfg.save()?;
            eprintln!("switched to context {name}");
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::SetContext {
            name,
            endpoint,
            ca,
            cert,
            key,
            token_file,
            make_current,
        } => {
            let endpoints = crate::contexts::split_endpoints(&endpoint);
            if endpoints.is_empty() {
                bail!("--endpoint: give at least one address");
            }
            // Paths are kept absolute: the file is read from anywhere.
            let abs = |p: Option<PathBuf>| -> anyhow::Result<Option<PathBuf>> {
                p.map(|p| std::path::absolute(&p).map_err(anyhow::Error::from))
                    .transpose()
            };
            let ctx = Context {
                endpoints,
                ca: abs(ca)?,
                cert: abs(cert)?,
                key: abs(key)?,
                token_file: abs(token_file)?,
                previous_context: None,
            };
            cfg.set(&name, ctx, make_current);
            let p = cfg.save()?;
            eprintln!("context {name} set in {}", p.display());
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::DeleteContext { name, if_endpoint } => {
            if cfg.delete(&name, if_endpoint.as_deref()) {
                cfg.save()?;
                eprintln!("deleted context {name}");
            } else if if_endpoint.is_none() {
                bail!("no context {name}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
