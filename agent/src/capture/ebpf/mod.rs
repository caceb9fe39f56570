//! The `ebpf` backend: outbound capture at `connect()` time by cgroup programs, `SO_ORIGINAL_DST` answered
//! from a map, and a sockmap fast path between a pod's app and the proxy. Inbound capture keeps the nftables
//! `prerouting` rule (traffic from other nodes arrives as packets, not as connects; a tc program would redo
//! what one nftables rule already does at the same hook).
//!
//! State lives under the pin path (default `/sys/fs/bpf/weft/v<PIN_VERSION>/`): maps pinned by name and one
//! pinned bpf_link per cgroup hook. A killed agent leaves it all in place, so captured pods keep being
//! redirected to their (now closed) listeners and fail closed; the next agent reuses the pinned maps and links
//! instead of attaching again.

mod bpf_sys;

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use aya::programs::SkMsg;
use aya::{Ebpf as Loaded, EbpfLoader};
use weft_ebpf_common::{PodPolicy, SockKey, MAP_POLICIES, MAP_SOCKS, PIN_VERSION, POLICY_SOCKMAP};

use self::bpf_sys::AttachType;
use super::netns::Netns;
use super::nftables::Nftables;
use super::{CaptureError, Redirector, RedirectMode, OUTBOUND_PORT};

/// Where the eBPF backend finds its object and keeps its pins.
#[derive(Debug, Clone, PartialEq)]
pub struct EbpfSettings {
    /// The compiled programs (`cargo xtask build-ebpf`); `None` looks beside the agent binary, then in
    /// `/usr/lib/weft/`.
    pub object: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    pub pin_path: PathBuf,
    /// Put captured pods' loopback sockets in the sockhash (app ⇄ proxy without the TCP stack). Off by
    /// default: on the kernels we test (6.18), a socket in a sockmap can return EAGAIN from a *blocking*
    /// `recv()` when it is woken without data (e.g. by its own send side or a FIN), which breaks applications
    /// that read with blocking sockets. Applications on non-blocking I/O (Go, Java NIO, tokio, Node, Envoy)
    /// retry and are unaffected.
    pub sockmap: bool,
}

impl Default for EbpfSettings {
    fn default() -> Self {
        EbpfSettings { object: None, pin_path: "/sys/fs/bpf/weft".into(), sockmap: false }
    }
}

/// The cgroup programs, their hooks, and their pin names.
const CGROUP_PROGRAMS: [(&str, AttachType); 4] = [
    ("weft_connect4", AttachType::Inet4Connect),
    ("weft_connect6", AttachType::Inet6Connect),
    ("weft_getsockopt", AttachType::GetSockopt),
    ("weft_sockops", AttachType::SockOps),
];

pub struct Ebpf {
    /// Keeps the loaded programs and maps open for the agent's lifetime.
    _loaded: Mutex<Loaded>,
    policies: Mutex<BpfHashMap<MapData, u64, PodPolicy>>,
    socks: Mutex<SockHash<MapData, SockKey>>,
    inbound: Nftables,
    policy: PodPolicy,
    /// Hooks whose pinned link was found and reused, for the start-up log and the status endpoint.
    pub adopted: Vec<&'static str>,
    pins: PathBuf,
}

impl Ebpf {
    /// Checks the kernel, mounts bpffs and cgroup2 where missing, loads the programs, and attaches them to
    /// the cgroup v2 root — or adopts the links a previous agent pinned.
    pub fn start(settings: &EbpfSettings) -> Result<Ebpf, CaptureError> {
        preflight()?;
        let object = find_object(settings.object.as_deref())?;
        let cgroup = cgroup2_root()?;
        let pins = settings.pin_path.join(format!("v{PIN_VERSION}"));
        fs::create_dir_all(pins.join("links")).map_err(|e| err(format!("creating {}", pins.display()), e))?;
        let mut loaded = EbpfLoader::new()
            .map_pin_path(&pins)
            .load_file(&object)
            .map_err(|e| err(format!("loading {}", object.display()), e))?;
        let cgroup_dir = fs::File::open(&cgroup).map_err(|e| err(format!("opening cgroup {}", cgroup.display()), e))?;
        let mut adopted = Vec::new();
        for (name, attach) in CGROUP_PROGRAMS {
            let pin = pins.join("links").join(name);
            if bpf_sys::obj_get(&pin).is_ok() {
                adopted.push(name);
                continue;
            }
            let prog_fd = load_cgroup_program(&mut loaded, name)?;
            let link = bpf_sys::link_create(prog_fd.as_fd(), cgroup_dir.as_fd(), attach)
                .map_err(|e| err(format!("attaching {name} to {}", cgroup.display()), e))?;
            bpf_sys::obj_pin(link.as_fd(), &pin).map_err(|e| err(format!("pinning {}", pin.display()), e))?;
        }
        let socks = attach_sk_msg(&mut loaded)?;
        start_logs(&mut loaded, &pins);
        remove_old_versions(&settings.pin_path);
        let policies = loaded.take_map(MAP_POLICIES).ok_or_else(|| CaptureError(format!("{MAP_POLICIES} missing")))?;
        let policies = BpfHashMap::try_from(policies).map_err(|e| err(MAP_POLICIES.into(), e))?;
        let policy = PodPolicy {
            outbound_port: OUTBOUND_PORT.into(),
            flags: if settings.sockmap { POLICY_SOCKMAP } else { 0 },
            ..PodPolicy::default()
        };
        Ok(Ebpf {
            _loaded: Mutex::new(loaded),
            policies: Mutex::new(policies),
            socks: Mutex::new(socks),
            inbound: Nftables::detect_inbound_only()?,
            policy,
            adopted,
            pins,
        })
    }

    fn policies(&self) -> std::sync::MutexGuard<'_, BpfHashMap<MapData, u64, PodPolicy>> {
        self.policies.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Redirector for Ebpf {
    fn mode(&self) -> RedirectMode {
        RedirectMode::Ebpf
    }

    /// Enrols the pod's netns (connects are redirected from now on), then installs the inbound rule.
    fn install(&self, ns: &Netns) -> Result<(), CaptureError> {
        let cookie = netns_cookie(ns)?;
        self.policies().insert(cookie, self.policy, 0).map_err(|e| err("enrolling the pod".into(), e))?;
        self.inbound.install(ns)
    }

    fn verify(&self, ns: &Netns) -> Result<(), CaptureError> {
        let cookie = netns_cookie(ns)?;
        match self.policies().get(&cookie, 0) {
            Ok(p) if p == self.policy => {}
            Ok(_) => return Err(CaptureError("the pod's eBPF enrolment differs from this agent's policy".into())),
            Err(_) => return Err(CaptureError("the pod is not enrolled in the eBPF capture map".into())),
        }
        self.inbound.verify(ns)
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "pins": self.pins,
            "adopted_links": self.adopted,
            "sockmap": self.policy.flags & POLICY_SOCKMAP != 0,
            "sockhash_entries": self.socks.lock().map(|m| m.keys().count()).unwrap_or(0),
        })
    }

    fn remove(&self, ns: &Netns) -> Result<(), CaptureError> {
        let cookie = netns_cookie(ns)?;
        let _ = self.policies().remove(&cookie);
        self.inbound.remove(ns)
    }
}

fn err(what: String, e: impl std::fmt::Display) -> CaptureError {
    CaptureError(format!("eBPF: {what}: {e}"))
}

/// What eBPF mode needs from the kernel: BTF, bpffs and cgroup v2 (both mounted here if missing).
fn preflight() -> Result<(), CaptureError> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(CaptureError(
            "eBPF mode needs a kernel with BTF (/sys/kernel/btf/vmlinux is missing); use --redirect iptables or nftables".into(),
        ));
    }
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    if fs_magic("/sys/fs/bpf") != Some(BPF_FS_MAGIC) {
        mount("bpf", "/sys/fs/bpf", "bpf")?;
    }
    Ok(())
}

#[allow(clippy::unnecessary_cast)]
fn fs_magic(path: &str) -> Option<i64> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

fn mount(source: &str, target: &str, fstype: &str) -> Result<(), CaptureError> {
    fs::create_dir_all(target).map_err(|e| err(format!("creating {target}"), e))?;
    let c = |s: &str| std::ffi::CString::new(s).map_err(|e| err("mount argument".into(), e));
    let (src, tgt, typ) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    if unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), typ.as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(err(format!("mounting {fstype} on {target}"), io::Error::last_os_error()));
    }
    Ok(())
}

/// The root of the cgroup v2 hierarchy, from the agent's mount table; mounted under /run/weft if absent.
fn cgroup2_root() -> Result<PathBuf, CaptureError> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").map_err(|e| err("reading mountinfo".into(), e))?;
    // Fields: id parent major:minor root mountpoint options ... - fstype source superoptions
    let found = mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        (right.split(' ').next() == Some("cgroup2") && fields.get(3) == Some(&"/")).then(|| PathBuf::from(fields[4]))
    });
    match found {
        Some(p) => Ok(p),
        None => {
            mount("none", "/run/weft/cgroup2", "cgroup2")?;
            Ok("/run/weft/cgroup2".into())
        }
    }
}

fn find_object(configured: Option<&Path>) -> Result<PathBuf, CaptureError> {
    let beside_binary = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("weft-ebpf")));
    let candidates: Vec<PathBuf> = match configured {
        Some(p) => vec![p.to_path_buf()],
        None => beside_binary.into_iter().chain([PathBuf::from("/usr/lib/weft/weft-ebpf")]).collect(),
    };
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        CaptureError(format!(
            "eBPF object not found (looked at {}): build it with `cargo xtask build-ebpf` or pass --ebpf-object",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ))
    })
}

fn load_cgroup_program(loaded: &mut Loaded, name: &str) -> Result<aya::programs::ProgramFd, CaptureError> {
    use aya::programs::Program;
    let refused = |e: aya::programs::ProgramError| err(format!("the kernel refused program {name}"), e);
    let fd = match loaded.program_mut(name) {
        Some(Program::CgroupSockAddr(p)) => {
            p.load().map_err(refused)?;
            p.fd().map_err(refused)?.try_clone()
        }
        Some(Program::CgroupSockopt(p)) => {
            p.load().map_err(refused)?;
            p.fd().map_err(refused)?.try_clone()
        }
        Some(Program::SockOps(p)) => {
            p.load().map_err(refused)?;
            p.fd().map_err(refused)?.try_clone()
        }
        _ => return Err(CaptureError(format!("eBPF object has no cgroup program {name}"))),
    };
    fd.map_err(|e| err(format!("duplicating the fd of {name}"), e))
}

/// Attaches the sk_msg program to the sockhash. The attachment belongs to the (pinned) map, not to the agent,
/// so it outlives a killed agent; attaching again replaces it rather than adding a second one.
fn attach_sk_msg(loaded: &mut Loaded) -> Result<SockHash<MapData, SockKey>, CaptureError> {
    let socks: SockHash<MapData, SockKey> = SockHash::try_from(
        loaded.take_map(MAP_SOCKS).ok_or_else(|| CaptureError(format!("{MAP_SOCKS} missing")))?,
    )
    .map_err(|e| err(MAP_SOCKS.into(), e))?;
    let fd = socks.fd().try_clone().map_err(|e| err("sockhash fd".into(), e))?;
    let program: &mut SkMsg = loaded
        .program_mut("weft_sk_msg")
        .ok_or_else(|| CaptureError("eBPF object has no program weft_sk_msg".into()))?
        .try_into()
        .map_err(|e| err("weft_sk_msg".into(), e))?;
    program.load().map_err(|e| err("the kernel refused program weft_sk_msg".into(), e))?;
    let link = program.attach(&fd).map_err(|e| err("attaching weft_sk_msg".into(), e))?;
    let link = program.take_link(link).map_err(|e| err("weft_sk_msg link".into(), e))?;
    // Dropping the link would detach it; it must stay with the map.
    std::mem::forget(link);
    Ok(socks)
}

/// Forwards the programs' aya-log records to the agent's log. Programs adopted from pins log through their
/// own (older) log map, read here by program id.
fn start_logs(loaded: &mut Loaded, pins: &Path) {
    let adopted_id = bpf_sys::obj_get(&pins.join("links").join("weft_connect4"))
        .and_then(|link| bpf_sys::link_prog_id(link.as_fd()));
    let result = match adopted_id {
        Ok(id) if loaded.program("weft_connect4").and_then(|p| p.info().ok()).map(|i| i.id()) != Some(id) => {
            aya_log::EbpfLogger::init_from_id(id).map(drop)
        }
        _ => aya_log::EbpfLogger::init(loaded).map(drop),
    };
    if let Err(e) = result {
        tracing::debug!("eBPF program logs unavailable: {e}");
    }
}

/// Removes pins of other (older) versions once this version is attached: unpinning a link detaches it.
fn remove_old_versions(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('v') && name != format!("v{PIN_VERSION}") {
            tracing::info!(pins = %entry.path().display(), "removing eBPF state of another version");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The kernel's cookie of a network namespace (`SO_NETNS_COOKIE` on a socket created in it).
pub fn netns_cookie(ns: &Netns) -> Result<u64, CaptureError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = ns
        .with(|| socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None))?
        .map_err(|e| err("socket in pod netns".into(), e))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    if rc != 0 {
        return Err(err("SO_NETNS_COOKIE".into(), io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// Removes every pin under `pin_path` (links detach with their last reference): `weft-agent cleanup`.
pub fn remove_pins(pin_path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(pin_path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
