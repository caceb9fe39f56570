//! The xDS client: listeners and clusters from an aggregated discovery service (state of the world or
//! delta), validated by the same translator as bootstrap files, applied to the running proxy. A rejected
//! resource is NACKed with its name and the field at fault while the rest of the response is applied and the
//! last good version of the rejected one keeps serving, as Envoy does.

pub mod client;
pub mod codec;
pub mod intern;
pub mod pod;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::SystemTime;

use serde_json::Value;

use crate::config::bootstrap::Bootstrap;
use crate::config::cluster::{self, Cluster};
use crate::config::listener::{self, Listener};
use crate::config::route::{self, RouteConfiguration};
use crate::config::secret::{self, Secret};
use crate::config::store::{ByName, ClusterState, Entry, Resource};
use crate::config::tree::Obj;
use crate::config::workload_metadata::LocalWorkload;
use crate::proxy::server::Proxy;
use crate::proxy::snapshot::Snapshot;

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The resource types weft subscribes to, clusters first (a listener may only use clusters that exist).
pub const TYPES: [&str; 5] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE];

/// Types subscribed by name (EDS: the services of EDS clusters; RDS: the route configurations listeners
/// name; SDS: the secrets TLS contexts name over ADS); the others as a whole (wildcard).
pub const NAMED_TYPES: [&str; 3] = [ENDPOINT_TYPE, ROUTE_TYPE, SECRET_TYPE];

pub fn is_wildcard(type_url: &str) -> bool {
    !NAMED_TYPES.contains(&type_url)
}


/// Accepted dynamic resources and the version of each type's last accepted response. Each collection is
/// shared (copy on write) with the pod's data-path snapshot, so a snapshot costs a few pointers.
#[derive(Debug, Default)]
pub struct Store {
    pub listeners: Arc<ByName<Listener>>,
    pub clusters: Arc<ByName<Cluster>>,
    /// EDS: service name → endpoints.
    pub assignments: Arc<ByName<crate::config::cluster::Assignment>>,
    /// RDS: route configuration name → routes.
    pub routes: Arc<ByName<Arc<RouteConfiguration>>>,
    /// SDS over ADS: secret name → certificate or trust roots.
    pub secrets: Arc<ByName<Secret>>,
    pub versions: HashMap<&'static str, String>,
    /// Per type, whether the last response was accepted: the xDS sync status.
    pub last_response: HashMap<&'static str, bool>,
    /// Per type, why the last rejected response was rejected (kept until a response is accepted).
    pub rejected: HashMap<&'static str, String>,
}

/// One type's sync detail.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TypeSync {
    /// The version last accepted (empty: none yet).
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

/// Shared decoded resources of every stream in the process.
static LISTENERS: LazyLock<intern::Interner<Resource<Listener>>> = LazyLock::new(Default::default);
static CLUSTERS: LazyLock<intern::Interner<Resource<Cluster>>> = LazyLock::new(Default::default);
static ASSIGNMENTS: LazyLock<intern::Interner<Resource<crate::config::cluster::Assignment>>> = LazyLock::new(Default::default);
static ROUTES: LazyLock<intern::Interner<Resource<Arc<RouteConfiguration>>>> = LazyLock::new(Default::default);
static SECRETS: LazyLock<intern::Interner<Resource<Secret>>> = LazyLock::new(Default::default);

type Rejection = (Option<String>, String);

/// Decodes and translates `r` once per distinct content in the process (see [`intern`]).
fn shared<M>(
    interner: &intern::Interner<Resource<M>>,
    r: &Received<'_>,
    kind: &str,
    name_field: &str,
    translate: impl FnOnce(Obj<'_>) -> crate::config::tree::Result<M>,
) -> Result<Entry<M>, Rejection> {
    let same = |e: &Resource<M>| *e.bytes == *r.bytes && e.version == r.version;
    interner.get_or_decode(r.bytes, same, || {
        let raw = codec::any_to_json(r.type_url, r.bytes).map_err(|e| (r.name.map(str::to_string), e))?;
        let raw = crate::config::typed_struct::expand(raw);
        let name = raw.get(name_field).and_then(Value::as_str).or(r.name).unwrap_or_default().to_string();
        let fail = |e: String| (Some(name.clone()), format!("{kind} '{name}': {e}"));
        let obj = Obj::new(&raw, "").map_err(|e| fail(e.to_string()))?;
        let model = translate(obj).map_err(|e| fail(e.to_string()))?;
        Ok(Resource {
            name: Arc::from(name),
            version: r.version.to_string(),
            bytes: r.bytes.into(),
            model,
            last_updated: SystemTime::now(),
            cursor: Default::default(),
            state: ClusterState::default(),
        })
    })
}

/// Short names of the types, as `istioctl proxy-status` shows them.
pub fn short_name(type_url: &str) -> &'static str {
    match type_url {
        CLUSTER_TYPE => "CDS",
        ENDPOINT_TYPE => "EDS",
        LISTENER_TYPE => "LDS",
        ROUTE_TYPE => "RDS",
        SECRET_TYPE => "SDS",
        _ => "?",
    }
}

/// A resource as received: name, version (delta) and bytes.
pub struct Received<'a> {
    pub name: Option<&'a str>,
    pub version: &'a str,
    pub type_url: &'a str,
    pub bytes: &'a [u8],
}

/// Where accepted configuration goes.
pub enum Sink {
    /// The standalone proxy: bootstrap and dynamic resources together.
    Proxy(Arc<Proxy>),
    /// A captured pod's in-pod listeners, which read the latest snapshot for every new connection.
    Pod(tokio::sync::watch::Sender<Option<Arc<Snapshot>>>),
}

/// Applies xDS updates to the proxy. Shared by the stream tasks and the admin endpoint.
pub struct XdsState {
    bootstrap: Bootstrap,
    /// The bootstrap's listeners and clusters as resources, made once so their counters persist.
    static_listeners: Vec<Entry<Listener>>,
    static_clusters: Vec<Entry<Cluster>>,
    static_secrets: Vec<Entry<Secret>>,
    /// The node's workload metadata, made once, in every snapshot.
    local: Arc<LocalWorkload>,
    sink: Sink,
    pub store: Mutex<Store>,
}

impl XdsState {
    /// A pod's snapshot channel, for a new stream that takes over the pod's listeners (which keep the last
    /// accepted configuration until the new stream's first is accepted).
    pub fn snapshot_sender(&self) -> Option<tokio::sync::watch::Sender<Option<Arc<Snapshot>>>> {
        match &self.sink {
            Sink::Pod(sender) => Some(sender.clone()),
            Sink::Proxy(_) => None,
        }
    }

    pub fn new(bootstrap: Bootstrap, sink: Sink) -> Arc<XdsState> {
        let static_listeners = bootstrap.listeners.iter().map(|l| Resource::fixed(&l.name, l.clone())).collect();
        let static_clusters = bootstrap.clusters.iter().map(|c| Resource::fixed(&c.name, c.clone())).collect();
        let static_secrets = bootstrap.secrets.iter().map(|s| Resource::fixed(&s.name, s.clone())).collect();
        let local = Arc::new(LocalWorkload::from_node(&bootstrap.node));
        Arc::new(XdsState { bootstrap, static_listeners, static_clusters, static_secrets, local, sink, store: Mutex::default() })
    }

    /// Serves the bootstrap's static resources (standalone proxy); returns the listeners that cannot bind.
    pub fn start(&self) -> Vec<String> {
        self.push(&mut self.store())
    }

    pub fn bootstrap(&self) -> &Bootstrap {
        &self.bootstrap
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Versions of the accepted resources of `type_url` (delta's `initial_resource_versions`).
    pub fn resource_versions(&self, type_url: &str) -> HashMap<String, String> {
        let store = self.store();
        match type_url {
            LISTENER_TYPE => store.listeners.iter().map(|(n, e)| (n.to_string(), e.version.clone())).collect(),
            ENDPOINT_TYPE => store.assignments.iter().map(|(n, e)| (n.to_string(), e.version.clone())).collect(),
            ROUTE_TYPE => store.routes.iter().map(|(n, e)| (n.to_string(), e.version.clone())).collect(),
            SECRET_TYPE => store.secrets.iter().map(|(n, e)| (n.to_string(), e.version.clone())).collect(),
            _ => store.clusters.iter().map(|(n, e)| (n.to_string(), e.version.clone())).collect(),
        }
    }

    /// The names a named type needs now: EDS services of the EDS clusters, RDS names of the listeners.
    pub fn names_for(&self, type_url: &str) -> Vec<String> {
        self.referenced(&self.store(), type_url)
    }

    fn referenced(&self, store: &Store, type_url: &str) -> Vec<String> {
        use crate::config::cluster::Discovery;
        let mut names: Vec<String> = if type_url == ENDPOINT_TYPE {
            self.bootstrap
                .clusters
                .iter()
                .chain(store.clusters.values().map(|e| e.model()))
                .filter_map(|c| match &c.discovery {
                    Discovery::Eds { service_name } => Some(service_name.clone()),
                    _ => None,
                })
                .collect()
        } else if type_url == SECRET_TYPE {
            let listeners = self.bootstrap.listeners.iter().chain(store.listeners.values().map(|e| e.model()));
            let clusters = self.bootstrap.clusters.iter().chain(store.clusters.values().map(|e| e.model()));
            let contexts = listeners.flat_map(Listener::tls_contexts).chain(clusters.flat_map(Cluster::tls_contexts));
            contexts.flat_map(|c| c.sds_secrets().filter(|s| s.over_ads).map(|s| s.name.clone())).collect()
        } else {
            self.bootstrap
                .listeners
                .iter()
                .chain(store.listeners.values().map(|e| e.model()))
                .flat_map(|l| l.rds_names().map(str::to_string))
                .collect()
        };
        names.sort();
        names.dedup();
        names
    }

    /// Per type: SYNCED (last response accepted), STALE (last response rejected) or NOT SENT (none yet).
    pub fn sync_status(&self) -> BTreeMap<&'static str, &'static str> {
        let store = self.store();
        TYPES
            .iter()
            .map(|t| {
                let status = match store.last_response.get(t) {
                    None => "NOT SENT",
                    Some(true) => "SYNCED",
                    Some(false) => "STALE",
                };
                (short_name(t), status)
            })
            .collect()
    }

    /// Per type: the version last accepted and, when the last response was rejected, why
    /// (`istioctl proxy-status`'s view of a sidecar).
    pub fn sync_detail(&self) -> BTreeMap<&'static str, TypeSync> {
        let store = self.store();
        TYPES
            .iter()
            .map(|t| (short_name(t), TypeSync { version: store.versions.get(t).cloned().unwrap_or_default(), rejected: store.rejected.get(t).cloned() }))
            .collect()
    }

    /// Whether a response of `type_url` was ever accepted in full on this stream (Envoy's `update_success`
    /// above zero), which Istio's readiness asks of listeners and clusters.
    pub fn has_accepted(&self, type_url: &str) -> bool {
        self.store().versions.contains_key(type_url)
    }

    /// The version of the last accepted response of `type_url` (SotW `version_info`).
    pub fn accepted_version(&self, type_url: &str) -> String {
        self.store().versions.get(type_url).cloned().unwrap_or_default()
    }

    /// Applies one response. `complete` is state of the world: names not received are removed. Returns the
    /// errors of rejected resources (empty: ACK).
    pub fn apply(&self, type_url: &'static str, version: &str, received: &[Received<'_>], removed: &[String], complete: bool) -> Vec<String> {
        let started = std::time::Instant::now();
        let errors = self.apply_response(type_url, version, received, removed, complete);
        crate::node_metrics::xds(short_name(type_url), errors.is_empty(), started.elapsed());
        errors
    }

    fn apply_response(&self, type_url: &'static str, version: &str, received: &[Received<'_>], removed: &[String], complete: bool) -> Vec<String> {
        let mut errors = Vec::new();
        let mut store = self.store();
        let mut seen = HashSet::new();
        for r in received {
            match self.accept(type_url, r, &mut store) {
                Ok(name) => {
                    seen.insert(name);
                }
                Err((name, e)) => {
                    // Keep serving the last good version of a rejected resource.
                    seen.extend(name);
                    errors.push(e);
                }
            }
        }
        let gone = |name: &str| removed.iter().any(|r| r == name) || (complete && !seen.contains(name));
        match type_url {
            LISTENER_TYPE => Arc::make_mut(&mut store.listeners).retain(|e| !gone(&e.name)),
            ENDPOINT_TYPE => Arc::make_mut(&mut store.assignments).retain(|e| !gone(&e.name)),
            ROUTE_TYPE => Arc::make_mut(&mut store.routes).retain(|e| !gone(&e.name)),
            SECRET_TYPE => Arc::make_mut(&mut store.secrets).retain(|e| !gone(&e.name)),
            _ => Arc::make_mut(&mut store.clusters).retain(|e| !gone(&e.name)),
        }
        // Endpoints and routes no cluster or listener names any more leave with their subscription.
        if complete && type_url == CLUSTER_TYPE {
            let wanted = self.referenced(&store, ENDPOINT_TYPE);
            Arc::make_mut(&mut store.assignments).retain(|e| wanted.iter().any(|w| **w == *e.name));
        }
        if complete && type_url == LISTENER_TYPE {
            let wanted = self.referenced(&store, ROUTE_TYPE);
            Arc::make_mut(&mut store.routes).retain(|e| wanted.iter().any(|w| **w == *e.name));
        }
        errors.extend(self.push(&mut store));
        if errors.is_empty() {
            store.versions.insert(type_url, version.to_string());
        }
        store.last_response.insert(type_url, errors.is_empty());
        match errors.first() {
            None => store.rejected.remove(type_url),
            Some(first) => store.rejected.insert(type_url, format!("version {version}: {first}{}", if errors.len() > 1 { format!(" (and {} more)", errors.len() - 1) } else { String::new() })),
        };
        errors
    }

    /// Validates one resource and stores it; returns its name.
    fn accept(&self, type_url: &str, r: &Received<'_>, store: &mut Store) -> Result<String, Rejection> {
        if r.type_url != type_url {
            return Err((r.name.map(str::to_string), format!("resource of type {} in a {type_url} response", r.type_url)));
        }
        match type_url {
            LISTENER_TYPE => {
                let l = shared(&LISTENERS, r, "Listener", "name", listener::translate)?;
                let name = l.name.to_string();
                self.check_routes(&l.model, store).map_err(|e| (Some(name.clone()), format!("Listener '{name}': {e}")))?;
                Arc::make_mut(&mut store.listeners).insert(l);
                Ok(name)
            }
            ENDPOINT_TYPE => {
                let a = shared(&ASSIGNMENTS, r, "ClusterLoadAssignment", "cluster_name", |o| cluster::assignment(o).map(|(_, e)| e))?;
                let name = a.name.to_string();
                Arc::make_mut(&mut store.assignments).insert(a);
                Ok(name)
            }
            // Routes from RDS are not checked against clusters (Envoy's validate_clusters default for RDS).
            ROUTE_TYPE => {
                let rc = shared(&ROUTES, r, "RouteConfiguration", "name", |o| route::translate(o).map(Arc::new))?;
                let name = rc.name.to_string();
                Arc::make_mut(&mut store.routes).insert(rc);
                Ok(name)
            }
            // A secret that would not load is refused now, and the last good one keeps serving.
            SECRET_TYPE => {
                let s = shared(&SECRETS, r, "Secret", "name", |o| {
                    let secret = secret::translate(o)?;
                    crate::proxy::tls::check_secret(&secret).map_err(|e| crate::config::tree::ConfigError::new(secret.name.clone(), e.0))?;
                    Ok(secret)
                })?;
                let name = s.name.to_string();
                Arc::make_mut(&mut store.secrets).insert(s);
                Ok(name)
            }
            _ => {
                let c = shared(&CLUSTERS, r, "Cluster", "name", cluster::translate)?;
                let name = c.name.to_string();
                Arc::make_mut(&mut store.clusters).insert(c);
                Ok(name)
            }
        }
    }

    /// Inline route configurations must name existing clusters (`validate_clusters`).
    fn check_routes(&self, l: &Listener, store: &Store) -> Result<(), String> {
        let known = |c: &str| store.clusters.contains_key(c) || self.bootstrap.clusters.iter().any(|k| k.name == c);
        match l.inline_routes().filter(|rc| rc.validate_clusters).flat_map(RouteConfiguration::clusters).find(|c| !known(c)) {
            Some(c) => Err(format!("route: unknown cluster '{c}'")),
            None => Ok(()),
        }
    }

    /// Makes static + dynamic resources the running configuration; listeners that cannot bind are errors
    /// (and are dropped from the store so a later response can retry them).
    fn push(&self, store: &mut Store) -> Vec<String> {
        let proxy = match &self.sink {
            Sink::Proxy(proxy) => proxy,
            Sink::Pod(snapshot) => {
                snapshot.send_replace(Some(Arc::new(Snapshot {
                    listeners: Arc::clone(&store.listeners),
                    routes: Arc::clone(&store.routes),
                    clusters: Arc::clone(&store.clusters),
                    assignments: Arc::clone(&store.assignments),
                    secrets: Arc::clone(&store.secrets),
                    local: Arc::clone(&self.local),
                })));
                return Vec::new();
            }
        };
        let snapshot = Snapshot {
            listeners: Arc::new(self.static_listeners.iter().cloned().chain(store.listeners.values().cloned()).collect()),
            clusters: Arc::new(self.static_clusters.iter().cloned().chain(store.clusters.values().cloned()).collect()),
            routes: Arc::clone(&store.routes),
            assignments: Arc::clone(&store.assignments),
            secrets: Arc::new(self.static_secrets.iter().cloned().chain(store.secrets.values().cloned()).collect()),
            local: Arc::clone(&self.local),
        };
        proxy
            .apply(snapshot)
            .into_iter()
            .map(|(name, e)| {
                Arc::make_mut(&mut store.listeners).remove(&name);
                format!("Listener '{name}': {e}")
            })
            .collect()
    }
}

/// Churn: a stream that receives 10,000 distinct versions of its endpoints keeps one assignment, and the
/// process-wide sharing releases the versions no stream holds any more (memory is reported, the held count
/// asserted: the interner is shared with tests running alongside, so the bound leaves them room).
#[cfg(test)]
mod churn {
    use super::*;

    fn resident_kib() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4
    }

    #[test]
    fn ten_thousand_eds_versions_keep_memory_flat() {
        let (snapshot, _) = tokio::sync::watch::channel(None);
        let bootstrap = Bootstrap { node: Default::default(), admin: None, listeners: vec![], clusters: vec![], secrets: vec![], ads: None, raw: Value::Null };
        let state = XdsState::new(bootstrap, Sink::Pod(snapshot));
        let push = |version: u32| {
            let assignment = serde_json::json!({"cluster_name": "svc", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 1000 + version % 50_000}}}},
                {"endpoint": {"address": {"socket_address": {"address": "10.0.0.2", "port_value": 8080}}}}]}]});
            let bytes = codec::json_to_bytes("envoy.config.endpoint.v3.ClusterLoadAssignment", &assignment).unwrap();
            let received = [Received { name: None, version: "v", type_url: ENDPOINT_TYPE, bytes: &bytes }];
            assert!(state.apply(ENDPOINT_TYPE, &version.to_string(), &received, &[], false).is_empty());
        };
        push(0);
        let before = (resident_kib(), ASSIGNMENTS.held());
        for version in 1..=10_000 {
            push(version);
        }
        let after = (resident_kib(), ASSIGNMENTS.held());
        eprintln!("10,000 EDS versions: resident {} KiB before, {} KiB after; shared assignments held {} before, {} after", before.0, after.0, before.1, after.1);
        assert_eq!(state.store().assignments.len(), 1);
        assert!(after.1 < 1_000, "{} assignments still held after 10,000 versions", after.1);
    }

    /// An EDS update changes endpoints only: the listeners and the cluster (with its counters, outlier and
    /// round-robin state) are the same objects before and after.
    #[test]
    fn an_eds_update_rebuilds_nothing_else() {
        let (snapshot, _) = tokio::sync::watch::channel(None);
        let bootstrap = Bootstrap { node: Default::default(), admin: None, listeners: vec![], clusters: vec![], secrets: vec![], ads: None, raw: Value::Null };
        let state = XdsState::new(bootstrap, Sink::Pod(snapshot));
        let push = |type_url: &'static str, message: &str, v: serde_json::Value| {
            let bytes = codec::json_to_bytes(message, &v).unwrap();
            let received = [Received { name: None, version: "1", type_url, bytes: &bytes }];
            assert!(state.apply(type_url, "1", &received, &[], type_url != ENDPOINT_TYPE).is_empty());
        };
        let eds = |port: u32| serde_json::json!({"cluster_name": "svc", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "port_value": port}}}}]}]});
        push(CLUSTER_TYPE, "envoy.config.cluster.v3.Cluster", serde_json::json!({"name": "svc", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}}));
        push(LISTENER_TYPE, "envoy.config.listener.v3.Listener", serde_json::json!({"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
            "filter_chains": [{"filters": [{"name": "tcp", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "s", "cluster": "svc"}}]}]}));
        push(ENDPOINT_TYPE, "envoy.config.endpoint.v3.ClusterLoadAssignment", eds(8080));
        let (listeners, cluster) = { let s = state.store(); (Arc::clone(&s.listeners), Arc::clone(s.clusters.get("svc").unwrap())) };
        cluster.cursor.store(7, std::sync::atomic::Ordering::Relaxed);
        push(ENDPOINT_TYPE, "envoy.config.endpoint.v3.ClusterLoadAssignment", eds(9090));
        let s = state.store();
        assert!(Arc::ptr_eq(&listeners, &s.listeners), "the listeners were rebuilt");
        assert!(Arc::ptr_eq(&cluster, s.clusters.get("svc").unwrap()), "the cluster was rebuilt");
        assert_eq!(cluster.cursor.load(std::sync::atomic::Ordering::Relaxed), 7, "round robin carries on where it was");
        assert_eq!(s.assignments.get("svc").map(|a| a.model().hosts()), Some(vec!["10.0.0.1:9090".parse().unwrap()]));
    }
}

/// The regression corpus: what a real istiod sent the sidecars of `tests/istio/corpus/` (its
/// `/debug/config_dump` for each pod of the live-istiod suite, refreshed by `UPDATE_GOLDEN=1 cargo test -p
/// weft-tests --test istiod`) must be accepted whole, in xDS order (clusters, endpoints, listeners, routes).
#[cfg(test)]
mod istiod_corpus {
    use super::*;

    /// `(type URL, resources as proto3 JSON)` of one dump, in the order a sidecar receives them.
    fn resources(dump: &Value) -> Vec<(&'static str, Vec<Value>)> {
        let configs = dump["configs"].as_array().cloned().unwrap_or_default();
        let section = |dump_type: &str| configs.iter().find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(dump_type))).cloned().unwrap_or(Value::Null);
        let list = |v: &Value, key: &str, inner: &str| -> Vec<Value> {
            v[key].as_array().into_iter().flatten().map(|e| e[inner].clone()).filter(|r| !r.is_null()).collect()
        };
        let clusters = section("ClustersConfigDump");
        let listeners = section("ListenersConfigDump");
        let routes = section("RoutesConfigDump");
        let secrets = section("SecretsConfigDump");
        let endpoints = section("EndpointsConfigDump");
        vec![
            (CLUSTER_TYPE, list(&clusters, "dynamicActiveClusters", "cluster")),
            (ENDPOINT_TYPE, list(&endpoints, "dynamicEndpointConfigs", "endpointConfig")),
            (SECRET_TYPE, list(&secrets, "dynamicActiveSecrets", "secret")),
            (LISTENER_TYPE, listeners["dynamicListeners"].as_array().into_iter().flatten().map(|l| l["activeState"]["listener"].clone()).filter(|r| !r.is_null()).collect()),
            (ROUTE_TYPE, list(&routes, "dynamicRouteConfigs", "routeConfig")),
        ]
    }

    #[test]
    fn everything_istiod_sent_its_sidecars_is_accepted() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/istio/corpus");
        let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
        files.sort();
        assert!(!files.is_empty(), "no corpus in {}", dir.display());
        let mut problems = Vec::new();
        for file in files {
            let dump: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            let (snapshot, _) = tokio::sync::watch::channel(None);
            let bootstrap = Bootstrap { node: Default::default(), admin: None, listeners: vec![], clusters: vec![], secrets: vec![], ads: None, raw: Value::Null };
            let state = XdsState::new(bootstrap, Sink::Pod(snapshot));
            for (type_url, items) in resources(&dump) {
                let message = type_url.rsplit('/').next().unwrap();
                let encoded: Vec<Vec<u8>> = items
                    .iter()
                    .filter_map(|item| {
                        let mut item = item.clone();
                        item.as_object_mut().map(|o| o.remove("@type"));
                        codec::json_to_bytes(message, &item).map_err(|e| problems.push(format!("{}: {e}", file.display()))).ok()
                    })
                    .collect();
                let received: Vec<Received<'_>> = encoded.iter().map(|bytes| Received { name: None, version: "1", type_url, bytes }).collect();
                for e in state.apply(type_url, "1", &received, &[], true) {
                    problems.push(format!("{}: {e}", file.display()));
                }
            }
        }
        assert!(problems.is_empty(), "{} refusals:\n{}", problems.len(), problems.join("\n"));
    }
}
