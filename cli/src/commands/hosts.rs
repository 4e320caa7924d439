//! `agentctl hosts ls|cordon|uncordon|drain`.

use agentplane::proto::v1::{CordonHostRequest, DrainHostRequest, Host, ListHostsRequest};
use agentplane::time::duration_to_proto;

use crate::client::Clients;
use crate::output::{self, Format};
use crate::HostsCommand;

/// Runs a hosts subcommand.
pub async fn run(c: &mut Clients, fmt: Format, command: HostsCommand) -> anyhow::Result<()> {
    match command {
        HostsCommand::Ls => ls(c, fmt).await,
        HostsCommand::Cordon { id } => cordon(c, fmt, id, true).await,
        HostsCommand::Uncordon { id } => cordon(c, fmt, id, false).await,
        HostsCommand::Drain { id, force, timeout } => {
            let mut req = tonic::Request::new(DrainHostRequest {
                id,
                force,
                timeout: Some(duration_to_proto(timeout)),
            });
            req.set_timeout(timeout + std::time::Duration::from_secs(30));
            let mut stream = c.hosts.drain_host(req).await?.into_inner();
            // A bar over the agents the drain started with (a terminal only).
            let mut bar: Option<indicatif::ProgressBar> = None;
            while let Some(p) = stream.message().await? {
                let b = bar.get_or_insert_with(|| {
                    crate::progress::bar(
                        fmt,
                        u64::from(p.remaining + p.moved + p.stopped),
                        "draining",
                    )
                });
                b.set_position(u64::from(p.moved + p.stopped));
                match fmt {
                    Format::Json | Format::Yaml => {
                        output::stream_item(fmt, &output::DrainView::from(&p))?;
                    }
                    Format::Table => b.suspend(|| {
                        println!(
                            "remaining {:>4}  moved {:>4}  stopped {:>4}  {}",
                            p.remaining, p.moved, p.stopped, p.message
                        );
                    }),
                }
                if p.done {
                    b.finish_and_clear();
                    return Ok(());
                }
            }
            anyhow::bail!("the drain stream ended before the host was empty")
        }
    }
}

async fn cordon(c: &mut Clients, fmt: Format, id: String, cordoned: bool) -> anyhow::Result<()> {
    let h = c
        .hosts
        .cordon_host(CordonHostRequest { id, cordoned })
        .await?
        .into_inner();
    print_hosts(fmt, &[h])
}

/// Every live host.
pub async fn list(c: &mut Clients) -> Result<Vec<Host>, tonic::Status> {
    Ok(c.hosts
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts)
}

/// Prints every live host.
async fn ls(c: &mut Clients, fmt: Format) -> anyhow::Result<()> {
    print_hosts(fmt, &list(c).await?)
}

fn print_hosts(fmt: Format, hosts: &[Host]) -> anyhow::Result<()> {
    match fmt {
        Format::Json | Format::Yaml => {
            let views: Vec<output::HostView> = hosts.iter().map(output::HostView::from).collect();
            output::document(fmt, &views)
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = hosts
                .iter()
                .map(|h| {
                    let mut labels: Vec<String> =
                        h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    labels.sort();
                    vec![
                        h.id.clone(),
                        h.address.clone(),
                        format!("{}/{}", h.running, h.capacity),
                        output::host_status(h).into(),
                        if labels.is_empty() {
                            "-".into()
                        } else {
                            labels.join(",")
                        },
                        output::host_cgroups(h),
                        format!("{:.1}ms", h.heartbeat_micros as f64 / 1000.0),
                        output::age(h.started_at.as_ref()),
                        h.version.clone(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "HOST", "ADDRESS", "AGENTS", "STATUS", "LABELS", "CGROUPS", "BEAT", "AGE",
                    "VERSION",
                ],
                &rows,
            );
            Ok(())
        }
    }
}
