//! `weft-agent`: the node agent binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use weft_agent::status::AdminError;
use weft_agent::admin::{self, agent::Admin};
use weft_agent::capture::iptables::Variant;
use weft_agent::capture::{self, netns, RedirectMode};
use weft_agent::cni_server::registry::RegistryDir;
use weft_agent::cni_server::CniSocket;
use weft_agent::config::agent::{self as agent_config, AgentConfig, ConfigFile};
use weft_agent::node::Node;
use weft_agent::proxy::ProxySettings;

#[derive(Parser)]
#[command(name = "weft-agent", version, about = "weft node agent: captures pod traffic into the node proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: serve the CNI socket, capture pods, proxy their traffic.
    Run(Box<RunArgs>),
    /// Run the proxy alone from an Envoy v3 bootstrap file, as `envoy -c FILE` would.
    Proxy(ProxyArgs),
    /// Remove everything weft installed on this node: pods' rules, eBPF pins (which detaches the programs),
    /// the pod registry. Captured pods stop being captured.
    Cleanup(CleanupArgs),
    /// Install weft-cni into the node's CNI configuration: copy the binary into the CNI bin dir, insert weft's
    /// entry as the last plugin of the runtime's network config, and keep it there (until stopped, or --once).
    InstallCni(InstallCniArgs),
    /// Remove weft's entry from the node's CNI configuration and weft-cni from the CNI bin dir.
    UninstallCni(UninstallCniArgs),
    /// Show every captured pod of the running agent: capture mode, control-plane sync per type (with the
    /// reason of a rejected push), workload identity and certificate expiry, as `istioctl proxy-status`.
    Status(StatusArgs),
    /// Show one captured pod's configuration as `istioctl proxy-config` does: listeners, routes, clusters,
    /// endpoints, secrets (no key material) or bootstrap, as tables or as Envoy's JSON/YAML.
    Config(ConfigArgs),
    /// Explain what would happen to a connection or request a captured pod makes, step by step, from its live
    /// configuration (capture, listener and filter chain, mTLS, RBAC decisions, route, cluster, endpoints;
    /// into the destination pod when this agent serves it). Nothing is sent.
    Explain(ExplainArgs),
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// The pod, as <namespace>/<name>.
    pod: String,
    /// Where it connects: an address or a host its routes know, optionally with :port.
    destination: String,
    /// The port (when the destination has none).
    #[arg(long)]
    port: Option<u16>,
    /// Explain a plain TCP connection instead of an HTTP request.
    #[arg(long, conflicts_with_all = ["method", "path", "header"])]
    tcp: bool,
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// A request header, name=value (repeatable).
    #[arg(long)]
    header: Vec<String>,
    /// The agent's admin address (`weft-agent run --admin-address`).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_address: std::net::SocketAddr,
    /// Output: steps for people, or JSON for scripts.
    #[arg(short, long, value_enum, default_value = "table")]
    output: StatusOutput,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// The pod, as <namespace>/<name>.
    pod: String,
    /// What to show.
    #[arg(value_enum)]
    kind: weft_agent::pod_config::Kind,
    /// The agent's admin address (`weft-agent run --admin-address`).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_address: std::net::SocketAddr,
    /// Output: a table for people, or the resources as Envoy's JSON or YAML.
    #[arg(short, long, value_enum, default_value = "table")]
    output: weft_agent::pod_config::Output,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The agent's admin address (`weft-agent run --admin-address`).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_address: std::net::SocketAddr,
    /// Output: a table for people, or JSON for scripts.
    #[arg(short, long, value_enum, default_value = "table")]
    output: StatusOutput,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StatusOutput {
    Table,
    Json,
}

/// Where the host's CNI directories are (shared by `run`, `install-cni` and `uninstall-cni`).
#[derive(clap::Args)]
struct CniDirArgs {
    /// The host's CNI network config directory [default: /etc/cni/net.d].
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// The host's CNI plugin directory [default: /opt/cni/bin].
    #[arg(long)]
    cni_bin_dir: Option<PathBuf>,
}

/// What goes into weft's conflist entry, and which binary is copied.
#[derive(clap::Args)]
struct CniEntryArgs {
    /// The weft-cni binary to install [default: weft-cni beside this binary, then /usr/lib/weft/weft-cni].
    #[arg(long)]
    cni_binary: Option<PathBuf>,
    /// Namespaces weft-cni lets through without asking the agent, comma-separated ('' for none)
    /// [default: kube-system].
    #[arg(long, value_delimiter = ',')]
    cni_exclude_namespaces: Option<Vec<String>>,
    /// weft-cni's log file on the host [default: none, the runtime's log only].
    #[arg(long)]
    cni_log_file: Option<PathBuf>,
}

impl CniDirArgs {
    fn fill(&self, layer: ConfigFile) -> ConfigFile {
        ConfigFile { cni_conf_dir: self.cni_conf_dir.clone(), cni_bin_dir: self.cni_bin_dir.clone(), ..layer }
    }
}

impl CniEntryArgs {
    fn fill(&self, layer: ConfigFile) -> ConfigFile {
        // `--cni-exclude-namespaces ''` asks for an empty list.
        let namespaces = self.cni_exclude_namespaces.as_ref().map(|ns| ns.iter().filter(|n| !n.is_empty()).cloned().collect());
        ConfigFile {
            cni_binary: self.cni_binary.clone(),
            cni_exclude_namespaces: namespaces,
            cni_log_file: self.cni_log_file.clone(),
            ..layer
        }
    }
}

#[derive(clap::Args)]
struct InstallCniArgs {
    /// JSON config file (the same as for `run`); flags override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The agent's CNI socket as weft-cni reaches it [default: /var/run/weft/cni.sock].
    #[arg(long)]
    cni_socket: Option<PathBuf>,
    #[command(flatten)]
    dirs: CniDirArgs,
    #[command(flatten)]
    entry: CniEntryArgs,
    /// Install once and exit instead of watching the directories.
    #[arg(long)]
    once: bool,
    /// error, warn, info, debug or trace [default: info].
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(clap::Args)]
struct UninstallCniArgs {
    /// JSON config file (the same as for `run`).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    dirs: CniDirArgs,
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Envoy v3 bootstrap file, YAML or JSON (`.json`).
    #[arg(short = 'c', long = "config-path")]
    config_path: PathBuf,
    /// Worker threads, as Envoy's --concurrency [default: number of CPUs].
    #[arg(long)]
    concurrency: Option<usize>,
    /// error, warn, info, debug or trace [default: info].
    #[arg(short = 'l', long)]
    log_level: Option<String>,
    /// serve, or validate: check the configuration and exit (as Envoy's --mode validate).
    #[arg(long, default_value = "serve")]
    mode: ProxyMode,
    /// How long connections of a removed or replaced listener may go on, in seconds (Envoy's --drain-time-s).
    #[arg(long, default_value_t = 600)]
    drain_time_s: u64,
    /// The workload identity the proxy presents (spiffe://<trust domain>/ns/<ns>/sa/<sa>): its certificate,
    /// issued by --ca, and the CA's root serve the SDS names `default` and `ROOTCA`.
    #[arg(long, requires = "ca")]
    identity: Option<String>,
    #[command(flatten)]
    ca: CaArgs,
}

/// Where workload certificates come from (shared by `run` and `proxy`).
#[derive(clap::Args)]
struct CaArgs {
    /// Where certificates come from: istiod, file or none [default: none].
    #[arg(long)]
    ca: Option<String>,
    /// istiod's secured address, host:port (--ca istiod), e.g. istiod.istio-system.svc:15012.
    #[arg(long)]
    ca_address: Option<String>,
    /// CA certificate PEM file (--ca file).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// CA private key PEM file (--ca file).
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// Validity requested for each workload certificate, in seconds [default: 86400].
    #[arg(long)]
    cert_lifetime_s: Option<u64>,
    /// istiod's root certificate PEM file (--ca istiod, --xds-tls).
    #[arg(long)]
    istiod_root_cert: Option<PathBuf>,
    /// The agent's own token, sent as bearer credential to istiod [default: /var/run/secrets/tokens/istio-token].
    #[arg(long)]
    istiod_token_file: Option<PathBuf>,
    /// The name istiod's certificate is checked against [default: istiod.istio-system.svc].
    #[arg(long)]
    istiod_server_name: Option<String>,
    /// Cluster id sent to istiod (xDS node metadata CLUSTER_ID, CA header ClusterID) [default: Kubernetes].
    #[arg(long)]
    cluster_id: Option<String>,
}

impl CaArgs {
    /// These flags as a configuration layer.
    fn layer(&self) -> ConfigFile {
        ConfigFile {
            ca: self.ca.clone(),
            ca_address: self.ca_address.clone(),
            ca_cert: self.ca_cert.clone(),
            ca_key: self.ca_key.clone(),
            cert_lifetime_s: self.cert_lifetime_s,
            istiod_root_cert: self.istiod_root_cert.clone(),
            istiod_token_file: self.istiod_token_file.clone(),
            istiod_server_name: self.istiod_server_name.clone(),
            cluster_id: self.cluster_id.clone(),
            ..ConfigFile::default()
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProxyMode {
    Serve,
    Validate,
}

#[derive(clap::Args)]
struct CleanupArgs {
    /// JSON config file (the same as for `run`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory of the persisted pod registry [default: /var/run/weft].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// bpffs directory of the eBPF pins [default: /sys/fs/bpf/weft].
    #[arg(long)]
    bpf_pin_path: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// JSON config file; flags override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unix socket weft-cni connects to [default: /var/run/weft/cni.sock].
    #[arg(long)]
    cni_socket: Option<PathBuf>,
    /// Directory for the persisted pod registry [default: /var/run/weft].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Redirection backend: iptables, nftables or ebpf [default: iptables].
    #[arg(long)]
    redirect: Option<RedirectMode>,
    /// iptables implementation: auto, legacy or nft [default: auto].
    #[arg(long)]
    iptables_variant: Option<Variant>,
    /// Admin/status HTTP address [default: 127.0.0.1:15000].
    #[arg(long)]
    admin_address: Option<SocketAddr>,
    /// error, warn, info, debug or trace [default: info].
    #[arg(long)]
    log_level: Option<String>,
    /// Proxy worker threads [default: number of CPUs].
    #[arg(long)]
    concurrency: Option<usize>,
    /// eBPF object (ebpf mode) [default: weft-ebpf beside this binary, then /usr/lib/weft/weft-ebpf].
    #[arg(long)]
    ebpf_object: Option<PathBuf>,
    /// bpffs directory for pinned maps and links (ebpf mode) [default: /sys/fs/bpf/weft].
    #[arg(long)]
    bpf_pin_path: Option<PathBuf>,
    /// Sockmap fast path between apps and the proxy (ebpf mode; see the README for the kernel caveat)
    /// [default: false].
    #[arg(long)]
    sockmap: Option<bool>,
    /// How long a stopping agent lets established connections finish, in ms [default: 30000].
    #[arg(long)]
    drain_timeout_ms: Option<u64>,
    /// The control plane (istiod's plaintext xDS, e.g. 10.0.0.10:15010, or its secured 15012 with
    /// --xds-tls) each captured pod gets a stream to.
    #[arg(long)]
    xds_address: Option<SocketAddr>,
    /// xDS over istiod's secured port: TLS verified against --istiod-root-cert, the --istiod-token-file
    /// token as bearer credential [default: false].
    #[arg(long)]
    xds_tls: Option<bool>,
    /// SPIFFE trust domain of the pods' identities [default: cluster.local].
    #[arg(long)]
    trust_domain: Option<String>,
    #[command(flatten)]
    ca: CaArgs,
    /// sotw or delta [default: sotw].
    #[arg(long)]
    xds_api: Option<String>,
    /// Worker threads of each captured pod's own share of the proxy [default: 2].
    #[arg(long)]
    pod_workers: Option<usize>,
    /// The Kubernetes node this agent runs on (the DaemonSet passes spec.nodeName): turns on the pod watch, so
    /// capture follows Istio's labels and each pod gets its own identity and metadata.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// kubeconfig file for the Kubernetes API [default: in-cluster credentials].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Install weft-cni at start-up and keep its entry in the node's CNI config (as `install-cni` does)
    /// [default: false].
    #[arg(long)]
    install_cni: Option<bool>,
    #[command(flatten)]
    cni_dirs: CniDirArgs,
    #[command(flatten)]
    cni_entry: CniEntryArgs,
    /// Kubelet probe exemption: the link-local IPv4 source address the node's connections to captured pods'
    /// probe ports get, let through in the pod; or `off` [default: 169.254.7.127].
    #[arg(long)]
    probe_snat: Option<String>,
    /// Each captured pod answers on 15021 (/healthz/ready) and 15020 (/healthz/ready, /stats/prometheus) as its
    /// Istio sidecar did [default: true].
    #[arg(long)]
    pod_health_ports: Option<bool>,
}

impl RunArgs {
    fn resolve(&self) -> Result<AgentConfig, String> {
        let file = match &self.config {
            Some(path) => ConfigFile::read(path)?,
            None => ConfigFile::default(),
        };
        let flags = ConfigFile {
            cni_socket: self.cni_socket.clone(),
            state_dir: self.state_dir.clone(),
            redirect: self.redirect,
            iptables_variant: self.iptables_variant,
            admin_address: self.admin_address,
            log_level: None,
            connect_timeout_ms: None,
            ebpf_object: self.ebpf_object.clone(),
            bpf_pin_path: self.bpf_pin_path.clone(),
            sockmap: self.sockmap,
            drain_timeout_ms: self.drain_timeout_ms,
            xds_address: self.xds_address,
            xds_api: self.xds_api.clone(),
            mesh_id: None,
            istio_version: None,
            pod_workers: self.pod_workers,
            pod_limits: None,
            node_max_connections: None,
            node_max_requests: None,
            trust_domain: self.trust_domain.clone(),
            xds_tls: self.xds_tls,
            node_name: self.node_name.clone(),
            kubeconfig: self.kubeconfig.clone(),
            install_cni: self.install_cni,
            probe_snat: self.probe_snat.clone(),
            pod_health_ports: self.pod_health_ports,
            ..self.cni_dirs.fill(self.cni_entry.fill(self.ca.layer()))
        };
        // One layer, so settings that belong together (a CA's) may come partly from each.
        let mut cfg = flags.or(file).apply(AgentConfig::default())?;
        if let Some(level) = &self.log_level {
            cfg.log_level = agent_config::parse_level(level).map_err(|e| format!("--log-level: {e}"))?;
        }
        Ok(cfg)
    }
}

/// glibc gives threads malloc arenas of their own, up to 8 per CPU; with every pod on threads of its own,
/// memory freed on one pod's threads would sit in arenas the others never reuse. Two arenas keep the pods'
/// configuration as compact as when one thread pool served them all.
fn cap_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Every proxied connection costs the agent two descriptors per side it crosses (downstream and upstream), for
/// all pods of the node: the soft limit (often 1,024) would refuse connections long before the node's
/// connection limits do, so it is raised to the hard limit the container runtime granted.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "open file limit raised"),
            Err(e) => tracing::warn!(soft, hard, "cannot raise the open file limit: {e}"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open file limit: {e}"),
    }
}

fn main() -> ExitCode {
    cap_malloc_arenas();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Cleanup(args) => cleanup(args),
        Command::Proxy(args) => proxy(args),
        Command::InstallCni(args) => install_cni(args),
        Command::UninstallCni(args) => uninstall_cni(args),
        Command::Status(args) => status(args),
        Command::Config(args) => pod_config(args),
        Command::Explain(args) => explain(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(args: StatusArgs) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let status = runtime.block_on(weft_agent::status::fetch(args.admin_address))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    print!("{}", match args.output {
        StatusOutput::Table => weft_agent::status::table(&status, now),
        StatusOutput::Json => weft_agent::status::json(&status),
    });
    Ok(())
}

fn explain(args: ExplainArgs) -> Result<(), String> {
    let (namespace, name) = weft_agent::pod_config::pod_name(&args.pod)?;
    let (to, port) = match (args.destination.rsplit_once(':'), args.port) {
        (_, Some(port)) => (args.destination.clone(), port),
        (Some((host, port)), None) => (host.to_string(), port.parse::<u16>().map_err(|_| format!("'{}': the port after ':' is not a number", args.destination))?),
        (None, None) => return Err(format!("'{}' has no port: write host:port or give --port", args.destination)),
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("to", &to).append_pair("port", &port.to_string());
    if args.tcp {
        query.append_pair("tcp", "1");
    } else {
        query.append_pair("method", &args.method).append_pair("path", &args.path);
        for h in &args.header {
            let (k, v) = h.split_once('=').ok_or_else(|| format!("--header {h}: write name=value"))?;
            query.append_pair("header", &format!("{k}:{v}"));
        }
    }
    let path = format!("/pods/{namespace}/{name}/explain?{}", query.finish());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let answer = runtime.block_on(weft_agent::status::fetch_json(args.admin_address, &path)).map_err(|e| match e {
        AdminError::Refused { body, .. } => format!("cannot explain: {body}"),
        other => other.to_string(),
    })?;
    match args.output {
        StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&answer).unwrap_or_default()),
        StatusOutput::Table => {
            let explanation: weft_agent::explain::Explanation = serde_json::from_value(answer).map_err(|e| format!("the agent's explanation: {e}"))?;
            print!("{}", weft_agent::explain::text(&explanation));
        }
    }
    Ok(())
}

fn pod_config(args: ConfigArgs) -> Result<(), String> {
    use weft_agent::pod_config::{self, Fetched};
    let (namespace, name) = pod_config::pod_name(&args.pod)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let fetch = |path: String| runtime.block_on(weft_agent::status::fetch_json(args.admin_address, &path));
    let dump = fetch(format!("/pods/{namespace}/{name}/config_dump?include_eds")).map_err(|e| match e {
        AdminError::Refused { status: hyper::StatusCode::NOT_FOUND, .. } => format!("pod {namespace}/{name} has no configuration in this agent: it is not captured, or gets no control-plane configuration (`weft-agent status` lists the captured pods)"),
        other => other.to_string(),
    })?;
    let status = fetch("/status".into()).map_err(|e| e.to_string())?;
    print!("{}", pod_config::render(&Fetched { dump, status }, &args.pod, args.kind, args.output)?);
    Ok(())
}

fn proxy(args: ProxyArgs) -> Result<(), String> {
    let level = match &args.log_level {
        Some(l) => agent_config::parse_level(l).map_err(|e| format!("--log-level: {e}"))?,
        None => tracing::Level::INFO,
    };
    let shown = args.config_path.display().to_string();
    let bootstrap = weft_agent::config::bootstrap::load(&args.config_path)
        .map_err(|e| format!("error initializing configuration '{shown}': {e}"))?;
    if matches!(args.mode, ProxyMode::Validate) {
        println!("configuration '{shown}' OK");
        return Ok(());
    }
    init_logging(level);
    raise_open_file_limit();
    let concurrency = args.concurrency.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(concurrency)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    // The CA's channel is made on the runtime.
    let identity = {
        let _in_runtime = runtime.enter();
        proxy_identity(&args)?
    };
    runtime.block_on(async move {
        let proxy = weft_agent::proxy::server::Proxy::new(std::time::Duration::from_secs(args.drain_time_s));
        // Kept for the process's life: the identity is renewed while someone holds it.
        let _identity = identity.map(|(manager, id)| {
            let subscription = manager.subscribe(id);
            let pods = Arc::clone(&proxy);
            let watch = subscription.receiver();
            tokio::spawn(async move { pods.tls().follow(watch).await });
            subscription
        });
        let quit = Arc::new(tokio::sync::Notify::new());
        let admin_address = bootstrap.admin;
        let xds = weft_agent::xds::XdsState::new(bootstrap, weft_agent::xds::Sink::Proxy(Arc::clone(&proxy)));
        // All or nothing at start-up: a port in use fails it, as in Envoy.
        if let Some(e) = xds.start().into_iter().next() {
            return Err(e);
        }
        if xds.bootstrap().ads.is_some() {
            tokio::spawn(weft_agent::xds::client::run(Arc::clone(&xds)));
        }
        if let Some(addr) = admin_address {
            let listener = admin::bind(addr).map_err(|e| e.to_string())?;
            let routes = admin::envoy::EnvoyAdmin {
                xds,
                proxy: Arc::clone(&proxy),
                config_path: shown,
                concurrency,
                started: std::time::SystemTime::now(),
                quit: Arc::clone(&quit),
            };
            tokio::spawn(admin::serve(listener, Arc::new(routes) as Arc<dyn admin::Routes>));
        }
        tracing::info!("all listeners started");
        tokio::spawn(reopen_access_logs_on_sigusr1());
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = quit.notified() => {}
        }
        tracing::info!("exiting");
        Ok(())
    })
}

/// The standalone proxy's identity and the CA that issues it (istiod's, by impersonation, or a file CA).
fn proxy_identity(args: &ProxyArgs) -> Result<Option<(Arc<weft_agent::identity::manager::IdentityManager>, weft_agent::identity::SpiffeId)>, String> {
    let Some(identity) = &args.identity else { return Ok(None) };
    let id: weft_agent::identity::SpiffeId = identity.parse().map_err(|e| format!("--identity: {e}"))?;
    let layer = ConfigFile { trust_domain: Some(id.trust_domain().to_string()), ..args.ca.layer() };
    let settings = layer.apply(AgentConfig::default())?.identity;
    let manager = weft_agent::identity::manager(&settings)?.ok_or("--identity needs --ca istiod or --ca file")?;
    Ok(Some((manager, id)))
}

fn cleanup(args: CleanupArgs) -> Result<(), String> {
    let file = match &args.config {
        Some(path) => ConfigFile::read(path)?,
        None => ConfigFile::default(),
    };
    let mut cfg = file.apply(AgentConfig::default())?;
    if let Some(dir) = args.state_dir {
        cfg.state_dir = dir;
    }
    if let Some(pins) = args.bpf_pin_path {
        cfg.ebpf.pin_path = pins;
    }
    let report = weft_agent::node::cleanup(&cfg)?;
    println!("{report}");
    Ok(())
}

fn read_config(path: &Option<PathBuf>) -> Result<ConfigFile, String> {
    match path {
        Some(path) => ConfigFile::read(path),
        None => Ok(ConfigFile::default()),
    }
}

fn install_cni(args: InstallCniArgs) -> Result<(), String> {
    let flags = ConfigFile { cni_socket: args.cni_socket.clone(), ..args.dirs.fill(args.entry.fill(ConfigFile::default())) };
    let cfg = flags.or(read_config(&args.config)?).apply(AgentConfig::default())?;
    let level = match &args.log_level {
        Some(l) => agent_config::parse_level(l).map_err(|e| format!("--log-level: {e}"))?,
        None => cfg.log_level,
    };
    init_logging(level);
    let installer = weft_agent::cni_install::Installer::new(&cfg.cni_install, &cfg.cni_socket)?;
    installer.prepare()?;
    if args.once {
        let applied = installer.ensure_config()?.ok_or_else(|| {
            format!("no CNI network config in {} to chain weft-cni into (the primary CNI writes one)", installer.conf_dir().display())
        })?;
        println!("weft-cni is the last plugin of {} ({:?})", applied.file.display(), applied.change);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        tokio::select! {
            watched = weft_agent::cni_install::watch::run(installer) => watched,
            // Stopping leaves weft's entry and binary in place: only uninstall-cni removes them.
            _ = shutdown_signal() => Ok(()),
        }
    })
}

fn uninstall_cni(args: UninstallCniArgs) -> Result<(), String> {
    let cfg = args.dirs.fill(ConfigFile::default()).or(read_config(&args.config)?).apply(AgentConfig::default())?;
    let installer = weft_agent::cni_install::Installer::new(&cfg.cni_install, &cfg.cni_socket)?;
    println!("{}", installer.uninstall()?);
    Ok(())
}

/// Also installs the `log` bridge, through which the eBPF programs' aya-log records arrive.
fn init_logging(level: tracing::Level) {
    weft_agent::logging::init(level);
}

fn run(args: RunArgs) -> Result<(), String> {
    let cfg = args.resolve()?;
    init_logging(cfg.log_level);
    raise_open_file_limit();
    // Before any thread exists: every thread that enters a pod netns comes back to this one.
    netns::init_host_netns().map_err(|e| format!("cannot open the agent's network namespace: {e}"))?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.concurrency {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime.enable_all().build().map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(serve(cfg))
}

async fn serve(cfg: AgentConfig) -> Result<(), String> {
    // First, so a CA that cannot be set up fails start-up before anything is installed on the node. The pods'
    // TLS subscribes to it per pod (namespace, service account).
    let identity = weft_agent::identity::manager(&cfg.identity)?;
    let redirector =
        capture::redirector(cfg.redirect, cfg.iptables_variant, &cfg.ebpf, cfg.probe_source).map_err(|e| e.to_string())?;
    let registry = RegistryDir::new(&cfg.state_dir)
        .map_err(|e| format!("state dir {}: {e}", cfg.state_dir.display()))?;
    let settings = ProxySettings {
        connect_timeout: cfg.connect_timeout,
        drain_timeout: cfg.drain_timeout,
        pod_workers: cfg.pod_workers,
        pod_limits: cfg.pod_limits,
        node_max_connections: cfg.node_max_connections,
        node_max_requests: cfg.node_max_requests,
        pod_health_ports: cfg.pod_health_ports,
    };
    let xds = cfg.xds.clone().map(weft_agent::xds::pod::PodXds::new).transpose().map_err(|e| format!("xds_address: {e}"))?;
    let mut node = Node::new(Arc::from(redirector), registry, settings, xds);
    if let Some(kube) = cfg.kube.clone() {
        tracing::info!(node = %kube.node_name, "watching the node's pods in the Kubernetes API");
        node = node.with_kube(weft_agent::k8s::KubeView::start(kube).await?, identity.clone());
    }
    if let Some(source) = cfg.probe_source {
        let probes = capture::probes::HostProbes::new(cfg.redirect, cfg.iptables_variant, source, None)
            .map_err(|e| format!("probe_snat: {e}"))?;
        node = node.with_host_probes(probes);
    }
    let node = Arc::new(node);
    let admin = Arc::new(Admin { node: Arc::clone(&node), ready: false.into(), started: std::time::SystemTime::now(), identity });
    let admin_listener = admin::bind(cfg.admin_address).map_err(|e| e.to_string())?;
    tokio::spawn(admin::serve(admin_listener, Arc::clone(&admin) as Arc<dyn admin::Routes>));
    tracing::info!(redirect = %cfg.redirect, admin = %cfg.admin_address, state_dir = %cfg.state_dir.display(), "starting");

    let (adopted, dropped) = node.adopt().await?;
    tracing::info!(adopted, dropped, "pod registry reconciled");
    node.prepare_next_pod();
    tokio::spawn(Arc::clone(&node).follow_kube());
    // The binary goes in first (harmless without an entry naming it); a failure stops start-up here.
    let cni_installer = match cfg.cni_install.enabled {
        true => {
            let installer = weft_agent::cni_install::Installer::new(&cfg.cni_install, &cfg.cni_socket)?;
            installer.prepare()?;
            Some(installer)
        }
        false => None,
    };
    let socket = CniSocket::bind(&cfg.cni_socket).map_err(|e| format!("CNI socket {}: {e}", cfg.cni_socket.display()))?;
    let socket = Arc::new(socket);
    let server = tokio::spawn(Arc::clone(&socket).serve(Arc::clone(&node)));
    // Once the socket answers, so the pods the runtime sends through weft-cni find the agent.
    if let Some(installer) = cni_installer {
        tokio::spawn(async move {
            if let Err(e) = weft_agent::cni_install::watch::run(installer).await {
                tracing::error!("the CNI installer stopped: {e}");
            }
        });
    }
    admin.ready.store(true, Ordering::Release);
    tokio::spawn(reopen_access_logs_on_sigusr1());
    tracing::info!(socket = %cfg.cni_socket.display(), "ready");
    shutdown_signal().await;
    tracing::info!("shutting down; redirection rules stay in place so captured pods fail closed");
    server.abort();
    socket.remove_if_ours();
    drain(&node, cfg.drain_timeout).await;
    Ok(())
}

/// Stops accepting (a newer agent's listeners take the new connections) and lets established connections
/// finish, up to `timeout`.
async fn drain(node: &Node, timeout: std::time::Duration) {
    node.stop_listening().await;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Registered before counting, so a close between the count and the wait is not missed.
        let closed = weft_agent::proxy::stats::CONNECTION_CLOSED.notified();
        tokio::pin!(closed);
        closed.as_mut().enable();
        let active = node.active_connections().await;
        if active == 0 {
            return;
        }
        if tokio::time::timeout_at(deadline, closed).await.is_err() {
            tracing::warn!(active, "drain timeout reached; closing remaining connections");
            return;
        }
    }
}

/// `SIGUSR1` reopens the access log files, as Envoy's does (log rotation renames them, then signals).
async fn reopen_access_logs_on_sigusr1() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else { return };
    while usr1.recv().await.is_some() {
        tracing::info!("SIGUSR1: reopening access log files");
        weft_agent::proxy::access_log::reopen();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
