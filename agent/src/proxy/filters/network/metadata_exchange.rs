//! Istio's TCP metadata exchange (istio-proxy's `istio.metadata_exchange` network filter, downstream on
//! listener chains and upstream on clusters), as a stream adapter under the other filters. When the
//! connection negotiated the configured ALPN (`istio-peer-exchange`), each side writes one frame before any
//! payload — magic `0x3D230467` and a length, both u32 big-endian, then a `google.protobuf.Any` holding a
//! `google.protobuf.Struct` with `x-envoy-peer-metadata` (its workload metadata) and
//! `x-envoy-peer-metadata-id` (its node id) — and strips the peer's frame from what it reads. The frame is
//! written right after the handshake, so server-first protocols work (istio-proxy writes it on the first read
//! or write, and answers ours when it arrives). A stream that does not start with the magic passes through
//! untouched, and the peer is unknown; weft has no workload discovery to fall back on (`enable_discovery`).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use prost::Message;
use prost_types::value::Kind;
use prost_types::{Any, Struct, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::config::metadata_exchange::MetadataExchange;
use crate::config::workload_metadata::{LocalWorkload, Peer, WorkloadMetadata};

pub const MAGIC: u32 = 0x3D23_0467;
const HEADER_LEN: usize = 8;
const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";
const METADATA_KEY: &str = "x-envoy-peer-metadata";
const ID_KEY: &str = "x-envoy-peer-metadata-id";
/// A peer's frame larger than this closes the connection (istio-proxy's is a few hundred bytes; Envoy's
/// default per-connection buffer limit is 1 MiB).
const MAX_FRAME: usize = 1 << 20;

/// What the exchange learnt of the peer, shared with whoever keeps the connection's state: empty while the
/// peer's frame is awaited, then `Some` peer, or `None` when there was no exchange or no frame.
#[derive(Debug, Default)]
pub struct PeerSlot(OnceLock<Option<Arc<Peer>>>);

impl PeerSlot {
    /// `None` while undecided; `Some(None)`: no peer metadata on this connection.
    pub fn get(&self) -> Option<Option<&Arc<Peer>>> {
        self.0.get().map(Option::as_ref)
    }

    fn decide(&self, peer: Option<Peer>) {
        if let Some(p) = &peer {
            tracing::debug!(peer = %p.id, workload = %p.metadata.workload_name, namespace = %p.metadata.namespace, "metadata exchange: peer found");
        }
        let _ = self.0.set(peer.map(Arc::new));
    }
}

/// The frame this side sends.
pub fn frame(local: &LocalWorkload) -> Vec<u8> {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(METADATA_KEY.to_string(), Value { kind: Some(Kind::StructValue(local.metadata.to_struct())) });
    if !local.node_id.is_empty() {
        fields.insert(ID_KEY.to_string(), Value { kind: Some(Kind::StringValue(local.node_id.clone())) });
    }
    let any = Any { type_url: STRUCT_TYPE_URL.to_string(), value: Struct { fields }.encode_to_vec() };
    let body = any.encode_to_vec();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The peer in a frame's body (a decoded Any); `None` when it is not a Struct.
pub fn peer_of(any: &Any, additional_labels: &[String]) -> Option<Peer> {
    if any.type_url != STRUCT_TYPE_URL {
        return None;
    }
    let data = Struct::decode(any.value.as_slice()).ok()?;
    let metadata = match data.fields.get(METADATA_KEY).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StructValue(s)) => WorkloadMetadata::from_struct(s, additional_labels),
        _ => WorkloadMetadata::default(),
    };
    let id = match data.fields.get(ID_KEY).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(id)) => id.clone(),
        _ => String::new(),
    };
    Some(Peer { id, metadata })
}

/// What the read side is doing.
enum Reading {
    /// Collecting the peer's frame: what has arrived of it.
    Frame(Vec<u8>),
    /// Handing out bytes read while looking for a frame that was not there, before reading on.
    Replay(Vec<u8>, usize),
    /// Everything else passes straight through.
    Through,
}

/// A connection under the metadata exchange: reads lose the peer's frame; writes pass unchanged (this side's
/// frame went out in [`start`]).
pub struct ExchangeStream<IO> {
    io: IO,
    reading: Reading,
    /// The filter's configuration while an exchange is under way.
    config: Option<Arc<MetadataExchange>>,
    peer: Arc<PeerSlot>,
}

/// Starts the exchange on a connection that negotiated `alpn` (`None`: no ALPN, plaintext included): when it
/// is the configured protocol, writes this side's frame and returns a stream that strips the peer's; otherwise
/// (or without the filter) the stream passes through and the peer is unknown.
pub async fn start<IO>(mut io: IO, config: Option<&Arc<MetadataExchange>>, local: &LocalWorkload, alpn: Option<&str>) -> io::Result<ExchangeStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let Some(config) = config.filter(|c| c.protocol == alpn.unwrap_or_default()) else {
        return Ok(ExchangeStream::through(io));
    };
    io.write_all(&frame(local)).await?;
    io.flush().await?;
    Ok(ExchangeStream::awaiting_frame(io, Arc::clone(config)))
}

impl<IO> ExchangeStream<IO> {
    /// A stream whose first bytes may be the peer's frame (this side's has been written).
    pub fn awaiting_frame(io: IO, config: Arc<MetadataExchange>) -> ExchangeStream<IO> {
        ExchangeStream { io, reading: Reading::Frame(Vec::with_capacity(HEADER_LEN)), config: Some(config), peer: Arc::default() }
    }

    /// A stream without an exchange (the peer is unknown).
    pub fn through(io: IO) -> ExchangeStream<IO> {
        let peer = Arc::new(PeerSlot::default());
        peer.decide(None);
        ExchangeStream { io, reading: Reading::Through, config: None, peer }
    }

    /// The peer's metadata as it becomes known.
    pub fn peer(&self) -> &Arc<PeerSlot> {
        &self.peer
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

/// How many more bytes of the frame are needed once `got` have arrived; `Err` when the magic is wrong.
fn wanted(got: &[u8]) -> io::Result<Result<usize, ()>> {
    if got.len() < HEADER_LEN {
        return Ok(Ok(HEADER_LEN - got.len()));
    }
    if got[..4] != MAGIC.to_be_bytes() {
        return Ok(Err(()));
    }
    let len = u32::from_be_bytes([got[4], got[5], got[6], got[7]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("metadata exchange: the peer's frame of {len} bytes is over {MAX_FRAME}")));
    }
    Ok(Ok(HEADER_LEN + len - got.len()))
}

impl<IO: AsyncRead + Unpin> ExchangeStream<IO> {
    /// Reads the peer's frame (only its bytes, so nothing past it is read early); returns once the read side
    /// knows what to do next.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Reading::Frame(got) = &mut self.reading else { return Poll::Ready(Ok(())) };
        loop {
            let need = match wanted(got)? {
                Ok(0) => break,
                Ok(n) => n,
                Err(()) => {
                    // Not a frame: the peer has no exchange; what was read is the stream's own.
                    tracing::debug!("metadata exchange: no magic from the peer; passing its bytes through");
                    self.peer.decide(None);
                    self.reading = Reading::Replay(std::mem::take(got), 0);
                    return Poll::Ready(Ok(()));
                }
            };
            let start = got.len();
            got.resize(start + need, 0);
            let mut buf = ReadBuf::new(&mut got[start..]);
            let polled = Pin::new(&mut self.io).poll_read(cx, &mut buf);
            let filled = buf.filled().len();
            got.truncate(start + filled);
            ready!(polled)?;
            if filled == 0 {
                // The peer closed before its frame was complete: give up and hand on what came.
                self.peer.decide(None);
                self.reading = Reading::Replay(std::mem::take(got), 0);
                return Poll::Ready(Ok(()));
            }
        }
        let Ok(any) = Any::decode(&got[HEADER_LEN..]) else {
            // As istio-proxy: only the header is dropped, and the stream goes on from the body.
            tracing::debug!("metadata exchange: the peer's frame is not a protobuf Any; passing it on");
            self.peer.decide(None);
            self.reading = Reading::Replay(got.split_off(HEADER_LEN), 0);
            return Poll::Ready(Ok(()));
        };
        let labels = self.config.as_ref().map_or(&[][..], |c| c.additional_labels.as_slice());
        self.peer.decide(peer_of(&any, labels));
        self.reading = Reading::Through;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ExchangeStream<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_frame(cx))?;
        match &mut this.reading {
            Reading::Replay(bytes, at) => {
                let n = buf.remaining().min(bytes.len() - *at);
                buf.put_slice(&bytes[*at..*at + n]);
                *at += n;
                if *at == bytes.len() {
                    this.reading = Reading::Through;
                }
                Poll::Ready(Ok(()))
            }
            _ => Pin::new(&mut this.io).poll_read(cx, buf),
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ExchangeStream<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The exchange over in-memory pipes: frames, stripping, pass-through, split reads, server-first protocols.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::bootstrap::Node;
    use serde_json::json;
    use std::time::Duration;
    use tokio::io::{duplex, AsyncReadExt, DuplexStream};

    fn local(pod: &str) -> LocalWorkload {
        LocalWorkload::from_node(&Node {
            id: format!("sidecar~10.0.0.1~{pod}.shop~shop.svc.cluster.local"),
            cluster: String::new(),
            metadata: json!({"NAME": pod, "NAMESPACE": "shop", "WORKLOAD_NAME": "web", "CLUSTER_ID": "Kubernetes",
                "OWNER": "kubernetes://apis/apps/v1/namespaces/shop/deployments/web", "LABELS": {"app": "web", "role": "db"}}),
        })
    }

    fn config(additional_labels: &[&str]) -> Arc<MetadataExchange> {
        Arc::new(MetadataExchange { protocol: "istio-peer-exchange".into(), enable_discovery: true, additional_labels: additional_labels.iter().map(|l| l.to_string()).collect() })
    }

    const ALPN: Option<&str> = Some("istio-peer-exchange");

    async fn read_all<IO: AsyncRead + Unpin>(io: &mut IO) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut out)).await.expect("read before the deadline").unwrap();
        out
    }

    /// Our side's stream over a pipe whose far end writes `chunks` (one write each) and closes.
    async fn fed(chunks: Vec<Vec<u8>>) -> ExchangeStream<DuplexStream> {
        let (ours, mut theirs) = duplex(64 * 1024);
        let stream = start(ours, Some(&config(&[])), &local("a"), ALPN).await.unwrap();
        tokio::spawn(async move {
            for c in chunks {
                theirs.write_all(&c).await.unwrap();
                theirs.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            theirs.shutdown().await.unwrap();
            // Open until our side goes away.
            let mut sink = Vec::new();
            let _ = theirs.read_to_end(&mut sink).await;
        });
        stream
    }

    #[test]
    fn a_frame_is_magic_length_and_an_any_of_a_struct() {
        let f = frame(&local("web-1"));
        assert_eq!(f[..4], [0x3D, 0x23, 0x04, 0x67]);
        assert_eq!(u32::from_be_bytes([f[4], f[5], f[6], f[7]]) as usize, f.len() - 8);
        let any = Any::decode(&f[8..]).unwrap();
        assert_eq!(any.type_url, "type.googleapis.com/google.protobuf.Struct");
        let peer = peer_of(&any, &["role".to_string()]).unwrap();
        assert_eq!(peer.id, "sidecar~10.0.0.1~web-1.shop~shop.svc.cluster.local");
        assert_eq!((peer.metadata.name.as_str(), peer.metadata.workload_name.as_str(), peer.metadata.cluster_id.as_str()), ("web-1", "web", "Kubernetes"));
        assert_eq!(peer.metadata.owner().as_deref(), Some("kubernetes://apis/apps/v1/namespaces/shop/deployments/web"));
        // `role` is not sent (the local metadata keeps only the canonical labels).
        assert_eq!(peer.metadata.labels.keys().collect::<Vec<_>>(), ["app"]);
        assert!(peer_of(&Any { type_url: "type.googleapis.com/google.protobuf.Value".into(), value: vec![] }, &[]).is_none());
    }

    #[tokio::test]
    async fn the_peers_frame_is_stripped_and_its_metadata_kept() {
        let mut theirs = frame(&local("b"));
        theirs.extend_from_slice(b"payload");
        let mut stream = fed(vec![theirs]).await;
        assert!(stream.peer().get().is_none(), "undecided before the first read");
        assert_eq!(read_all(&mut stream).await, b"payload");
        let peer = stream.peer().get().flatten().cloned().expect("peer found");
        assert_eq!(peer.metadata.name, "b");
    }

    #[tokio::test]
    async fn a_frame_split_across_reads_is_reassembled() {
        let mut bytes = frame(&local("b"));
        bytes.extend_from_slice(b"after");
        // Every byte in a write of its own, the payload in two.
        let mut chunks: Vec<Vec<u8>> = bytes.iter().map(|b| vec![*b]).collect();
        chunks.push(b"-and-more".to_vec());
        let mut stream = fed(chunks).await;
        assert_eq!(read_all(&mut stream).await, b"after-and-more");
        assert_eq!(stream.peer().get().flatten().map(|p| p.metadata.name.as_str()), Some("b"));
    }

    #[tokio::test]
    async fn a_stream_without_the_magic_passes_through_untouched() {
        let mut stream = fed(vec![b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec()]).await;
        assert_eq!(read_all(&mut stream).await, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
        assert_eq!(stream.peer().get(), Some(None));
        // Shorter than a header, then closed: handed on as it came.
        let mut stream = fed(vec![b"abc".to_vec()]).await;
        assert_eq!(read_all(&mut stream).await, b"abc");
        assert_eq!(stream.peer().get(), Some(None));
    }

    #[tokio::test]
    async fn a_garbled_body_loses_only_the_header_and_an_oversized_one_fails() {
        let mut bytes = MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&3u32.to_be_bytes());
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        let mut stream = fed(vec![bytes]).await;
        assert_eq!(read_all(&mut stream).await, [0xff, 0xff, 0xff], "as istio-proxy: the body goes on");
        assert_eq!(stream.peer().get(), Some(None));
        let mut huge = MAGIC.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut stream = fed(vec![huge]).await;
        let mut out = Vec::new();
        assert_eq!(stream.read_to_end(&mut out).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn without_the_negotiated_protocol_nothing_is_written_or_stripped() {
        let (ours, mut theirs) = duplex(64 * 1024);
        let mut stream = start(ours, Some(&config(&[])), &local("a"), Some("istio")).await.unwrap();
        assert_eq!(stream.peer().get(), Some(None));
        theirs.write_all(&frame(&local("b"))).await.unwrap();
        theirs.shutdown().await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(read_all(&mut theirs).await, b"", "no frame of ours");
        assert_eq!(read_all(&mut stream).await, frame(&local("b")), "theirs is payload here");
    }

    #[tokio::test]
    async fn a_server_first_protocol_works_and_both_sides_learn_the_other() {
        let (client_io, server_io) = duplex(64 * 1024);
        let (client_config, server_config) = (config(&["role"]), config(&[]));
        let (client_local, server_local) = (local("client"), local("server"));
        let (client, server) = tokio::join!(
            start(client_io, Some(&client_config), &client_local, ALPN),
            start(server_io, Some(&server_config), &server_local, ALPN)
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        // The server speaks first, before it has read anything.
        server.write_all(b"220 ready\r\n").await.unwrap();
        let mut banner = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut banner)).await.unwrap().unwrap();
        assert_eq!(&banner, b"220 ready\r\n");
        client.write_all(b"HELO").await.unwrap();
        let mut helo = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut helo)).await.unwrap().unwrap();
        assert_eq!(&helo, b"HELO");
        assert_eq!(client.peer().get().flatten().map(|p| p.metadata.name.as_str()), Some("server"));
        assert_eq!(server.peer().get().flatten().map(|p| p.id.as_str()), Some("sidecar~10.0.0.1~client.shop~shop.svc.cluster.local"));
    }
}
