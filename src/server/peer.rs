//! The tower layer in front of every handler: it admits only peers whose
//! TLS client certificate names one allowed DNS name (the host agent admits
//! only `control-plane.agentplane`; the handshake already checked the
//! chain), and, with a token table, only calls whose bearer token's role
//! allows the method (the control plane). The caller's [`Principal`] goes
//! into the request's extensions for the handlers' per-agent rules.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::codegen::http;
use tonic::transport::server::TlsConnectInfo;

use super::incoming::ConnInfo;
use tonic::Status;

use super::streams::{Placed, StreamCap};
use crate::auth::{decide, required_role, Access, Principal, TokenTable};

/// Admits requests whose peer certificate carries `name` as a DNS SAN.
#[derive(Debug, Clone)]
pub struct RequirePeerName {
    name: Arc<ServerName<'static>>,
}

impl RequirePeerName {
    /// A layer admitting only `name`; `Err` when `name` is not a DNS name.
    pub fn new(name: &str) -> Result<Self, String> {
        let parsed = ServerName::try_from(name.to_owned())
            .map_err(|e| format!("`{name}` is not a DNS name: {e}"))?;
        Ok(Self {
            name: Arc::new(parsed),
        })
    }

    /// Why a peer with `certs` (leaf first) is refused; `None`: admitted.
    pub fn refusal(&self, certs: Option<&[CertificateDer<'static>]>) -> Option<String> {
        let Some(leaf) = certs.and_then(<[_]>::first) else {
            return Some("this server admits only TLS clients with a certificate".into());
        };
        let cert = match webpki::EndEntityCert::try_from(leaf) {
            Ok(c) => c,
            Err(e) => return Some(format!("the client certificate cannot be read: {e:?}")),
        };
        match cert.verify_is_valid_for_subject_name(&self.name) {
            Ok(()) => None,
            Err(_) => Some(format!(
                "the client certificate does not name {}: only it may call this server",
                self.name.to_str()
            )),
        }
    }
}

/// The tokens in force, swapped whole on reload (SIGHUP).
pub type Tokens = Arc<std::sync::RwLock<Arc<TokenTable>>>;

/// What the gate checks; each part is off when `None`.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    /// The peer certificate's required name.
    pub peer: Option<RequirePeerName>,
    /// The token table (the control plane's `--token-file`).
    pub tokens: Option<Tokens>,
    /// The cap on open requests and streams (`--max-streams`).
    pub streams: Option<StreamCap>,
    /// With tokens on: the separate cap on calls that need none.
    pub public_streams: Option<StreamCap>,
}

impl<S> tower_layer::Layer<S> for Gate {
    type Service = PeerCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerCheck {
            inner,
            gate: self.clone(),
        }
    }
}

/// The service [`Gate`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct PeerCheck<S> {
    inner: S,
    gate: Gate,
}

impl Gate {
    /// The refusal of `req`, if any, and the caller it found.
    fn check<B>(&self, req: &http::Request<B>) -> Result<Option<Principal>, Status> {
        if let Some(rule) = &self.peer {
            let certs = req
                .extensions()
                .get::<TlsConnectInfo<ConnInfo>>()
                .and_then(TlsConnectInfo::peer_certs);
            if let Some(why) = rule.refusal(certs.as_deref().map(Vec::as_slice)) {
                return Err(Status::permission_denied(why));
            }
        }
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        let table = tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let header = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        decide(Some(&table), req.uri().path(), header)
            .map_err(|d| Status::new(d.code(), d.message()))
    }
}

impl<S, B> tower_service::Service<http::Request<B>> for PeerCheck<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<S::Response, S::Error>>, Placed<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let admitted = self.gate.check(&req).and_then(|principal| {
            let cap = match &self.gate.public_streams {
                Some(public) if matches!(required_role(req.uri().path()), Access::Public) => {
                    Some(public)
                }
                _ => self.gate.streams.as_ref(),
            };
            let place = cap.map(StreamCap::admit).transpose()?;
            Ok((principal, place))
        });
        match admitted {
            Ok((principal, place)) => {
                if let Some(p) = principal {
                    // A valid token: this connection's caller is known, so
                    // it is no longer among those evicted first.
                    if let Some(proof) = req
                        .extensions()
                        .get::<TlsConnectInfo<ConnInfo>>()
                        .and_then(|i| i.get_ref().proof.as_ref())
                    {
                        proof.prove();
                    }
                    req.extensions_mut().insert(p);
                }
                Either::Right(Placed::new(self.inner.call(req), place))
            }
            Err(status) => {
                let peer = req
                    .extensions()
                    .get::<TlsConnectInfo<ConnInfo>>()
                    .map(|i| i.get_ref().tcp.remote_addr())
                    .or_else(|| {
                        req.extensions()
                            .get::<ConnInfo>()
                            .map(|i| i.tcp.remote_addr())
                    })
                    .flatten();
                tracing::warn!(?peer, path = req.uri().path(), code = ?status.code(), reason = status.message(), "request refused");
                Either::Left(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
