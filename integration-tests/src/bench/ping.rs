//! Redis's own tail beside a benchmark: a `PING` every millisecond from a
//! thread and socket of its own, so a slow answer is Redis (or the machine)
//! being busy, not the caller's runtime or a queue in its connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How the `PING`s of one window were answered.
#[derive(Debug, Default, Clone, Copy)]
pub struct PingStalls {
    /// Share answered in more than 0.5 ms, in percent.
    pub over_half_ms: f64,
    /// Share answered in more than 1 ms, in percent.
    pub over_1ms: f64,
    /// The slowest answer.
    pub max: Duration,
}

/// `PING`s Redis at `127.0.0.1:port` every millisecond for `window`,
/// blocking the calling thread.
pub fn ping_stalls(port: u16, window: Duration) -> std::io::Result<PingStalls> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let (mut n, mut half, mut one, mut max) = (0usize, 0usize, 0usize, Duration::ZERO);
    let mut reply = [0u8; 7];
    let end = Instant::now() + window;
    while Instant::now() < end {
        let t = Instant::now();
        s.write_all(b"PING\r\n")?;
        s.read_exact(&mut reply)?;
        let took = t.elapsed();
        if &reply != b"+PONG\r\n" {
            return Err(std::io::Error::other(format!("PING answered {reply:?}")));
        }
        n += 1;
        half += usize::from(took > Duration::from_micros(500));
        one += usize::from(took > Duration::from_millis(1));
        max = max.max(took);
        std::thread::sleep(Duration::from_millis(1));
    }
    let pct = |k: usize| 100.0 * k as f64 / n.max(1) as f64;
    Ok(PingStalls {
        over_half_ms: pct(half),
        over_1ms: pct(one),
        max,
    })
}
