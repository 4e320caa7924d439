//! The keeper's transport (issue P7): one message per `SOCK_SEQPACKET`
//! datagram over a Unix socket, with descriptors (an agent's pipes or PTY
//! master) passed alongside as `SCM_RIGHTS`. Seqpacket keeps message
//! boundaries, so a message and its descriptors always arrive together,
//! and a peer that dies mid-message leaves nothing half-read. A message or
//! a descriptor list that did not fit is an error, never a silent cut.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};

/// Largest message (its encoded bytes), well under the socket buffer.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most descriptors one message carries (an agent's stdin, stdout, stderr,
/// or its PTY master, and room to spare).
pub const MAX_FDS: usize = 8;

/// A failed send or receive.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The system call failed.
    #[error("{step}: {source}")]
    Sys {
        /// sendmsg, recvmsg or socketpair.
        step: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// The message is larger than [`MAX_MESSAGE`] or has more than
    /// [`MAX_FDS`] descriptors.
    #[error("message of {bytes} bytes with {fds} descriptors is over the limit ({MAX_MESSAGE} bytes, {MAX_FDS} descriptors)")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// Its descriptors.
        fds: usize,
    },
    /// A received message or its descriptors did not fit the buffers (the
    /// kernel cut them; the descriptors that arrived were closed).
    #[error("received message truncated (data {data}, descriptors {fds})")]
    Truncated {
        /// The data was cut.
        data: bool,
        /// The descriptor list was cut.
        fds: bool,
    },
    /// The peer closed the socket.
    #[error("the peer closed the connection")]
    Closed,
}

/// A connected pair of seqpacket sockets, close-on-exec (a test, or a
/// keeper started with one end).
pub fn pair() -> Result<(OwnedFd, OwnedFd), WireError> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|source| WireError::Sys {
        step: "socketpair",
        source,
    })
}

/// Sends `data` and `fds` as one message. The descriptors stay open here;
/// the peer receives duplicates.
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
    if data.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(WireError::TooLarge {
            bytes: data.len(),
            fds: fds.len(),
        });
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|source| WireError::Sys {
        step: "sendmsg",
        source,
    })?;
    Ok(())
}

/// Receives one message and the descriptors that came with it (owned
/// here, close-on-exec).
pub fn recv(sock: BorrowedFd<'_>) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (bytes, flags, raw) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|source| WireError::Sys {
            step: "recvmsg",
            source,
        })?;
        let mut raw = Vec::new();
        // An iterator error means the control data was cut (MSG_CTRUNC),
        // which the flags below report.
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    raw.extend(fds);
                }
            }
        }
        (msg.bytes, msg.flags, raw)
    };
    // SAFETY: each descriptor was just installed in this process by the
    // kernel for this message (SCM_RIGHTS), and nothing else refers to it.
    #[allow(unsafe_code)]
    let fds: Vec<OwnedFd> = raw
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let (data_cut, fds_cut) = (
        flags.contains(MsgFlags::MSG_TRUNC),
        flags.contains(MsgFlags::MSG_CTRUNC),
    );
    if data_cut || fds_cut {
        // The descriptors that did arrive are closed by the drop.
        return Err(WireError::Truncated {
            data: data_cut,
            fds: fds_cut,
        });
    }
    if bytes == 0 && fds.is_empty() {
        return Err(WireError::Closed);
    }
    buf.truncate(bytes);
    Ok((buf, fds))
}

/// A nonblocking seqpacket socket on the tokio reactor: sends wait while
/// the peer's buffer is full, receives wait for a message.
#[derive(Debug)]
pub struct Socket(tokio::io::unix::AsyncFd<OwnedFd>);

/// Whether an error only means "not now".
fn would_block(e: &WireError) -> bool {
    matches!(e, WireError::Sys { source, .. } if *source == nix::errno::Errno::EAGAIN)
}

impl Socket {
    /// Makes `fd` nonblocking and registers it with the reactor.
    pub fn new(fd: OwnedFd) -> std::io::Result<Self> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // Deprecated because a borrowed descriptor could be closed under
        // it; an `OwnedFd` cannot be.
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::new(fd)?;
        Ok(Self(fd))
    }

    /// The descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.get_ref().as_fd()
    }

    /// [`send`], waiting while the socket is full.
    pub async fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
        loop {
            let mut ready = self.0.writable().await.map_err(io_error("poll"))?;
            match send(self.fd(), data, fds) {
                Err(e) if would_block(&e) => ready.clear_ready(),
                other => return other,
            }
        }
    }

    /// [`recv`], waiting for a message.
    pub async fn recv(&self) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
        loop {
            let mut ready = self.0.readable().await.map_err(io_error("poll"))?;
            match recv(self.fd()) {
                Err(e) if would_block(&e) => ready.clear_ready(),
                other => return other,
            }
        }
    }
}

fn io_error(step: &'static str) -> impl Fn(std::io::Error) -> WireError {
    move |e| WireError::Sys {
        step,
        source: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// Encodes and sends one protobuf message.
pub async fn send_msg<M: prost::Message>(
    sock: &Socket,
    msg: &M,
    fds: &[BorrowedFd<'_>],
) -> Result<(), WireError> {
    sock.send(&msg.encode_to_vec(), fds).await
}

/// Receives and decodes one protobuf message.
pub async fn recv_msg<M: prost::Message + Default>(
    sock: &Socket,
) -> Result<(M, Vec<OwnedFd>), WireError> {
    let (data, fds) = sock.recv().await?;
    Ok((decode(&data)?, fds))
}

/// Decodes one received protobuf message.
pub fn decode<M: prost::Message + Default>(data: &[u8]) -> Result<M, WireError> {
    M::decode(data).map_err(|_| WireError::Sys {
        step: "decode",
        source: nix::errno::Errno::EBADMSG,
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn a_message_and_its_descriptors_arrive_together() {
        let (a, b) = pair().expect("pair");
        let (r, w) = nix::unistd::pipe().expect("pipe");
        send(a.as_fd(), b"stdout of agent 1", &[w.as_fd()]).expect("send");
        // The sender's copy closes; the received one keeps the pipe open.
        drop(w);
        let (data, fds) = recv(b.as_fd()).expect("recv");
        assert_eq!(data, b"stdout of agent 1");
        assert_eq!(fds.len(), 1);
        let flags =
            nix::fcntl::fcntl(fds[0].as_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
        assert!(
            flags & libc::FD_CLOEXEC != 0,
            "received descriptors are close-on-exec"
        );
        let mut writer = std::fs::File::from(fds.into_iter().next().expect("one"));
        writer.write_all(b"hello").expect("write through it");
        drop(writer);
        let mut got = String::new();
        std::fs::File::from(r)
            .read_to_string(&mut got)
            .expect("read");
        assert_eq!(got, "hello");
    }

    #[test]
    fn messages_keep_their_boundaries_and_a_closed_peer_is_said() {
        let (a, b) = pair().expect("pair");
        send(a.as_fd(), b"one", &[]).expect("send");
        send(a.as_fd(), b"two", &[]).expect("send");
        assert_eq!(recv(b.as_fd()).expect("first").0, b"one");
        assert_eq!(recv(b.as_fd()).expect("second").0, b"two");
        drop(a);
        assert!(matches!(recv(b.as_fd()), Err(WireError::Closed)));
    }

    #[test]
    fn over_the_limits_is_refused_before_sending() {
        let (a, _b) = pair().expect("pair");
        let big = vec![0u8; MAX_MESSAGE + 1];
        assert!(matches!(
            send(a.as_fd(), &big, &[]),
            Err(WireError::TooLarge { .. })
        ));
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..=MAX_FDS)
            .map(|_| nix::unistd::pipe().expect("pipe"))
            .collect();
        let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
        assert!(matches!(
            send(a.as_fd(), b"x", &fds),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn too_many_descriptors_from_a_peer_are_a_truncation_and_are_closed() {
        let (a, b) = pair().expect("pair");
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..MAX_FDS + 4)
            .map(|_| nix::unistd::pipe().expect("pipe"))
            .collect();
        let raw: Vec<RawFd> = pipes.iter().map(|(r, _)| r.as_raw_fd()).collect();
        sendmsg::<UnixAddr>(
            a.as_raw_fd(),
            &[IoSlice::new(b"x")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("a peer that ignores the limit");
        assert!(matches!(
            recv(b.as_fd()),
            Err(WireError::Truncated { fds: true, .. })
        ));
    }
}
