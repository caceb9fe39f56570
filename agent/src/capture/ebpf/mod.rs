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
use ipnet::IpNet;
use weft_ebpf_common::{
    Cidr, OrigDst, PeerKey, PodPolicy, SockKey, MAP_ORIG_BY_COOKIE, MAP_ORIG_BY_PEER, MAP_POLICIES, MAP_SOCKS, MAX_CONNECTIONS, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, MAX_PODS,
    PIN_VERSION, POLICY_SOCKMAP,
};

use self::bpf_sys::AttachType;
use super::netns::Netns;
use super::nftables::Nftables;
use super::plan::{self, PodCapture, Selection};
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
    /// The enrolment of a pod with the default plan; a plan's exclusions are added to a copy of it.
    policy: PodPolicy,
    /// Hooks whose pinned link was found and reused, for the start-up log and the status endpoint.
    pub adopted: Vec<&'static str>,
    pins: PathBuf,
}

impl Ebpf {
    /// Checks the kernel, mounts bpffs and cgroup2 where missing, loads the programs, and attaches them to
    /// the cgroup v2 root — or adopts the links a previous agent pinned.
    pub fn start(settings: &EbpfSettings, probe_source: Option<std::net::Ipv4Addr>) -> Result<Ebpf, CaptureError> {
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
            inbound: Nftables::detect_inbound_only(probe_source)?,
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

    fn check(&self, plan: &PodCapture) -> Result<(), CaptureError> {
        policy_for(self.policy, plan).map(drop)
    }

    /// Enrols the pod's netns (connects are redirected from now on), then installs the inbound rule. A
    /// changed plan replaces the enrolment in one map update.
    fn install(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError> {
        let policy = policy_for(self.policy, plan)?;
        let cookie = netns_cookie(ns)?;
        self.policies().insert(cookie, policy, 0).map_err(|e| err("enrolling the pod".into(), e))?;
        self.inbound.install_plan(ns, plan)
    }

    fn verify(&self, ns: &Netns, plan: &PodCapture) -> Result<(), CaptureError> {
        let policy = policy_for(self.policy, plan)?;
        let cookie = netns_cookie(ns)?;
        match self.policies().get(&cookie, 0) {
            Ok(p) if p == policy => {}
            Ok(_) => return Err(CaptureError("the pod's eBPF enrolment differs from its capture plan".into())),
            Err(_) => return Err(CaptureError("the pod is not enrolled in the eBPF capture map".into())),
        }
        self.inbound.verify(ns, plan)
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "pins": self.pins,
            "adopted_links": self.adopted,
            "sockmap": self.policy.flags & POLICY_SOCKMAP != 0,
            "sockhash_entries": self.socks.lock().map(|m| m.keys().count()).unwrap_or(0),
        })
    }

    /// Entries are counted by walking each map's keys: at most the maps' capacities, once per scrape.
    fn map_occupancy(&self) -> Vec<(&'static str, u64, u64)> {
        let pods = self.policies().keys().count() as u64;
        let socks = self.socks.lock().map(|m| m.keys().count() as u64).unwrap_or(0);
        let loaded = self._loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let connections = |name: &str| -> u64 {
            let Some(map) = loaded.map(name) else { return 0 };
            match name {
                MAP_ORIG_BY_PEER => BpfHashMap::<_, PeerKey, OrigDst>::try_from(map).map_or(0, |m| m.keys().count() as u64),
                _ => BpfHashMap::<_, u64, OrigDst>::try_from(map).map_or(0, |m| m.keys().count() as u64),
            }
        };
        let connections = [MAP_ORIG_BY_COOKIE, MAP_ORIG_BY_PEER].map(|name| (name, connections(name), u64::from(MAX_CONNECTIONS)));
        let mut out = vec![(MAP_POLICIES, pods, u64::from(MAX_PODS))];
        out.extend(connections);
        out.push((MAP_SOCKS, socks, u64::from(MAX_CONNECTIONS)));
        out
    }

    fn remove(&self, ns: &Netns) -> Result<(), CaptureError> {
        let cookie = netns_cookie(ns)?;
        let _ = self.policies().remove(&cookie);
        self.inbound.remove(ns)
    }
}

/// The enrolment of a pod with `plan`. The connect hooks skip destinations by port and address range, up to
/// [`MAX_EXCLUDED_PORTS`] and [`MAX_EXCLUDED_CIDRS`] of each; what they cannot express is refused, naming the
/// annotation (the pod can use the iptables or nftables mode). The inbound part of the plan is the nftables
/// table's.
pub fn policy_for(base: PodPolicy, plan: &PodCapture) -> Result<PodPolicy, CaptureError> {
    let refuse = |annotation: &str, why: &str| {
        CaptureError(format!("eBPF mode cannot honour annotation {annotation}: {why}; capture this pod with --redirect iptables or nftables"))
    };
    if !plan.excluded_interfaces.is_empty() {
        return Err(refuse(plan::EXCLUDE_INTERFACES, "a connect() has no outgoing interface yet"));
    }
    let mut ranges = plan.outbound_excluded_ranges.clone();
    match &plan.outbound_ranges {
        Selection::All => {}
        // Nothing included: every destination is excluded (::/0 also covers IPv4, which the programs see mapped).
        Selection::Only(included) if included.is_empty() => {
            if !plan.outbound_ports.is_empty() {
                return Err(refuse(plan::INCLUDE_OUTBOUND_PORTS, "only `*` (all) outbound address ranges can be combined with it"));
            }
            ranges = vec![IpNet::V6(ipnet::Ipv6Net::default())];
        }
        Selection::Only(_) => {
            return Err(refuse(plan::INCLUDE_OUTBOUND_IP_RANGES, "the connect hooks only skip ranges; use `*` with excludeOutboundIPRanges, or an empty value"));
        }
    }
    if plan.outbound_excluded_ports.len() > MAX_EXCLUDED_PORTS {
        return Err(refuse(plan::EXCLUDE_OUTBOUND_PORTS, &format!("at most {MAX_EXCLUDED_PORTS} ports")));
    }
    if ranges.len() > MAX_EXCLUDED_CIDRS {
        return Err(refuse(plan::EXCLUDE_OUTBOUND_IP_RANGES, &format!("at most {MAX_EXCLUDED_CIDRS} ranges (after merging overlaps)")));
    }
    let mut policy = base;
    for (slot, port) in policy.excluded_ports.iter_mut().zip(&plan.outbound_excluded_ports) {
        *slot = u32::from(*port);
    }
    policy.n_excluded_ports = plan.outbound_excluded_ports.len() as u32;
    for (slot, net) in policy.excluded_cidrs.iter_mut().zip(&ranges) {
        *slot = cidr(net);
    }
    policy.n_excluded_cidrs = ranges.len() as u32;
    Ok(policy)
}

/// A range as the programs compare it: 4 native words of network-order bytes, IPv4 mapped into IPv6.
fn cidr(net: &IpNet) -> Cidr {
    let (addr, mask): ([u8; 16], [u8; 16]) = match net {
        IpNet::V4(n) => (n.network().to_ipv6_mapped().octets(), {
            let mut m = [0xff; 16];
            m[12..].copy_from_slice(&n.netmask().octets());
            m
        }),
        IpNet::V6(n) => (n.network().octets(), n.netmask().octets()),
    };
    let words = |b: [u8; 16]| std::array::from_fn(|i| u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]));
    Cidr { addr: words(addr), mask: words(mask) }
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
    let mounted = nix::sys::statfs::statfs("/sys/fs/bpf").is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    if !mounted {
        mount("bpf", "/sys/fs/bpf", "bpf")?;
    }
    Ok(())
}

fn mount(source: &str, target: &str, fstype: &str) -> Result<(), CaptureError> {
    fs::create_dir_all(target).map_err(|e| err(format!("creating {target}"), e))?;
    nix::mount::mount(Some(source), target, Some(fstype), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| err(format!("mounting {fstype} on {target}"), io::Error::from(e)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::plan::*;
    use weft_ebpf_common::mapped_v4;

    fn plan(pairs: &[(&str, &str)]) -> PodCapture {
        PodCapture::from_annotations(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap()
    }

    fn ip4(s: &str) -> [u32; 4] {
        mapped_v4(u32::from_ne_bytes(s.parse::<std::net::Ipv4Addr>().unwrap().octets()))
    }

    fn ip6(s: &str) -> [u32; 4] {
        let b = s.parse::<std::net::Ipv6Addr>().unwrap().octets();
        std::array::from_fn(|i| u32::from_ne_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]))
    }

    #[test]
    fn the_default_plan_is_the_base_enrolment() {
        let base = PodPolicy { outbound_port: 15001, ..PodPolicy::default() };
        assert_eq!(policy_for(base, &PodCapture::default()).unwrap(), base);
    }

    #[test]
    fn exclusions_become_ports_and_mapped_ranges() {
        let p = policy_for(PodPolicy::default(), &plan(&[
            (EXCLUDE_OUTBOUND_PORTS, "5432,3306"),
            (EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8,fd00::/8"),
        ]))
        .unwrap();
        assert_eq!((p.n_excluded_ports, &p.excluded_ports[..2]), (2, &[3306, 5432][..]));
        assert_eq!(p.n_excluded_cidrs, 2);
        let (v4, v6) = (p.excluded_cidrs[0], p.excluded_cidrs[1]);
        assert!(v4.contains(&ip4("10.1.2.3")) && !v4.contains(&ip4("11.0.0.1")) && !v4.contains(&ip6("fd00::1")));
        assert!(v6.contains(&ip6("fd00::1")) && !v6.contains(&ip6("fe80::1")) && !v6.contains(&ip4("10.1.2.3")));
    }

    #[test]
    fn nothing_included_excludes_every_destination() {
        let p = policy_for(PodPolicy::default(), &plan(&[(INCLUDE_OUTBOUND_IP_RANGES, "")])).unwrap();
        assert_eq!(p.n_excluded_cidrs, 1);
        assert!(p.excluded_cidrs[0].contains(&ip4("1.2.3.4")) && p.excluded_cidrs[0].contains(&ip6("2001:db8::1")));
    }

    #[test]
    fn what_the_hooks_cannot_express_is_refused_naming_the_annotation() {
        for (pairs, annotation) in [
            (vec![(INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8")], INCLUDE_OUTBOUND_IP_RANGES),
            (vec![(INCLUDE_OUTBOUND_IP_RANGES, ""), (INCLUDE_OUTBOUND_PORTS, "443")], INCLUDE_OUTBOUND_PORTS),
            (vec![(EXCLUDE_INTERFACES, "eth1")], EXCLUDE_INTERFACES),
            (vec![(EXCLUDE_OUTBOUND_PORTS, "1,2,3,4,5,6,7,8,9")], EXCLUDE_OUTBOUND_PORTS),
            (vec![(EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/32,10.0.0.2/32,10.0.0.4/32,10.0.0.6/32,10.0.0.8/32,10.0.0.10/32,10.0.0.12/32,10.0.0.14/32,10.0.0.16/32")], EXCLUDE_OUTBOUND_IP_RANGES),
        ] {
            let e = policy_for(PodPolicy::default(), &plan(&pairs)).unwrap_err().to_string();
            assert!(e.contains(annotation) && e.contains("iptables or nftables"), "{pairs:?}: {e}");
        }
        // Inbound settings are the nftables table's, and virtual interfaces are prerouting rules: accepted.
        assert!(policy_for(PodPolicy::default(), &plan(&[(INCLUDE_INBOUND_PORTS, "8080"), (KUBEVIRT_INTERFACES, "net1")])).is_ok());
    }
}
