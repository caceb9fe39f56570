//! Keeps the certificates of the identities the node's pods present: one fetch per identity however many pods
//! share it (reference-counted, released with the last pod), renewed at half its lifetime (jittered, so the
//! node's identities do not all renew at once), retried with jittered exponential backoff on failure. The last
//! good certificate keeps serving while it is valid; an expired or not-yet-valid one is reported and never
//! handed out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{CertificateSource, SpiffeId, WorkloadCertificate};
use crate::random::random;

/// The current certificate of an identity; `None` while there is no valid one.
pub type CertificateWatch = watch::Receiver<Option<Arc<WorkloadCertificate>>>;

/// Retry pacing after a failed fetch.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: Duration::from_secs(1), max: Duration::from_secs(60) }
    }
}

impl Backoff {
    /// `base · 2^(failures-1)`, capped at `max`, then between 50 % and 100 % of that.
    fn delay(&self, failures: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(self.max);
        exp / 2 + jitter(exp / 2)
    }
}

/// A uniformly random duration below `span`.
fn jitter(span: Duration) -> Duration {
    let nanos = span.as_nanos().min(u64::MAX as u128) as u64;
    Duration::from_nanos((random() as u64).checked_rem(nanos).unwrap_or(0))
}

/// One identity, for the agent's `/status`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct IdentityStatus {
    pub identity: String,
    /// Subscriptions (pods) holding it.
    pub pods: usize,
    /// `pending` (none yet), `valid` or `expired` (the last one expired and no new one came).
    pub state: &'static str,
    pub serial: Option<String>,
    pub not_before_unix: Option<u64>,
    pub not_after_unix: Option<u64>,
    /// Fetches done (successful or not).
    pub fetches: u64,
    /// The last failure, kept until a fetch succeeds.
    pub last_error: Option<String>,
}

struct Entry {
    refs: usize,
    rx: CertificateWatch,
    status: Arc<Mutex<IdentityStatus>>,
    task: JoinHandle<()>,
}

/// The node's identities.
pub struct IdentityManager {
    source: Arc<dyn CertificateSource>,
    trust_domain: String,
    lifetime: Duration,
    backoff: Backoff,
    entries: Mutex<BTreeMap<SpiffeId, Entry>>,
}

impl IdentityManager {
    /// Certificates from `source` for identities in `trust_domain`, requested for `lifetime`.
    pub fn new(source: Arc<dyn CertificateSource>, trust_domain: &str, lifetime: Duration, backoff: Backoff) -> Arc<IdentityManager> {
        Arc::new(IdentityManager { source, trust_domain: trust_domain.into(), lifetime, backoff, entries: Mutex::default() })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The certificate of the pods of `namespace` running as `service_account`.
    pub fn pod_certificate(self: &Arc<Self>, namespace: &str, service_account: &str) -> Result<Subscription, String> {
        Ok(self.subscribe(SpiffeId::new(&self.trust_domain, namespace, service_account)?))
    }

    /// A subscription to `identity`'s certificate: the first starts fetching it (on the caller's runtime),
    /// the others share it; dropping the last stops its renewal and forgets it.
    pub fn subscribe(self: &Arc<Self>, identity: SpiffeId) -> Subscription {
        let mut entries = self.entries();
        let entry = entries.entry(identity.clone()).or_insert_with(|| self.start(&identity));
        entry.refs += 1;
        entry.status().pods = entry.refs;
        Subscription { rx: entry.rx.clone(), identity, manager: Arc::clone(self) }
    }

    fn start(&self, identity: &SpiffeId) -> Entry {
        let (tx, rx) = watch::channel(None);
        let status = Arc::new(Mutex::new(IdentityStatus { identity: identity.to_string(), state: "pending", ..Default::default() }));
        let renewer = Renewer {
            source: Arc::clone(&self.source),
            identity: identity.clone(),
            lifetime: self.lifetime,
            backoff: self.backoff,
            tx,
            status: Arc::clone(&status),
        };
        Entry { refs: 0, rx, status, task: tokio::spawn(renewer.run()) }
    }

    fn release(&self, identity: &SpiffeId) {
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(identity) else { return };
        entry.refs = entry.refs.saturating_sub(1);
        entry.status().pods = entry.refs;
        if entry.refs == 0 {
            if let Some(entry) = entries.remove(identity) {
                entry.task.abort();
            }
        }
    }

    /// Every identity held, sorted.
    pub fn status(&self) -> Vec<IdentityStatus> {
        self.entries().values().map(|e| e.status().clone()).collect()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<SpiffeId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Entry {
    fn status(&self) -> std::sync::MutexGuard<'_, IdentityStatus> {
        lock(&self.status)
    }
}

fn lock(status: &Mutex<IdentityStatus>) -> std::sync::MutexGuard<'_, IdentityStatus> {
    status.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pod's hold on an identity's certificate.
pub struct Subscription {
    identity: SpiffeId,
    rx: CertificateWatch,
    manager: Arc<IdentityManager>,
}

impl Subscription {
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The receiver of the identity's certificate (TLS handshakes read it; SDS pushes on its changes).
    pub fn receiver(&self) -> CertificateWatch {
        self.rx.clone()
    }

    /// The certificate now, if one is valid now.
    pub fn current(&self) -> Option<Arc<WorkloadCertificate>> {
        self.rx.borrow().clone().filter(|c| c.is_valid_at(SystemTime::now()))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.manager.release(&self.identity);
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("identity", &self.identity).finish_non_exhaustive()
    }
}

/// The task that keeps one identity's certificate.
struct Renewer {
    source: Arc<dyn CertificateSource>,
    identity: SpiffeId,
    lifetime: Duration,
    backoff: Backoff,
    tx: watch::Sender<Option<Arc<WorkloadCertificate>>>,
    status: Arc<Mutex<IdentityStatus>>,
}

impl Renewer {
    async fn run(self) {
        let mut failures = 0u32;
        loop {
            self.withdraw_if_expired();
            let fetched = self.source.fetch(&self.identity, self.lifetime).await.and_then(check_valid_now);
            let wait = match fetched {
                Ok(cert) => {
                    failures = 0;
                    self.publish(cert)
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    self.failed(e, failures)
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Hands `cert` out; returns how long until its renewal.
    fn publish(&self, cert: WorkloadCertificate) -> Duration {
        tracing::info!(identity = %self.identity, serial = %cert.serial, "workload certificate issued");
        let renew_at = cert.not_before + cert.lifetime() * 9 / 20 + jitter(cert.lifetime() / 10);
        crate::node_metrics::certificate_fetch(true);
        let mut status = lock(&self.status);
        status.fetches += 1;
        status.state = "valid";
        status.serial = Some(cert.serial.clone());
        status.not_before_unix = Some(unix(cert.not_before));
        status.not_after_unix = Some(unix(cert.not_after));
        status.last_error = None;
        drop(status);
        self.tx.send_replace(Some(Arc::new(cert)));
        // At least the backoff's base: a CA answering with certificates already past half their life (long
        // backdated, or capped to a short life) must not be asked again in a tight loop.
        renew_at.duration_since(SystemTime::now()).unwrap_or_default().max(self.backoff.base)
    }

    /// Records the failure; returns how long until the retry: the backoff, or sooner if the certificate held
    /// expires first, so it is withdrawn on time.
    fn failed(&self, error: String, failures: u32) -> Duration {
        tracing::warn!(identity = %self.identity, failures, "workload certificate: {error}");
        crate::node_metrics::certificate_fetch(false);
        let mut status = lock(&self.status);
        status.fetches += 1;
        status.last_error = Some(error);
        drop(status);
        let retry = self.backoff.delay(failures);
        match self.tx.borrow().as_ref().and_then(|c| c.not_after.duration_since(SystemTime::now()).ok()) {
            Some(left) => retry.min(left),
            None => retry,
        }
    }

    fn withdraw_if_expired(&self) {
        let expired = self.tx.borrow().as_ref().is_some_and(|c| !c.is_valid_at(SystemTime::now()));
        if expired {
            tracing::warn!(identity = %self.identity, "workload certificate expired with no renewal; withdrawn");
            self.tx.send_replace(None);
            lock(&self.status).state = "expired";
        }
    }
}

/// A certificate is only handed out within its validity.
fn check_valid_now(cert: WorkloadCertificate) -> Result<WorkloadCertificate, String> {
    let now = SystemTime::now();
    if cert.is_valid_at(now) {
        return Ok(cert);
    }
    let when = if now < cert.not_before { "not yet valid" } else { "expired" };
    Err(format!(
        "certificate {} is {when} (valid from {} to {} unix, now {})",
        cert.serial,
        unix(cert.not_before),
        unix(cert.not_after),
        unix(now)
    ))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::file_ca::FileCa;
    use crate::identity::BoxFuture;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A file CA that counts fetches, can be made to fail, and can issue certificates valid only later.
    struct Counting {
        ca: FileCa,
        fetches: AtomicUsize,
        fail: AtomicBool,
        future: AtomicBool,
    }

    impl CertificateSource for Counting {
        fn fetch<'a>(&'a self, id: &'a SpiffeId, lifetime: Duration) -> BoxFuture<'a, Result<WorkloadCertificate, String>> {
            Box::pin(async move {
                self.fetches.fetch_add(1, Ordering::SeqCst);
                if self.fail.load(Ordering::SeqCst) {
                    return Err("injected refusal".into());
                }
                let mut cert = self.ca.issue(id, lifetime)?;
                if self.future.load(Ordering::SeqCst) {
                    cert.not_before += Duration::from_secs(3600);
                }
                Ok(cert)
            })
        }
    }

    fn counting() -> Arc<Counting> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).unwrap().der().clone();
        Arc::new(Counting { ca: FileCa::new(root, key).unwrap(), fetches: 0.into(), fail: false.into(), future: false.into() })
    }

    const FAST: Backoff = Backoff { base: Duration::from_millis(20), max: Duration::from_millis(100) };

    async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn shared_identities_are_fetched_once_and_released_with_the_last_pod() {
        let source = counting();
        let manager = IdentityManager::new(source.clone(), "cluster.local", Duration::from_secs(3600), FAST);
        let a = manager.pod_certificate("default", "web").unwrap();
        let b = manager.pod_certificate("default", "web").unwrap();
        let c = manager.pod_certificate("default", "db").unwrap();
        until("certificates", || a.current().and(c.current())).await;
        assert_eq!(b.current().unwrap().serial, a.current().unwrap().serial);
        assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
        let status = manager.status();
        assert_eq!(status.iter().map(|s| (s.identity.as_str(), s.pods, s.state)).collect::<Vec<_>>(), [
            ("spiffe://cluster.local/ns/default/sa/db", 1, "valid"),
            ("spiffe://cluster.local/ns/default/sa/web", 2, "valid"),
        ]);
        drop(a);
        assert_eq!(manager.status().len(), 2);
        drop(b);
        assert_eq!(manager.status().len(), 1, "web released with its last pod");
        drop(c);
        assert!(manager.status().is_empty());
    }

    #[tokio::test]
    async fn not_yet_valid_certificates_are_reported_and_never_handed_out() {
        let source = counting();
        source.future.store(true, Ordering::SeqCst);
        let manager = IdentityManager::new(source.clone(), "cluster.local", Duration::from_secs(3600), FAST);
        let sub = manager.pod_certificate("default", "web").unwrap();
        let error = until("the error", || manager.status()[0].last_error.clone()).await;
        assert!(error.contains("not yet valid"), "{error}");
        assert!(sub.receiver().borrow().is_none());
        source.future.store(false, Ordering::SeqCst);
        until("a valid certificate after retrying", || sub.current()).await;
    }

    #[tokio::test]
    async fn expired_certificates_are_withdrawn_when_renewal_fails() {
        let source = counting();
        let manager = IdentityManager::new(source.clone(), "cluster.local", Duration::from_secs(2), FAST);
        let sub = manager.pod_certificate("default", "web").unwrap();
        let first = until("a certificate", || sub.current()).await;
        source.fail.store(true, Ordering::SeqCst);
        until("withdrawal at expiry", || sub.receiver().borrow().is_none().then_some(())).await;
        assert!(SystemTime::now() >= first.not_after);
        let status = &manager.status()[0];
        assert_eq!((status.state, status.last_error.as_deref()), ("expired", Some("injected refusal")));
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let b = Backoff { base: Duration::from_secs(1), max: Duration::from_secs(8) };
        for (failures, cap) in [(1, 1), (2, 2), (3, 4), (4, 8), (10, 8), (u32::MAX, 8)] {
            let d = b.delay(failures);
            let cap = Duration::from_secs(cap);
            assert!(d >= cap / 2 && d <= cap, "{failures}: {d:?}");
        }
    }
}
