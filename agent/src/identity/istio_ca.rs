//! istiod's CA (`istio.v1.auth.IstioCertificateService/CreateCertificate`, Istio's
//! `security/proto/pki/ca.proto`), asked the way ztunnel asks it for the pods of its node: a fresh ECDSA P-256
//! key and CSR per identity, authenticated with the agent's own token, the pod's identity named in the
//! request's `metadata.ImpersonatedIdentity`. istiod grants that only to node agents it trusts
//! (`CA_TRUSTED_NODE_ACCOUNTS`) and only for identities of pods scheduled on the caller's node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use prost_types::value::Kind;
use rustls_pki_types::CertificateDer;
use tonic::codegen::http::uri::PathAndQuery;

use super::grpc::{istiod_channel, AuthChannel};
use super::{key_and_csr, pem_certificates, BoxFuture, CertificateSource, SpiffeId, WorkloadCertificate};
use crate::config::agent::IstiodCa;

/// The method's path.
pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// The metadata field naming the identity a node agent asks for on a pod's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded certificate request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity, in seconds.
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`: PEM certificates, leaf first, root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

/// A client of istiod's CA.
pub struct IstioCa {
    channel: AuthChannel,
    cluster_id: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    /// istiod's root: the trust root when the response carries the leaf alone.
    root_cert: PathBuf,
}

impl IstioCa {
    /// A client of the CA `settings` names; connects on first use and reconnects by itself.
    pub fn new(settings: &IstiodCa) -> Result<IstioCa, String> {
        let channel = istiod_channel(&settings.address, &settings.connection, None)?;
        let cluster_id = settings.cluster_id.parse().map_err(|_| format!("cluster_id {:?}: not printable ASCII", settings.cluster_id))?;
        Ok(IstioCa { channel, cluster_id, root_cert: settings.connection.root_cert.clone() })
    }

    async fn create(&self, identity: &SpiffeId, lifetime: Duration) -> Result<WorkloadCertificate, String> {
        let (key, csr) = key_and_csr(identity)?;
        let metadata = prost_types::Struct {
            fields: BTreeMap::from([(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value { kind: Some(Kind::StringValue(identity.to_string())) },
            )]),
        };
        let message = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        };
        let mut request = tonic::Request::new(message);
        request.set_timeout(REQUEST_TIMEOUT);
        // gRPC lower-cases header names: istio-agent's `ClusterID` arrives as `clusterid`.
        request.metadata_mut().insert("clusterid", self.cluster_id.clone());
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|e| format!("istiod CA: {e}"))?;
        let codec = tonic::codec::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
        let response = grpc
            .unary(request, PathAndQuery::from_static(CREATE_CERTIFICATE), codec)
            .await
            .map_err(|s| format!("istiod CA refused {identity}: {:?}: {}", s.code(), s.message()))?;
        let (chain, roots) = self.split_chain(&response.into_inner().cert_chain)?;
        WorkloadCertificate::new(identity, chain, &key, roots).map_err(|e| format!("istiod CA answer for {identity}: {e}"))
    }

    /// Leaf and intermediates, and the root (the last of several, or istiod's root file).
    fn split_chain(&self, pems: &[String]) -> Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>), String> {
        let mut chain = Vec::new();
        for pem in pems {
            chain.extend(pem_certificates(pem.as_bytes(), "istiod CA cert_chain")?);
        }
        if chain.is_empty() {
            return Err("istiod CA: empty cert_chain".into());
        }
        if chain.len() > 1 {
            let root = chain.pop().into_iter().collect();
            return Ok((chain, root));
        }
        let file = std::fs::read(&self.root_cert).map_err(|e| format!("root certificate {}: {e}", self.root_cert.display()))?;
        Ok((chain, pem_certificates(&file, &self.root_cert.display().to_string())?))
    }
}

impl CertificateSource for IstioCa {
    fn fetch<'a>(&'a self, identity: &'a SpiffeId, lifetime: Duration) -> BoxFuture<'a, Result<WorkloadCertificate, String>> {
        Box::pin(self.create(identity, lifetime))
    }
}
