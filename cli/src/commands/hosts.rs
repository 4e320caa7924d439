//! `agentctl hosts ls`.

use agentplane::proto::v1::ListHostsRequest;

use crate::client::Clients;
use crate::output::{self, Format};

/// Prints every live host.
pub async fn ls(c: &mut Clients, fmt: Format) -> anyhow::Result<()> {
    let hosts = c
        .hosts
        .list_hosts(ListHostsRequest {})
        .await?
        .into_inner()
        .hosts;
    match fmt {
        Format::Json => {
            let views: Vec<output::HostView> = hosts.iter().map(output::HostView::from).collect();
            output::json(&views)
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
                        if h.cordoned {
                            "cordoned".into()
                        } else {
                            "ready".into()
                        },
                        if labels.is_empty() {
                            "-".into()
                        } else {
                            labels.join(",")
                        },
                        h.version.clone(),
                    ]
                })
                .collect();
            output::table(
                &["HOST", "ADDRESS", "AGENTS", "STATUS", "LABELS", "VERSION"],
                &rows,
            );
            Ok(())
        }
    }
}
