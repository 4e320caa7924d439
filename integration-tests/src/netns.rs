//! A small network lab for multi-host tests: one Linux bridge in the test's
//! own namespace and one network namespace per host, each joined to the bridge
//! by a veth pair, on a private /24 that exists only inside this machine. A
//! host's link can be cut and restored. Everything is removed on drop. Needs
//! root (CI runs as root); without it the test fails, saying so.

use std::process::Command;

/// The lab.
#[derive(Debug)]
pub struct NetLab {
    tag: String,
    subnet: u8,
    hosts: usize,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2; scripts/test does): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetLab {
    /// Creates the bridge and `hosts` namespaces.
    pub fn new(hosts: usize) -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the network-namespace tests need root (CI runs as root): run scripts/test as root"
        );
        let pid = std::process::id();
        let lab = Self {
            tag: format!("{:04}", pid % 10_000),
            subnet: u8::try_from(pid % 200).unwrap_or(0) + 20,
            hosts,
        };
        let br = lab.bridge();
        ip(&["link", "add", &br, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}/24", lab.gateway()), "dev", &br]);
        ip(&["link", "set", &br, "up"]);
        for i in 0..hosts {
            let ns = lab.namespace(i);
            let (outer, inner) = (lab.outer(i), lab.inner(i));
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "master", &br]);
            ip(&["link", "set", &outer, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lab.host_ip(i)),
                "dev",
                &inner,
            ]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    fn bridge(&self) -> String {
        format!("apbr{}", self.tag)
    }

    fn outer(&self, i: usize) -> String {
        format!("apo{}{i}", self.tag)
    }

    fn inner(&self, i: usize) -> String {
        format!("api{}{i}", self.tag)
    }

    /// The namespace of host `i`.
    pub fn namespace(&self, i: usize) -> String {
        format!("ap{}h{i}", self.tag)
    }

    /// The bridge's address: where Redis and the control planes listen.
    pub fn gateway(&self) -> String {
        format!("10.231.{}.1", self.subnet)
    }

    /// Host `i`'s address inside its namespace.
    pub fn host_ip(&self, i: usize) -> String {
        format!("10.231.{}.{}", self.subnet, 11 + i)
    }

    /// Cuts host `i` off the network.
    pub fn cut(&self, i: usize) {
        ip(&["link", "set", &self.outer(i), "down"]);
    }

    /// Reconnects host `i`.
    pub fn restore(&self, i: usize) {
        ip(&["link", "set", &self.outer(i), "up"]);
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for i in 0..self.hosts {
            // Deleting the namespace deletes its veth end, and so the pair.
            let _ = Command::new("ip")
                .args(["netns", "del", &self.namespace(i)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.outer(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
    }
}
