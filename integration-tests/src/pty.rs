//! Running a program on an 80×24 pseudo-terminal (stdin, stdout and stderr),
//! as a user at a terminal or over SSH runs it: what `agentctl top` and the
//! spinners need to be seen at all.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};

/// A program running on a terminal; killed and reaped when dropped, however
/// the test ends.
#[derive(Debug)]
pub struct OnTerminal {
    /// The process.
    pub child: Child,
    /// The terminal's other side: what the program draws is read here, keys
    /// are written here. Reads end (EIO) once the program and every copy of
    /// its side are gone.
    pub master: File,
}

impl Drop for OnTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` on a new 80×24 terminal (`TERM=xterm`).
pub fn spawn(mut cmd: Command) -> OnTerminal {
    let size = nix::pty::Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
    let side = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup"));
    let child = cmd
        .env("TERM", "xterm")
        .stdin(side(&pty.slave))
        .stdout(side(&pty.slave))
        .stderr(side(&pty.slave))
        .spawn()
        .expect("start on a terminal");
    // The command keeps its copies of the terminal until dropped: reads see
    // the end only once every copy is closed.
    drop(cmd);
    drop(pty.slave);
    OnTerminal {
        child,
        master: File::from(pty.master),
    }
}
