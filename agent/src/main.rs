//! `weft-agent`: the node agent binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use weft_agent::admin::{self, Admin};
use weft_agent::capture::iptables::Variant;
use weft_agent::capture::{self, netns, RedirectMode};
use weft_agent::cni_server::registry::RegistryFile;
use weft_agent::cni_server::CniSocket;
use weft_agent::config::{self, AgentConfig, ConfigFile};
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
    Run(RunArgs),
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
    /// Redirection backend: iptables or nftables [default: iptables].
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
}

impl RunArgs {
    fn resolve(&self) -> Result<AgentConfig, String> {
        let file = match &self.config {
            Some(path) => ConfigFile::read(path)?,
            None => ConfigFile::default(),
        };
        let mut cfg = file.apply(AgentConfig::default())?;
        let flags = ConfigFile {
            cni_socket: self.cni_socket.clone(),
            state_dir: self.state_dir.clone(),
            redirect: self.redirect,
            iptables_variant: self.iptables_variant,
            admin_address: self.admin_address,
            log_level: None,
            connect_timeout_ms: None,
        };
        cfg = flags.apply(cfg)?;
        if let Some(level) = &self.log_level {
            cfg.log_level = config::parse_level(level).map_err(|e| format!("--log-level: {e}"))?;
        }
        Ok(cfg)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => match run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weft-agent: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run(args: RunArgs) -> Result<(), String> {
    let cfg = args.resolve()?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_max_level(cfg.log_level)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
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
    let redirector = capture::redirector(cfg.redirect, cfg.iptables_variant).map_err(|e| e.to_string())?;
    let registry = RegistryFile::new(&cfg.state_dir)
        .map_err(|e| format!("state dir {}: {e}", cfg.state_dir.display()))?;
    let settings = ProxySettings { connect_timeout: cfg.connect_timeout };
    let node = Arc::new(Node::new(Arc::from(redirector), registry, settings));
    let admin = Arc::new(Admin { node: Arc::clone(&node), ready: false.into() });
    let admin_listener = admin::bind(cfg.admin_address).map_err(|e| e.to_string())?;
    tokio::spawn(admin::serve(admin_listener, Arc::clone(&admin)));
    tracing::info!(redirect = %cfg.redirect, admin = %cfg.admin_address, state_dir = %cfg.state_dir.display(), "starting");

    let (adopted, dropped) = node.adopt().await?;
    tracing::info!(adopted, dropped, "pod registry reconciled");
    let socket = CniSocket::bind(&cfg.cni_socket).map_err(|e| format!("CNI socket {}: {e}", cfg.cni_socket.display()))?;
    let socket = Arc::new(socket);
    let server = tokio::spawn(Arc::clone(&socket).serve(Arc::clone(&node)));
    admin.ready.store(true, Ordering::Release);
    tracing::info!(socket = %cfg.cni_socket.display(), "ready");
    shutdown_signal().await;
    tracing::info!("shutting down; redirection rules stay in place so captured pods fail closed");
    server.abort();
    socket.remove_if_ours();
    Ok(())
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
