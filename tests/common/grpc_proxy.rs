//! A gRPC-aware HTTP/2 proxy for fault injection. It forwards every call between a client and an
//! upstream server unchanged (headers, messages, trailers, resets, in both directions), and on
//! demand ends exactly one call of a chosen method with a gRPC status, between two whole
//! messages, the way a proxy or load balancer in front of a service may: the client sees a
//! trailers frame with `grpc-status`, and the upstream call is cancelled.
//!
//! Connections that do not open with the HTTP/2 preface (REST over HTTP/1.1) are piped through
//! byte for byte. Built on `h2` directly (already in the dependency tree through tonic and hyper). Include it
//! with `#[path = "common/grpc_proxy.rs"] mod grpc_proxy;` in a test that needs it.
#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Request, Response};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// A running proxy on a loopback port, stopped when dropped.
pub struct GrpcProxy {
    /// Where clients connect (plain HTTP/2, as to an emulator).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

struct Shared {
    upstream: String,
    /// The path of the method whose calls may be aborted, e.g.
    /// `/google.pubsub.v1.Subscriber/StreamingPull`.
    method: String,
    /// Set by [`GrpcProxy::abort_one`]; the first call of `method` that has forwarded a
    /// message clears it and ends.
    armed: AtomicBool,
    /// The status to end it with: (gRPC code, message).
    status: Mutex<(u32, String)>,
    /// Wakes the calls of `method` when armed, so an idle one ends at once.
    wake: watch::Sender<u64>,
    /// Calls of `method` seen, and those ended by the proxy.
    calls: AtomicUsize,
    aborted: AtomicUsize,
    /// Whole response messages of `method` forwarded.
    messages: AtomicUsize,
    /// Whole response messages of `method` the upstream sent after the proxy ended the call for
    /// the client: dropped.
    dropped: AtomicUsize,
}

impl GrpcProxy {
    /// Starts a proxy to `upstream` (`host:port`, plain HTTP/2) that can abort calls of
    /// `method` (a path such as `/google.pubsub.v1.Subscriber/StreamingPull`).
    pub fn start(upstream: &str, method: &str) -> GrpcProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("grpc-proxy").enable_all().build().unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            method: method.to_string(),
            armed: AtomicBool::new(false),
            status: Mutex::new((2, String::new())),
            wake: watch::channel(0).0,
            calls: AtomicUsize::new(0),
            aborted: AtomicUsize::new(0),
            messages: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
        });
        let s = shared.clone();
        runtime.spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(connection(socket, s.clone()));
            }
        });
        GrpcProxy { addr, shared, runtime: Some(runtime) }
    }

    /// Ends exactly one call of the method with gRPC status `code` (2 is UNKNOWN, 1 CANCELLED)
    /// and `message`: the first one open (or opened later) that has forwarded at least one
    /// response message, at the next boundary between two messages.
    pub fn abort_one(&self, code: u32, message: &str) {
        *self.shared.status.lock().unwrap() = (code, message.to_string());
        self.shared.armed.store(true, Ordering::SeqCst);
        self.shared.wake.send_modify(|n| *n += 1);
    }

    /// Calls of the method the proxy ended.
    pub fn aborted(&self) -> usize {
        self.shared.aborted.load(Ordering::SeqCst)
    }

    /// Calls of the method seen (opened by the client).
    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// Whole response messages of the method forwarded to the client.
    pub fn messages(&self) -> usize {
        self.shared.messages.load(Ordering::SeqCst)
    }

    /// Whole response messages of the method that came from upstream after the proxy ended
    /// their call for the client, and were dropped.
    pub fn dropped(&self) -> usize {
        self.shared.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One client connection, forwarded over one upstream connection of its own: HTTP/2 (gRPC)
/// call by call, anything else (the REST admin calls over HTTP/1.1) byte for byte.
async fn connection(mut socket: TcpStream, shared: Arc<Shared>) -> Result<(), Error> {
    socket.set_nodelay(true)?;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    let mut head = [0u8; PREFACE.len()];
    let is_h2 = loop {
        let n = socket.peek(&mut head).await?;
        if n == 0 {
            return Ok(());
        }
        if head[..n] != PREFACE[..n] {
            break false;
        }
        if n == PREFACE.len() {
            break true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    };
    if !is_h2 {
        let mut upstream = TcpStream::connect(&shared.upstream).await?;
        upstream.set_nodelay(true)?;
        tokio::io::copy_bidirectional(&mut socket, &mut upstream).await?;
        return Ok(());
    }
    let mut server = h2::server::Builder::new().initial_window_size(1 << 20).initial_connection_window_size(16 << 20).handshake(socket).await?;
    let upstream = TcpStream::connect(&shared.upstream).await?;
    upstream.set_nodelay(true)?;
    let (client, driver) = h2::client::Builder::new().initial_window_size(1 << 20).initial_connection_window_size(16 << 20).handshake(upstream).await?;
    tokio::spawn(driver);
    while let Some(next) = server.accept().await {
        let (request, respond) = next?;
        tokio::spawn(call(request, respond, client.clone(), shared.clone()));
    }
    Ok(())
}

/// One call: the request one way, the response the other, and the abort.
async fn call(request: Request<RecvStream>, mut respond: h2::server::SendResponse<Bytes>, client: h2::client::SendRequest<Bytes>, shared: Arc<Shared>) {
    let (parts, body) = request.into_parts();
    let watched = parts.uri.path() == shared.method;
    if watched {
        shared.calls.fetch_add(1, Ordering::SeqCst);
    }
    let mut client = match client.ready().await {
        Ok(c) => c,
        Err(_) => return respond.send_reset(Reason::REFUSED_STREAM),
    };
    let end = body.is_end_stream();
    let (response, up_send) = match client.send_request(Request::from_parts(parts, ()), end) {
        Ok(r) => r,
        Err(_) => return respond.send_reset(Reason::REFUSED_STREAM),
    };
    // The request half; it cancels the upstream call when told to (or when the client resets).
    let (cancel_tx, cancel_rx) = oneshot::channel::<bool>();
    tokio::spawn(request_half(body, up_send, !end, cancel_rx));
    let response = match response.await {
        Ok(r) => r,
        Err(e) => return respond.send_reset(e.reason().unwrap_or(Reason::CANCEL)),
    };
    let (parts, mut body) = response.into_parts();
    let end = body.is_end_stream();
    let Ok(mut down) = respond.send_response(Response::from_parts(parts, ()), end) else {
        let _ = cancel_tx.send(false);
        return;
    };
    if end {
        return;
    }
    let mut wake = shared.wake.subscribe();
    let mut pending = BytesMut::new();
    let mut forwarded = 0usize;
    loop {
        if watched && pending.is_empty() && forwarded > 0 && shared.armed.compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            let (code, message) = shared.status.lock().unwrap().clone();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_str(&code.to_string()).unwrap());
            trailers.insert("grpc-message", HeaderValue::from_str(&message).unwrap_or(HeaderValue::from_static("aborted")));
            let _ = down.send_trailers(trailers);
            shared.aborted.fetch_add(1, Ordering::SeqCst);
            // Upstream, the call is ended gracefully: the request side is closed and the
            // response read to its end (or for at most 30 s, then reset), its messages counted
            // as dropped. Google's emulator, reset at once, goes on leasing new messages to the
            // reset call for a while, and they come back only after their ack deadline.
            let _ = cancel_tx.send(true);
            let mut pending = BytesMut::new();
            let drain = async {
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    pending.extend_from_slice(&chunk);
                    let (whole, n) = whole_messages(&pending);
                    let _ = pending.split_to(whole);
                    shared.dropped.fetch_add(n, Ordering::SeqCst);
                }
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), drain).await;
            return; // dropping the upstream response resets it, if it has not ended
        }
        tokio::select! {
            changed = wake.changed(), if watched => {
                if changed.is_err() {
                    return;
                }
            }
            data = body.data() => match data {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    let out = if watched {
                        pending.extend_from_slice(&chunk);
                        let (whole, n) = whole_messages(&pending);
                        forwarded += n;
                        shared.messages.fetch_add(n, Ordering::SeqCst);
                        pending.split_to(whole).freeze()
                    } else {
                        chunk
                    };
                    if !out.is_empty() && down.send_data(out, false).is_err() {
                        let _ = cancel_tx.send(false);
                        return;
                    }
                }
                Some(Err(e)) => {
                    down.send_reset(e.reason().unwrap_or(Reason::CANCEL));
                    return;
                }
                None => {
                    match body.trailers().await {
                        Ok(Some(t)) => {
                            let _ = down.send_trailers(t);
                        }
                        Ok(None) => {
                            let _ = down.send_data(Bytes::new(), true);
                        }
                        Err(e) => down.send_reset(e.reason().unwrap_or(Reason::CANCEL)),
                    }
                    return;
                }
            }
        }
    }
}

/// The bytes of the whole gRPC messages (a flag byte, a 4-byte length, the message) at the start
/// of `buf`, and how many messages they are.
fn whole_messages(buf: &[u8]) -> (usize, usize) {
    let (mut at, mut n) = (0usize, 0usize);
    while buf.len() - at >= 5 {
        let len = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
        if buf.len() - at < 5 + len {
            break;
        }
        at += 5 + len;
        n += 1;
    }
    (at, n)
}

/// Forwards the client's request messages upstream until they end, and resets the upstream call
/// when the client resets its own or `cancel` fires with `false`; with `true`, it closes the
/// request side instead (a graceful end).
async fn request_half(mut body: RecvStream, mut up: SendStream<Bytes>, mut open: bool, mut cancel: oneshot::Receiver<bool>) {
    loop {
        tokio::select! {
            fired = &mut cancel => {
                match fired {
                    Ok(true) if open => {
                        let _ = up.send_data(Bytes::new(), true);
                    }
                    Ok(false) => up.send_reset(Reason::CANCEL),
                    _ => {}
                }
                return;
            }
            data = body.data(), if open => match data {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    if up.send_data(chunk, false).is_err() {
                        return;
                    }
                }
                Some(Err(_)) => {
                    up.send_reset(Reason::CANCEL);
                    return;
                }
                None => {
                    open = false;
                    match body.trailers().await {
                        Ok(Some(t)) => {
                            let _ = up.send_trailers(t);
                        }
                        _ => {
                            let _ = up.send_data(Bytes::new(), true);
                        }
                    }
                }
            }
        }
    }
}
