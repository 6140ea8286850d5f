//! The security handshake on TCP: libp2p's TLS 1.3 (`/tls/1.0.0`),
//! preferring AES-GCM, and Noise (`/noise`) for peers without it.
//!
//! libp2p-tls puts ChaCha20-Poly1305 first among its cipher suites, so two
//! libp2p-tls peers always agree on it; Noise has only ChaCha20-Poly1305.
//! On a CPU with AES instructions AES-GCM costs a fraction of that
//! (measured here: the 1 GiB transfer spent 1.2 s of CPU in ChaCha20 on
//! the two nodes, 0.5 s in AES-GCM). These are libp2p-tls's handshake and
//! certificates ([`libp2p::tls::certificate`]: the self-signed certificate
//! carrying the host key's signature, and its checks) with the suites in
//! the other order; a peer offering only ChaCha20 still gets it.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures::future::{BoxFuture, Either};
use futures::{AsyncRead, AsyncWrite, FutureExt};
use futures_rustls::TlsStream;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::Keypair;
use libp2p::tls::certificate;
use libp2p::{noise, PeerId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs::cipher_suite;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

const TLS: &str = "/tls/1.0.0";
const NOISE: &str = "/noise";
const ALPN: &[u8] = b"libp2p";

/// Why a security handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TLS handshake failed (or the peer's certificate was refused).
    #[error("tls: {0}")]
    Tls(#[from] std::io::Error),
    /// The handshake succeeded but the certificate could not be read back.
    #[error("tls certificate: {0}")]
    Certificate(String),
    /// The Noise handshake failed.
    #[error("noise: {0}")]
    Noise(#[from] noise::Error),
}

/// TLS first, Noise second, in multistream-select's negotiation.
#[derive(Clone)]
pub struct Security {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    noise: noise::Config,
}

impl Security {
    /// Both handshakes for the host key `key`.
    pub fn new(key: &Keypair) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ],
            ..rustls::crypto::aws_lc_rs::default_provider()
        });
        let versions = &[&rustls::version::TLS13];
        // The certificate libp2p-tls makes, for both sides. rustls would
        // refuse it as its own (its libp2p extension is marked critical),
        // so it is handed over ready-made.
        let (cert, private) = certificate::generate(key)?;
        let signer = provider.key_provider.load_private_key(private)?;
        let certified = Arc::new(rustls::sign::SingleCertAndKey::from(
            rustls::sign::CertifiedKey::new(vec![cert], signer),
        ));
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(Arc::new(PeerCert))
            .with_cert_resolver(certified.clone());
        server.alpn_protocols = vec![ALPN.to_vec()];
        // Our order, not the client's: a libp2p-tls client lists ChaCha20 first.
        server.ignore_client_order = true;
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerCert))
            .with_client_cert_resolver(certified);
        client.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            noise: noise::Config::new(key)?,
        })
    }
}

impl UpgradeInfo for Security {
    type Info = &'static str;
    type InfoIter = [&'static str; 2];

    fn protocol_info(&self) -> Self::InfoIter {
        [TLS, NOISE]
    }
}

/// The connection after the handshake: TLS or Noise.
pub type Secured<C> = Either<TlsStream<C>, noise::Output<C>>;

impl<C> InboundConnectionUpgrade<C> for Security
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = Error;
    type Future = BoxFuture<'static, Result<Self::Output, Error>>;

    fn upgrade_inbound(self, socket: C, info: Self::Info) -> Self::Future {
        async move {
            if info == NOISE {
                let (peer, s) = self.noise.upgrade_inbound(socket, info).await?;
                return Ok((peer, Either::Right(s)));
            }
            let s = futures_rustls::TlsAcceptor::from(self.server)
                .accept(socket)
                .await?;
            let peer = peer_of(s.get_ref().1)?;
            Ok((peer, Either::Left(s.into())))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Security
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = Error;
    type Future = BoxFuture<'static, Result<Self::Output, Error>>;

    fn upgrade_outbound(self, socket: C, info: Self::Info) -> Self::Future {
        async move {
            if info == NOISE {
                let (peer, s) = self.noise.upgrade_outbound(socket, info).await?;
                return Ok((peer, Either::Right(s)));
            }
            // The spec: no server name indication (an unspecified address
            // sends none). The peer id comes from the certificate; the
            // swarm checks it against the one dialled.
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
            let s = futures_rustls::TlsConnector::from(self.client)
                .connect(name, socket)
                .await?;
            let peer = peer_of(s.get_ref().1)?;
            Ok((peer, Either::Left(s.into())))
        }
        .boxed()
    }
}

/// The peer id in the one certificate the handshake accepted.
fn peer_of(state: &rustls::CommonState) -> Result<PeerId, Error> {
    match state.peer_certificates() {
        Some([cert]) => certificate::parse(cert)
            .map(|c| c.peer_id())
            .map_err(|e| Error::Certificate(e.to_string())),
        _ => Err(Error::Certificate("not exactly one certificate".into())),
    }
}

/// libp2p's rules for the certificate either side presents: exactly one,
/// self-signed, carrying a valid signature by the host key
/// ([`certificate::parse`] checks the last two and the validity dates),
/// and TLS 1.3 handshake signatures made by its key.
#[derive(Debug)]
struct PeerCert;

impl PeerCert {
    fn check(end: &CertificateDer, intermediates: &[CertificateDer]) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "libp2p's TLS takes exactly one certificate".into(),
            ));
        }
        certificate::parse(end).map_err(|_| bad_certificate())?;
        Ok(())
    }

    fn signature(
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        certificate::parse(cert)
            .map_err(|_| bad_certificate())?
            .verify_signature(dss.scheme, message, dss.signature())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn schemes() -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA512,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA256,
        ]
    }
}

fn bad_certificate() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Only TLS 1.3 is configured: a TLS 1.2 signature is refused.
fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::General("only TLS 1.3 is offered".into()))
}

impl ServerCertVerifier for PeerCert {
    fn verify_server_cert(
        &self,
        end: &CertificateDer,
        intermediates: &[CertificateDer],
        _: &ServerName,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::check(end, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

impl ClientCertVerifier for PeerCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end: &CertificateDer,
        intermediates: &[CertificateDer],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::check(end, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    async fn handshake(
        a: Security,
        b: Security,
    ) -> (
        Result<(PeerId, Secured<impl AsyncRead + AsyncWrite>), Error>,
        Result<(PeerId, Secured<impl AsyncRead + AsyncWrite>), Error>,
    ) {
        let (x, y) = tokio::io::duplex(1 << 16);
        tokio::join!(
            a.upgrade_outbound(x.compat(), TLS),
            b.upgrade_inbound(y.compat(), TLS)
        )
    }

    #[tokio::test]
    async fn tls_names_both_peers_and_agrees_on_aes_gcm() {
        let (ka, kb) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (a, b) = handshake(Security::new(&ka).unwrap(), Security::new(&kb).unwrap()).await;
        let ((peer_b, mut sa), (peer_a, mut sb)) = (a.unwrap(), b.unwrap());
        assert_eq!(peer_b, kb.public().to_peer_id());
        assert_eq!(peer_a, ka.public().to_peer_id());
        let Either::Left(tls) = &sa else {
            panic!("not tls")
        };
        assert_eq!(
            tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        sa.write_all(b"over tls").await.unwrap();
        sa.flush().await.unwrap();
        let mut got = [0u8; 8];
        sb.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"over tls");
    }

    #[tokio::test]
    async fn a_client_offering_only_chacha20_gets_it() {
        let (ka, kb) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let mut a = Security::new(&ka).unwrap();
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![cipher_suite::TLS13_CHACHA20_POLY1305_SHA256],
            ..rustls::crypto::aws_lc_rs::default_provider()
        });
        let (cert, private) = certificate::generate(&ka).unwrap();
        let signer = provider.key_provider.load_private_key(private).unwrap();
        let ck = rustls::sign::CertifiedKey::new(vec![cert], signer);
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerCert))
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)));
        client.alpn_protocols = vec![ALPN.to_vec()];
        a.client = Arc::new(client);
        let (a, b) = handshake(a, Security::new(&kb).unwrap()).await;
        let (_, sa) = a.unwrap();
        b.unwrap();
        let Either::Left(tls) = &sa else {
            panic!("not tls")
        };
        assert_eq!(
            tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
        );
    }

    #[tokio::test]
    async fn a_certificate_without_the_host_key_signature_is_refused() {
        // A well-formed self-signed certificate, but not a libp2p one.
        let kp = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let der: CertificateDer = cert.into();
        assert!(PeerCert::check(&der, &[]).is_err());
        // and a libp2p one with an extra certificate in the chain
        let (good, _) = certificate::generate(&Keypair::generate_ed25519()).unwrap();
        assert!(PeerCert::check(&good, &[]).is_ok());
        assert!(PeerCert::check(&good, std::slice::from_ref(&der)).is_err());
    }

    #[tokio::test]
    async fn noise_is_still_spoken() {
        let (ka, kb) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (x, y) = tokio::io::duplex(1 << 16);
        let (a, b) = tokio::join!(
            Security::new(&ka)
                .unwrap()
                .upgrade_outbound(x.compat(), NOISE),
            Security::new(&kb)
                .unwrap()
                .upgrade_inbound(y.compat(), NOISE)
        );
        let ((peer_b, sa), (peer_a, _)) = (a.unwrap(), b.unwrap());
        assert_eq!(peer_b, kb.public().to_peer_id());
        assert_eq!(peer_a, ka.public().to_peer_id());
        assert!(matches!(sa, Either::Right(_)));
    }
}
