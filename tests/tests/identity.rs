//! Workload identities against a test istiod secured port (tests/src/ca_server.rs), which checks what istiod
//! checks of a node agent that impersonates its pods (bearer token, cluster id, the identity being on the
//! node, the CSR's signature, key and SAN): issuance by impersonation, one request per identity however many
//! pods share it, renewal before expiry, refusals reported with the last good certificate kept, TLS and token
//! failures named, the file CA, and the pods' xDS streams over the secured port. No root needed: all on
//! 127.0.0.1.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use weft_agent::config::agent::{IstiodCa, IstiodConnection, XdsSettings};
use weft_agent::identity::manager::{Backoff, IdentityManager, IdentityStatus};
use weft_agent::identity::{file_ca::FileCa, istio_ca::IstioCa, CertificateSource};
use weft_tests::ca_server::{CaServer, AGENT_IDENTITY, CLUSTER_ID, SERVER_NAME, TOKEN};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const DB: &str = "spiffe://cluster.local/ns/default/sa/db";
const FAST: Backoff = Backoff { base: Duration::from_millis(50), max: Duration::from_millis(200) };

fn connection(server: &CaServer) -> IstiodConnection {
    IstiodConnection { root_cert: server.root_cert.clone(), token_file: server.token_file.clone(), server_name: SERVER_NAME.into() }
}

fn istio_ca(server: &CaServer, connection: IstiodConnection) -> Arc<dyn CertificateSource> {
    let settings = IstiodCa { address: server.address.to_string(), connection, cluster_id: CLUSTER_ID.into() };
    Arc::new(IstioCa::new(&settings).unwrap())
}

fn manager(source: Arc<dyn CertificateSource>, lifetime: Duration) -> Arc<IdentityManager> {
    IdentityManager::new(source, "cluster.local", lifetime, FAST)
}

/// Polls `f` until it gives a value, for up to 20 s.
async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status_of(manager: &IdentityManager, id: &str) -> IdentityStatus {
    manager.status().into_iter().find(|s| s.identity == id).expect("identity held")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_by_impersonation_one_request_per_identity() {
    let server = CaServer::start(&[WEB, DB]).unwrap();
    let manager = manager(istio_ca(&server, connection(&server)), Duration::from_secs(3600));
    let pods: Vec<_> = (0..3).map(|_| manager.pod_certificate("default", "web").unwrap()).collect();
    let db = manager.pod_certificate("default", "db").unwrap();
    let web = until("web's certificate", || pods[0].current()).await;
    let db_cert = until("db's certificate", || db.current()).await;

    // One request per identity, for exactly the impersonated identity and the lifetime asked.
    let issued = server.issued();
    assert_eq!(issued.len(), 2, "{issued:?}");
    assert!(issued.iter().any(|i| i.identity == WEB && i.validity_s == 3600 && i.serial == web.serial), "{issued:?}");
    assert!(issued.iter().any(|i| i.identity == DB && i.serial == db_cert.serial), "{issued:?}");
    for pod in &pods {
        assert_eq!(pod.current().unwrap().serial, web.serial, "pods sharing an identity share its certificate");
    }
    // Leaf and intermediate to present; the root (last of istiod's chain) to verify peers with.
    assert_eq!((web.chain.len(), web.roots.len()), (2, 1));
    assert_eq!(web.identity.to_string(), WEB);
    let root_pem = server.root_pem();
    let root = weft_agent::identity::pem_certificates(root_pem.as_bytes(), "root").unwrap();
    assert_eq!(web.roots, root);
    assert!(web.is_valid_at(SystemTime::now()));
    let status = status_of(&manager, WEB);
    assert_eq!((status.pods, status.state, status.serial.as_deref(), status.last_error), (3, "valid", Some(web.serial.as_str()), None));

    // The last pod of an identity releases it.
    drop(pods);
    assert_eq!(manager.status().len(), 1);
    assert!(server.refused().is_empty(), "{:?}", server.refused());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_comes_before_expiry() {
    let server = CaServer::start(&[WEB]).unwrap();
    let manager = manager(istio_ca(&server, connection(&server)), Duration::from_secs(4));
    let pod = manager.pod_certificate("default", "web").unwrap();
    let mut rx = pod.receiver();
    let first = until("a certificate", || pod.current()).await;
    // The next certificate the receiver announces arrives while the first is still valid.
    let renewed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            rx.changed().await.expect("manager alive");
            let now = SystemTime::now();
            if let Some(cert) = rx.borrow_and_update().clone() {
                if cert.serial != first.serial {
                    return (cert, now);
                }
            }
        }
    })
    .await
    .expect("renewed within 20 s");
    assert!(renewed.1 < first.not_after, "renewed at {:?}, after the first expired at {:?}", renewed.1, first.not_after);
    assert!(server.issued().len() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_reported_and_the_last_good_certificate_kept() {
    let server = CaServer::start(&[WEB]).unwrap();
    let manager = manager(istio_ca(&server, connection(&server)), Duration::from_secs(6));
    let pod = manager.pod_certificate("default", "web").unwrap();
    let good = until("a certificate", || pod.current()).await;
    server.refuse_all(true);
    // Renewal (at about half of 6 s) fails; the error is reported while the good one still serves.
    let error = until("the refusal in the status", || status_of(&manager, WEB).last_error).await;
    assert!(error.contains("Unavailable") && error.contains("refuses every request"), "{error}");
    assert_eq!(pod.current().map(|c| c.serial.clone()), Some(good.serial.clone()), "last good kept while valid");
    assert_eq!(status_of(&manager, WEB).state, "valid");
    // Past its expiry it is withdrawn, never handed out expired.
    until("withdrawal at expiry", || pod.receiver().borrow().is_none().then_some(())).await;
    assert!(SystemTime::now() >= good.not_after);
    assert_eq!(status_of(&manager, WEB).state, "expired");
    // Recovery once the CA answers again.
    server.refuse_all(false);
    let next = until("a new certificate", || pod.current()).await;
    assert_ne!(next.serial, good.serial);
    assert_eq!(status_of(&manager, WEB).last_error, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_istiod_would_refuse_is_refused_and_named() {
    let server = CaServer::start(&[WEB]).unwrap();
    let lifetime = Duration::from_secs(3600);
    // A pod identity not on this node.
    let manager_ = manager(istio_ca(&server, connection(&server)), lifetime);
    let other = manager_.pod_certificate("default", "other").unwrap();
    let e = until("the refusal", || status_of(&manager_, "spiffe://cluster.local/ns/default/sa/other").last_error).await;
    assert!(e.contains("PermissionDenied") && e.contains("on the agent's node"), "{e}");
    assert!(other.receiver().borrow().is_none());

    // A wrong token.
    let dir = std::env::temp_dir().join(format!("weft-identity-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), "someone-else").unwrap();
    let source = istio_ca(&server, IstiodConnection { token_file: dir.join("token"), ..connection(&server) });
    let id = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
    let e = source.fetch(&id, lifetime).await.unwrap_err();
    assert!(e.contains("Unauthenticated"), "{e}");
    assert!(!e.contains("someone-else"), "the token is never shown: {e}");
    // A missing token file is named.
    let source = istio_ca(&server, IstiodConnection { token_file: dir.join("absent"), ..connection(&server) });
    let e = source.fetch(&id, lifetime).await.unwrap_err();
    assert!(e.contains("absent"), "{e}");
    // istiod's certificate checked against the root file and the server name.
    std::fs::write(dir.join("other-root.pem"), CaServer::start(&[]).unwrap().root_pem()).unwrap();
    let source = istio_ca(&server, IstiodConnection { root_cert: dir.join("other-root.pem"), ..connection(&server) });
    let e = source.fetch(&id, lifetime).await.unwrap_err();
    assert!(e.contains("istiod CA"), "{e}");
    let source = istio_ca(&server, IstiodConnection { server_name: "istiod.elsewhere.svc".into(), ..connection(&server) });
    assert!(source.fetch(&id, lifetime).await.is_err());
    // Only the request with the wrong token reached the CA; the TLS failures never got that far.
    assert_eq!(server.issued().len(), 0);
    assert!(server.refused().iter().any(|r| r.contains("bearer")), "{:?}", server.refused());
    // With everything right, the same source works.
    let cert = istio_ca(&server, connection(&server)).fetch(&id, lifetime).await.unwrap();
    assert_eq!(cert.identity, id);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_ca_issues_through_the_manager() {
    let dir = std::env::temp_dir().join(format!("weft-identity-file-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "file ca");
    let root = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("ca.pem"), root.pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), key.serialize_pem()).unwrap();
    let ca = FileCa::load(&dir.join("ca.pem"), &dir.join("ca-key.pem")).unwrap();
    let manager = manager(Arc::new(ca), Duration::from_secs(600));
    let pod = manager.pod_certificate("bookinfo", "reviews").unwrap();
    let cert = until("a certificate", || pod.current()).await;
    assert_eq!(cert.identity.to_string(), "spiffe://cluster.local/ns/bookinfo/sa/reviews");
    assert_eq!(cert.roots, vec![root.der().clone()]);
    assert_eq!(cert.lifetime(), Duration::from_secs(600));
    // The leaf verifies against the file's CA with rustls' own verifier (what the data path will use).
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
    let now = rustls_pki_types::UnixTime::now();
    verifier.verify_client_cert(&cert.chain[0], &cert.chain[1..], now).expect("a client certificate of the mesh");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_xds_over_the_secured_port_presents_the_pods_certificate() {
    let server = CaServer::start(&[WEB]).unwrap();
    let settings = XdsSettings {
        address: server.address,
        tls: Some(connection(&server)),
        api: weft_agent::config::bootstrap::AdsApi::Sotw,
        cluster_id: CLUSTER_ID.into(),
        mesh_id: "cluster.local".into(),
        istio_version: "1.24.0".into(),
    };
    let xds = weft_agent::xds::pod::PodXds::new(settings).unwrap();
    let record: weft_agent::cni_server::registry::PodRecord = serde_json::from_value(json!({
        "namespace": "default", "name": "web-0", "uid": "u1", "container_id": "c1", "infra_container_id": "c1",
        "ifname": "eth0", "netns": "/var/run/netns/none", "netns_id": {"dev": 1, "ino": 2}, "ips": ["10.1.0.5"],
        "redirect": "iptables", "added_at_unix": 0
    }))
    .unwrap();
    let node_id = "sidecar~10.1.0.5~web-0.default~default.svc.cluster.local";

    // The agent's token alone authenticates it as itself, which istiod's xDS check refuses for a pod of
    // another namespace.
    let (tx, _rx) = tokio::sync::watch::channel(None);
    let (_state, task) = xds.start(&record, tx);
    let stream = until("the token-only stream", || server.xds_streams().into_iter().next()).await;
    task.abort();
    assert_eq!(stream.authorization, Some(format!("Bearer {TOKEN}")));
    assert_eq!((stream.node_id.as_deref(), stream.client_certificate.as_deref()), (Some(node_id), None));
    assert!(stream.refused.as_deref().is_some_and(|r| r.contains(AGENT_IDENTITY)), "{stream:?}");

    // With the pod's certificate (from the same istiod, by impersonation) as client certificate, it passes.
    let manager = manager(istio_ca(&server, connection(&server)), Duration::from_secs(3600));
    let web = manager.pod_certificate("default", "web").unwrap();
    until("web's certificate", || web.current()).await;
    let (tx, _rx) = tokio::sync::watch::channel(None);
    let (_state, task) = xds.start_as(&record, tx, Some(web.receiver()));
    let stream = until("the stream with the pod's certificate", || server.xds_streams().into_iter().find(|s| s.client_certificate.is_some())).await;
    task.abort();
    assert_eq!((stream.node_id.as_deref(), stream.client_certificate.as_deref(), stream.refused), (Some(node_id), Some(WEB), None));
}

/// The test CA's own checks can fail: a CSR for another identity than the impersonated one, or no
/// impersonated identity, is refused (so the passing tests above prove the agent's requests are right).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_ca_refuses_a_csr_for_another_identity() {
    use weft_agent::identity::istio_ca::{IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE};
    let server = CaServer::start(&[WEB]).unwrap();
    let channel = weft_agent::identity::grpc::istiod_channel(&server.address.to_string(), &connection(&server), None).unwrap();
    let (_, csr_for_db) = weft_agent::identity::key_and_csr(&DB.parse().unwrap()).unwrap();
    let impersonating = |id: Option<&str>| {
        id.map(|id| prost_types::Struct {
            fields: [("ImpersonatedIdentity".to_string(), prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.into())) })].into(),
        })
    };
    for (metadata, refusal) in [(impersonating(Some(WEB)), "are not the impersonated identity"), (impersonating(None), "ImpersonatedIdentity")] {
        let mut request = tonic::Request::new(IstioCertificateRequest { csr: csr_for_db.clone(), validity_duration: 60, metadata });
        request.metadata_mut().insert("clusterid", CLUSTER_ID.parse().unwrap());
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let codec = tonic::codec::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE);
        let status = grpc.unary(request, path, codec).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(refusal), "{}", status.message());
    }
    assert!(server.issued().is_empty());
}
