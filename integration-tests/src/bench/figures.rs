//! Reading figures: percentiles of sorted latencies, a field of Redis's
//! `INFO`, and the reconcile pass histogram of a control plane's metrics.

use std::time::Duration;

/// The `p` quantile (0..=1) of `sorted` (zero when it is empty).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// `field` of `INFO section` as a number (0 when it is missing).
pub async fn info_field(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
    field: &str,
) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The reconcile pass histogram's buckets in a `/metrics` text: (upper
/// bound, count), in order.
pub fn pass_buckets(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("agentplane_reconcile_pass_duration_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, n) = l.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, n.trim().parse().ok()?))
        })
        .collect()
}

/// A row of a benchmark's table: its name and how to read its figure.
pub type Row<F> = (&'static str, fn(&F) -> f64);

/// Prints `rows` as a table: a column per size (headed by `label`), and
/// the ratio of the last size's figure to the first's when there are two
/// or more.
pub fn print_table<F>(sizes: &[F], label: impl Fn(&F) -> String, rows: &[Row<F>]) {
    print!("{:<34}", "");
    for f in sizes {
        print!("{:>14}", label(f));
    }
    println!("{:>10}", "ratio");
    for (name, get) in rows {
        print!("{name:<34}");
        for f in sizes {
            print!("{:>14.3}", get(f));
        }
        match (sizes.first(), sizes.last()) {
            (Some(a), Some(b)) if sizes.len() > 1 => println!("{:>10.3}", get(b) / get(a)),
            _ => println!(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }

    #[test]
    fn buckets_are_read_in_order_with_inf_last() {
        let text = "agentplane_reconcile_pass_duration_seconds_bucket{le=\"0.5\"} 3\n\
                    agentplane_reconcile_pass_duration_seconds_bucket{le=\"+Inf\"} 4\n";
        assert_eq!(pass_buckets(text), vec![(0.5, 3.0), (f64::INFINITY, 4.0)]);
    }
}
