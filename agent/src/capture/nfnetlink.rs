//! A small NETLINK_NETFILTER client for nf_tables batches, shared by the nftables backend and the iptables
//! backend's nf_tables path: it sizes the socket buffers for large batches, bounds the wait for replies, maps
//! each reply back to the message (and rule) it answers, and keeps the slow socket close off the caller's path,
//! none of which `netlink-socket2` exposes.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, OnceLock};

use netlink_bindings::nftables::Nfgenmsg;
use netlink_bindings::utils::{finalize_nested_header, push_header, push_nested_header};

/// The nf_tables netlink subsystem.
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_APPEND: u16 = 0x800;

const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;
const RECV_BUF: usize = 64 * 1024;
const DEFAULT_SOCK_BUF: usize = 208 * 1024;
const CLOSE_QUEUE: usize = 4;
const REPLY_TIMEOUT_SECS: libc::time_t = 5;

// ---------------------------------------------------------------------------
// Attribute writers, for what netlink-bindings' generated builders lack or get wrong
// ---------------------------------------------------------------------------

/// A nested attribute around what `inner` writes; returns what `inner` returns.
pub fn nest<T>(b: &mut Vec<u8>, ty: u16, inner: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    let at = push_nested_header(b, ty);
    let out = inner(b);
    finalize_nested_header(b, at);
    out
}

/// One attribute; values are small (names, addresses, blobs of at most 48 bytes).
pub fn put(b: &mut Vec<u8>, ty: u16, value: &[u8]) {
    push_header(b, ty, value.len() as u16);
    b.extend_from_slice(value);
}

/// A NUL-terminated string attribute; callers pass weft's own names or validated ones (no NUL inside).
pub fn put_str(b: &mut Vec<u8>, ty: u16, s: &str) {
    push_header(b, ty, s.len() as u16 + 1);
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

/// A u32 attribute in network byte order, as nf_tables reads them.
pub fn put_u32(b: &mut Vec<u8>, ty: u16, value: u32) {
    put(b, ty, &value.to_be_bytes());
}

// ---------------------------------------------------------------------------
// Batch transport: one sendmsg, one reply per message
// ---------------------------------------------------------------------------

/// Messages between NFNL_MSG_BATCH_BEGIN and NFNL_MSG_BATCH_END, which the
/// kernel only accepts in a single write. Sequence numbers count from
/// [`FIRST_SEQ`] in every batch: each is sent on a socket of its own, so its
/// replies cannot be confused with another's.
#[derive(Debug)]
pub struct Batch {
    buf: Vec<u8>,
    /// What each message does, indexed by `seq - FIRST_SEQ`; index 0 is the
    /// batch begin.
    what: Vec<String>,
    /// The first message too large to encode. Attribute lengths are u16 and
    /// netlink-bindings truncates a nested length silently, so any message
    /// over 64 KiB is refused rather than sent corrupt.
    oversized: Option<String>,
}

#[derive(Debug)]
pub struct KernelError {
    pub errno: i32,
    what: String,
    extack: Option<String>,
}

#[derive(Debug)]
pub enum BatchError {
    Io(String),
    Rejected(Vec<KernelError>),
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Io(e) => f.write_str(e),
            BatchError::Rejected(errs) => {
                // The kernel checks the whole batch and reports every failing
                // message; the first few are enough to act on.
                const SHOWN: usize = 3;
                for (i, e) in errs.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    let os = io::Error::from_raw_os_error(e.errno);
                    write!(f, "kernel rejected \"{}\": {os}", e.what)?;
                    if let Some(x) = &e.extack {
                        write!(f, " ({x})")?;
                    }
                }
                if errs.len() > SHOWN {
                    write!(f, "; and {} more", errs.len() - SHOWN)?;
                }
                Ok(())
            }
        }
    }
}

const FIRST_SEQ: u32 = 1;

impl Batch {
    pub fn new() -> Batch {
        let mut b = Batch {
            buf: Vec::with_capacity(4096),
            what: Vec::new(),
            oversized: None,
        };
        b.raw_msg(NFNL_MSG_BATCH_BEGIN, "batch begin", batch_header());
        b
    }

    fn next_seq(&self) -> u32 {
        FIRST_SEQ.wrapping_add(self.what.len() as u32)
    }

    /// Appends one nftables message; `body` writes the nfgenmsg and attributes.
    pub fn msg(
        &mut self,
        ty: u8,
        flags: u16,
        what: impl Into<String>,
        body: impl FnOnce(&mut Vec<u8>),
    ) {
        let start = self.begin(NFNL_SUBSYS_NFTABLES << 8 | u16::from(ty), flags | NLM_F_ACK);
        body(&mut self.buf);
        self.finish(start, what.into());
    }

    fn raw_msg(&mut self, ty: u16, what: &str, header: Nfgenmsg) {
        // No NLM_F_ACK on begin/end: only newer kernels acknowledge them, and
        // waiting for an ack an older kernel never sends would hang.
        let start = self.begin(ty, 0);
        self.buf.extend_from_slice(header.as_slice());
        self.finish(start, what.to_string());
    }

    fn begin(&mut self, ty: u16, flags: u16) -> usize {
        let start = self.buf.len();
        let seq = self.next_seq();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf
            .extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: kernel
        start
    }

    fn finish(&mut self, start: usize, what: String) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
        let len = (self.buf.len() - start) as u32;
        if len > u32::from(u16::MAX) && self.oversized.is_none() {
            self.oversized = Some(format!(
                "\"{what}\" needs {len} bytes, more than one netlink message can hold"
            ));
        }
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.what.push(what);
    }

    /// Ends the batch; refuses one with a message too large to encode.
    pub fn seal(mut self) -> Result<Batch, String> {
        self.raw_msg(NFNL_MSG_BATCH_END, "batch end", batch_header());
        match self.oversized.take() {
            Some(e) => Err(e),
            None => Ok(self),
        }
    }

    /// Sends a sealed batch and waits for every reply.
    pub fn send(&self) -> Result<(), BatchError> {
        let sock = NlSocket::open(self.buf.len(), self.what.len())
            .map_err(|e| BatchError::Io(format!("netlink socket: {e}")))?;
        let result = self.exchange(&sock);
        sock.close_in_background();
        result
    }

    fn exchange(&self, sock: &NlSocket) -> Result<(), BatchError> {
        let count = self.what.len();
        sock.send(&self.buf)
            .map_err(|e| BatchError::Io(format!("sending batch: {e}")))?;

        // Every message but begin/end asked for an ack, so each gets exactly
        // one reply: an ack (error 0) or its error. The kernel processes the
        // batch inside sendmsg, so all replies are already queued.
        let mut pending: HashSet<usize> = (1..count - 1).collect();
        let mut errors = Vec::new();
        let mut rbuf = vec![0u8; RECV_BUF];
        while !pending.is_empty() {
            let n = sock.recv(&mut rbuf).map_err(|e| {
                BatchError::Io(format!(
                    "waiting for {} replies from nftables: {e}",
                    pending.len()
                ))
            })?;
            for reply in parse_replies(&rbuf[..n]).map_err(BatchError::Io)? {
                let index = reply.seq.wrapping_sub(FIRST_SEQ) as usize;
                if index >= count {
                    continue; // not ours
                }
                let batch_framing = index == 0 || index == count - 1;
                if reply.errno != 0 {
                    errors.push(KernelError {
                        errno: reply.errno,
                        what: self.what[index].clone(),
                        extack: reply.extack,
                    });
                    // An error on begin/end (e.g. EPERM without CAP_NET_ADMIN)
                    // means nothing else was processed and no more replies come.
                    if batch_framing {
                        pending.clear();
                    }
                }
                pending.remove(&index);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(BatchError::Rejected(errors))
        }
    }
}

fn batch_header() -> Nfgenmsg {
    let mut h = Nfgenmsg::default();
    h.set_res_id(NFNL_SUBSYS_NFTABLES);
    h
}

struct Reply {
    seq: u32,
    errno: i32,
    extack: Option<String>,
}

/// Extracts NLMSG_ERROR replies (acks are errors with code 0) from one
/// datagram, with the kernel's extended-ack message or offset if present.
fn parse_replies(mut data: &[u8]) -> Result<Vec<Reply>, String> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = read_u32(data, 0) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(format!(
                "malformed netlink reply (length {len} of {})",
                data.len()
            ));
        }
        let msg = &data[..len];
        let ty = read_u16(msg, 4);
        let flags = read_u16(msg, 6);
        let seq = read_u32(msg, 8);
        if ty == NLMSG_ERROR {
            if msg.len() < NLMSG_HDRLEN + 4 + NLMSG_HDRLEN {
                return Err("truncated netlink error reply".into());
            }
            let errno = (read_u32(msg, NLMSG_HDRLEN) as i32).wrapping_neg();
            let mut extack = None;
            if flags & NLM_F_ACK_TLVS != 0 {
                // TLVs follow the echoed request: only its header when
                // NLM_F_CAPPED, else the whole original message.
                let echoed = if flags & NLM_F_CAPPED != 0 {
                    NLMSG_HDRLEN
                } else {
                    read_u32(msg, NLMSG_HDRLEN + 4) as usize
                };
                let tlv_start = (NLMSG_HDRLEN + 4 + echoed).next_multiple_of(4);
                extack = parse_extack(msg.get(tlv_start..).unwrap_or(&[]));
            }
            out.push(Reply { seq, errno, extack });
        }
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    Ok(out)
}

fn parse_extack(mut tlvs: &[u8]) -> Option<String> {
    let mut parts = Vec::new();
    while tlvs.len() >= 4 {
        let len = read_u16(tlvs, 0) as usize;
        let ty = read_u16(tlvs, 2);
        if len < 4 || len > tlvs.len() {
            break;
        }
        let value = &tlvs[4..len];
        match ty {
            NLMSGERR_ATTR_MSG => {
                let text = value.split(|&b| b == 0).next().unwrap_or(&[]);
                parts.push(String::from_utf8_lossy(text).into_owned());
            }
            NLMSGERR_ATTR_OFFS if value.len() >= 4 => {
                parts.push(format!("at byte {} of the message", read_u32(value, 0)));
            }
            _ => {}
        }
        tlvs = &tlvs[len.next_multiple_of(4).min(tlvs.len())..];
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join(", "))
    }
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

struct NlSocket {
    fd: OwnedFd,
}

impl NlSocket {
    /// Opens a NETLINK_NETFILTER socket in the calling thread's network
    /// namespace, sized for a batch of `len` bytes answered by `replies` acks.
    fn open(len: usize, replies: usize) -> io::Result<NlSocket> {
        // SAFETY: plain socket(2) call; the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let sock = NlSocket {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        };

        // Extended acks name the failing attribute; capped acks keep error
        // replies small (we know the request from its sequence number).
        // Both are optional: older kernels just ignore the error.
        let _ = sock.setsockopt(libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1);
        let _ = sock.setsockopt(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);

        // The kernel refuses a write larger than the send buffer, and all
        // acks are queued before we read any, so both buffers must fit the
        // whole batch. Each queued ack costs roughly 1 KiB of receive buffer.
        // The *FORCE variants bypass rmem_max/wmem_max (we hold
        // CAP_NET_ADMIN, which nftables needs anyway).
        if len > DEFAULT_SOCK_BUF / 2 {
            sock.set_buf(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, len + 4096);
        }
        let rcv = replies * 1024 + RECV_BUF;
        if rcv > DEFAULT_SOCK_BUF / 2 {
            sock.set_buf(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, rcv);
        }

        // Replies are queued synchronously while the batch is processed;
        // the timeout only guards against a kernel that never answers.
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: passes a valid timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// Closing a NETLINK_NETFILTER socket makes the kernel wait for
    /// nf_tables' deferred destruction of deleted objects, i.e. for an RCU
    /// grace period (8-16 ms on this machine after every replace; `nft` pays
    /// it too, when it exits). The transaction is committed and acknowledged
    /// by then, so the close is handed to a background thread instead of
    /// delaying the caller. The queue is small: under a burst of calls the
    /// caller closes inline again, so descriptors cannot pile up.
    fn close_in_background(self) {
        static CLOSER: OnceLock<Option<mpsc::SyncSender<OwnedFd>>> = OnceLock::new();
        let closer = CLOSER.get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel::<OwnedFd>(CLOSE_QUEUE);
            let spawned = std::thread::Builder::new()
                .name("nft-netlink-close".into())
                .spawn(move || rx.into_iter().for_each(drop));
            spawned.ok().map(|_| tx)
        });
        // Queue full, or no closer thread: close here (slower, not wrong).
        if let Some(tx) = closer {
            let _ = tx.try_send(self.fd);
        }
    }

    fn setsockopt(&self, level: i32, name: i32, value: i32) -> io::Result<()> {
        // SAFETY: passes a valid int of the size given.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&value as *const i32).cast(),
                size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn set_buf(&self, force: i32, plain: i32, bytes: usize) {
        let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
        if self.setsockopt(libc::SOL_SOCKET, force, bytes).is_err() {
            // Without CAP_NET_ADMIN: capped at rmem_max/wmem_max, and a
            // too-large batch then fails visibly (EMSGSIZE / ENOBUFS).
            let _ = self.setsockopt(libc::SOL_SOCKET, plain, bytes);
        }
    }

    fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_nl is valid; pid 0 addresses the kernel.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: buf and addr are valid for the lengths given.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    0,
                    (&addr as *const libc::sockaddr_nl).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n as usize != buf.len() {
                return Err(io::Error::other(format!(
                    "short netlink write ({n} of {} bytes)",
                    buf.len()
                )));
            }
            return Ok(());
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // MSG_TRUNC makes netlink return the datagram's real length, so
            // a reply larger than `buf` is detected instead of misparsed.
            // SAFETY: buf is valid for writes of buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
                    }
                    Some(libc::ENOBUFS) => {
                        return Err(io::Error::other(
                            "replies were dropped (ENOBUFS); the batch outcome is unknown",
                        ));
                    }
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::other(format!(
                    "netlink reply of {n} bytes truncated"
                )));
            }
            return Ok(n);
        }
    }
}

