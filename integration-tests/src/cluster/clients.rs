//! How tests reach a [`TestCluster`]: endpoints, gRPC clients (with the
//! cluster's CA and admin token when it runs TLS) and `agentctl`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use agentplane::proto::v1::agent_service_client::AgentServiceClient;
use agentplane::proto::v1::host_agent_client::HostAgentClient;
use agentplane::proto::v1::host_service_client::HostServiceClient;
use tonic::transport::Channel;

use super::{bin, TestCluster};
use crate::pki::{Authed, Token};

impl TestCluster {
    /// `http://ADDR` (or `https://` with TLS) of control plane `i`.
    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.control_planes[i].addr)
    }

    /// Control plane `i` as an endpoint (TLS when the cluster has it).
    fn endpoint_of(&self, i: usize) -> tonic::transport::Endpoint {
        let mut e = tonic::transport::Endpoint::from_shared(self.endpoint(i))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            // As agentctl's.
            .max_frame_size(agentplane::CLIENT_MAX_FRAME_SIZE);
        if let Some(p) = &self.pki {
            e = e
                .tls_config(p.client_tls(agentplane::server::tls::CONTROL_PLANE_NAME, None))
                .expect("client TLS");
        }
        e
    }

    /// A lazy channel to control plane `i`.
    fn channel_of(&self, i: usize) -> Channel {
        self.endpoint_of(i).connect_lazy()
    }

    /// A connection to control plane `i`, made now (TLS handshake and
    /// HTTP/2 set-up done) and carrying no request and no token yet.
    pub async fn connect(&self, i: usize) -> Result<Channel, tonic::transport::Error> {
        self.endpoint_of(i).connect().await
    }

    async fn channel(&self) -> Channel {
        self.channel_of(0)
    }

    /// The token the cluster's own clients send: with TLS, the admin's.
    fn token(&self) -> Token {
        if self.pki.is_some() {
            Token::bearer(crate::pki::TOKENS[0].0)
        } else {
            Token::default()
        }
    }

    /// An AgentService client of control plane 0.
    pub async fn client(&self) -> AgentServiceClient<Authed> {
        AgentServiceClient::with_interceptor(self.channel().await, self.token())
    }

    /// An AgentService client of control plane `i`.
    pub fn client_of(&self, i: usize) -> AgentServiceClient<Authed> {
        AgentServiceClient::with_interceptor(self.channel_of(i), self.token())
    }

    /// The control planes' `--token-file`, with TLS.
    pub fn token_file(&self) -> Option<PathBuf> {
        self.pki
            .as_ref()
            .map(|_| self.dir.path().join("tokens.toml"))
    }

    /// An AgentService client of control plane 0 that sends `token`
    /// (`None`: no token at all).
    pub fn client_with_token(&self, token: Option<&str>) -> AgentServiceClient<Authed> {
        AgentServiceClient::with_interceptor(
            self.channel_of(0),
            token.map(Token::bearer).unwrap_or_default(),
        )
    }

    /// A HostService client of control plane 0.
    pub async fn host_client(&self) -> HostServiceClient<Authed> {
        HostServiceClient::with_interceptor(self.channel().await, self.token())
    }

    /// A client of host agent number `i` itself (the control plane's view of
    /// it, not the CLI's), on a connection of its own.
    /// With TLS it presents the control plane's certificate.
    pub fn host_agent(&self, i: usize) -> HostAgentClient<Channel> {
        let h = &self.hosts[i];
        let channel = match &self.pki {
            None => tonic::transport::Endpoint::from_shared(format!("http://{}", h.addr))
                .expect("endpoint"),
            Some(p) => tonic::transport::Endpoint::from_shared(format!("https://{}", h.addr))
                .expect("endpoint")
                .tls_config(p.client_tls(
                    &agentplane::server::tls::host_name(&h.host_id),
                    Some(&p.control_plane),
                ))
                .expect("client TLS"),
        }
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
        HostAgentClient::new(channel)
    }

    /// A `Command` for `agentctl` against every control plane (`--endpoint a,b`).
    pub fn agentctl_all(&self, args: &[&str]) -> Command {
        let endpoints: Vec<String> = (0..self.control_planes.len())
            .map(|i| self.endpoint(i))
            .collect();
        let mut cmd = Command::new(bin("agentctl"));
        cmd.arg("--endpoint").arg(endpoints.join(","));
        self.trust(&mut cmd);
        cmd.args(args);
        cmd
    }

    /// With TLS: `AGENTPLANE_CA`, the cluster's CA, for agentctl.
    fn trust(&self, cmd: &mut Command) {
        if let Some(p) = &self.pki {
            cmd.env("AGENTPLANE_CA", &p.pki.ca)
                .env("AGENTPLANE_TOKEN", crate::pki::TOKENS[0].0);
        }
    }

    /// Runs `agentctl` against control plane 0 with `args`.
    pub fn agentctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("agentctl"));
        cmd.args(args)
            .env("AGENTPLANE_ENDPOINT", self.endpoint(0))
            .env_remove("AGENTPLANE_OUTPUT")
            .stdin(Stdio::null());
        self.trust(&mut cmd);
        cmd.output().expect("run agentctl")
    }

    /// Starts `agentctl -o json watch --since 0` (every retained event, so
    /// none is missed however late it connects) against every control plane;
    /// returns the process and a receiver of the events it prints.
    pub fn watch_json(
        &self,
    ) -> (
        std::process::Child,
        std::sync::mpsc::Receiver<serde_json::Value>,
    ) {
        let mut child = self
            .agentctl_all(&["-o", "json", "watch", "--since", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start agentctl watch");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        (child, rx)
    }
}
