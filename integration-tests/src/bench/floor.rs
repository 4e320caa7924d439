//! The follower's floor: the stages a followed byte must pass through by
//! design, with nothing of agentplane's in them. `yes`'s pipe is spliced
//! into a file (the capture: a byte leaves the pipe only as it enters the
//! file), the file is read back as it grows and written to a local TCP
//! socket (the host agent), that socket is relayed into a second one (the
//! control plane), and the second is read (the client). Each stage is a
//! plain thread moving 128 KiB at a time, with no framing, no runtime and
//! no flow control but the kernel's. What the real follower reaches against
//! this, on the same machine in the same run, is what its software costs;
//! what this reaches against a plain pipe is what the design costs.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::pipe::{splice, SpliceFlags};

/// Bytes each stage moves at once.
const STEP: usize = 128 * 1024;
/// The file wraps around at this size, as a capped log drops its oldest.
const WRAP: u64 = 64 << 20;

/// Where the captured output ends; wakes the reader.
#[derive(Default)]
struct End {
    at: AtomicU64,
    lock: Mutex<()>,
    grew: Condvar,
    stop: AtomicBool,
}

/// Bytes per second the client stage receives over `d`, with the file in
/// `dir`.
pub fn follow_floor_rate(d: Duration, dir: &Path) -> std::io::Result<f64> {
    let path = dir.join("bench-follow-floor");
    let file = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let mut child = Command::new("yes").stdout(Stdio::piped()).spawn()?;
    let pipe = child.stdout.take().expect("piped");
    let end = Arc::new(End::default());

    let capture = {
        let (end, file) = (end.clone(), file.try_clone()?);
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut at = 0u64;
            loop {
                let mut off = at % WRAP;
                let len = usize::try_from(WRAP - off).unwrap_or(STEP).min(STEP);
                let n = splice(
                    &pipe,
                    None,
                    &file,
                    Some(&mut off),
                    len,
                    SpliceFlags::empty(),
                )?;
                if n == 0 {
                    return Ok(());
                }
                at += n as u64;
                end.at.store(at, Ordering::Release);
                let _held = end.lock.lock().unwrap_or_else(|e| e.into_inner());
                end.grew.notify_one();
            }
        })
    };

    let (to_relay, client, relay) = two_hops()?;
    let reader = {
        let end = end.clone();
        let mut to_relay = to_relay;
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut buf = vec![0u8; STEP];
            let mut at = 0u64;
            while !end.stop.load(Ordering::Relaxed) {
                let upto = end.at.load(Ordering::Acquire);
                if upto == at {
                    let held = end.lock.lock().unwrap_or_else(|e| e.into_inner());
                    if end.at.load(Ordering::Acquire) == at {
                        let _ = end.grew.wait_timeout(held, Duration::from_millis(50));
                    }
                    continue;
                }
                let want = usize::try_from((upto - at).min(WRAP - at % WRAP))
                    .unwrap_or(STEP)
                    .min(STEP);
                let n = file.read_at(&mut buf[..want], at % WRAP)?;
                to_relay.write_all(&buf[..n])?;
                at += n as u64;
            }
            Ok(())
        })
    };
    let rate = client_rate(client, d)?;

    // Unwinds every stage: the client's socket closes under the relay, the
    // relay's under the reader, and the capture sees `yes` end.
    end.stop.store(true, Ordering::Relaxed);
    child.kill()?;
    child.wait()?;
    let _ = relay.join();
    let _ = reader.join();
    let _ = capture.join();
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// Bytes per second the client stage receives over `d` when `yes`'s pipe
/// is read and written straight to the first socket: the two TCP hops
/// without the capture. No path through a control plane can skip these,
/// whatever it does with the disk, so what this reaches against a plain
/// pipe bounds any follower on this machine.
pub fn relay_floor_rate(d: Duration) -> std::io::Result<f64> {
    let mut child = Command::new("yes").stdout(Stdio::piped()).spawn()?;
    let mut pipe = child.stdout.take().expect("piped");
    let (mut to_relay, client, relay) = two_hops()?;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; STEP];
        loop {
            let n = pipe.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            to_relay.write_all(&buf[..n])?;
        }
    });
    let rate = client_rate(client, d)?;
    // The client's socket closed under the relay, the relay's under the
    // reader; `yes` ends with its pipe.
    child.kill()?;
    child.wait()?;
    let _ = relay.join();
    let _ = reader.join();
    Ok(rate)
}

/// Two loopback TCP hops: the socket to write into, the socket the client
/// reads from, and the relay thread between them (the control plane).
fn two_hops() -> std::io::Result<(
    TcpStream,
    TcpStream,
    std::thread::JoinHandle<std::io::Result<()>>,
)> {
    let first = TcpListener::bind("127.0.0.1:0")?;
    let second = TcpListener::bind("127.0.0.1:0")?;
    let to_relay = TcpStream::connect(first.local_addr()?)?;
    let (mut relay_in, _) = first.accept()?;
    let mut relay_out = TcpStream::connect(second.local_addr()?)?;
    let (client, _) = second.accept()?;
    for s in [&to_relay, &relay_in, &relay_out, &client] {
        s.set_nodelay(true)?;
    }
    let relay = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; STEP];
        loop {
            let n = relay_in.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            relay_out.write_all(&buf[..n])?;
        }
    });
    Ok((to_relay, client, relay))
}

/// Bytes per second read from `client` over `d`; the socket is closed on
/// return, which unwinds the stages behind it.
fn client_rate(mut client: TcpStream, d: Duration) -> std::io::Result<f64> {
    let mut buf = vec![0u8; STEP];
    let t = Instant::now();
    let mut bytes = 0u64;
    while t.elapsed() < d {
        bytes += client.read(&mut buf)? as u64;
    }
    Ok(bytes as f64 / t.elapsed().as_secs_f64())
}
