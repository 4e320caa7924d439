//! A tower layer that admits only peers whose TLS client certificate names
//! one allowed DNS name (the host agent admits only `control-plane.agentplane`).
//! The handshake has already checked the certificate's chain against the
//! client CA; this checks who it is, before any handler runs.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

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

impl<S> tower_layer::Layer<S> for RequirePeerName {
    type Service = PeerCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerCheck {
            inner,
            rule: self.clone(),
        }
    }
}

/// The service [`RequirePeerName`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct PeerCheck<S> {
    inner: S,
    rule: RequirePeerName,
}

impl<S, B> tower_service::Service<http::Request<B>> for PeerCheck<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        match self.rule.refusal(certs.as_deref().map(Vec::as_slice)) {
            None => Either::Right(self.inner.call(req)),
            Some(why) => {
                let peer = req
                    .extensions()
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|i| i.get_ref().remote_addr());
                tracing::warn!(?peer, path = req.uri().path(), reason = %why, "request refused");
                Either::Left(std::future::ready(Ok(
                    Status::permission_denied(why).into_http()
                )))
            }
        }
    }
}
