//! Replaying a request body after a token rejection, for any `http_body::Body`.
//!
//! The model is the one production proxies use (linkerd2-proxy's `ReplayBody`): nothing is
//! buffered before the request is sent. While the body streams out on the first attempt, the
//! bytes that go out (and its trailers) are kept, up to a cap
//! ([`DEFAULT_MAX_REPLAY_BODY_BYTES`], 64 KiB, set with
//! [`OAuth2Layer::max_replay_body_bytes`](crate::OAuth2Layer::max_replay_body_bytes)). When the
//! whole body went out and fit under the cap, a replay sends the kept bytes again; once the body
//! grows past the cap the kept bytes are dropped, so a larger body costs no more memory than the
//! cap, and its rejection is returned as it is.
//!
//! Which body the service below [`RetryOnUnauthorized`](crate::RetryOnUnauthorized) receives is
//! decided by [`ReplayableBody::Sent`]:
//!
//! | caller's body | the service below receives | replay from |
//! |---|---|---|
//! | `Full<Bytes>`, `Empty<Bytes>`, `String`, `&'static str`, `Bytes`, `Vec<u8>`, `()` | the same type | a copy (a reference-count bump for `Full`/`Bytes`), made only when the body is at most the cap |
//! | `hyper::body::Incoming`, [`ReplayBody<B>`] (wrap any other body with [`ReplayBody::new`]) | [`ReplayBody<B>`] | the kept bytes |
//! | `UnsyncBoxBody<Bytes, E>`, `BoxBody<Bytes, E>` | the same boxed type | the kept bytes |
//! | `tonic::body::Body` (feature `tonic`), `axum::body::Body` (feature `axum`) | the same type | the kept bytes |

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{BodyExt as _, Empty, Full};
use pin_project_lite::pin_project;
use tokio::sync::oneshot;

/// The default cap on the request body bytes kept for a replay: 64 KiB. API requests that
/// carry a body (JSON, a gRPC unary message) are far smaller; a larger body (an upload) is sent
/// once, and a token rejection of it comes back as it is after the token was invalidated.
pub const DEFAULT_MAX_REPLAY_BODY_BYTES: usize = 64 * 1024;

pin_project! {
    /// A request body that keeps the bytes it sends, up to a cap, so the request can be sent
    /// once more after a token rejection; or, in a replay, a body that plays those bytes (and
    /// trailers) back.
    ///
    /// - Built by [`crate::RetryOnUnauthorized`] around bodies that cannot be copied
    ///   (`hyper::body::Incoming`, boxed bodies, tonic's and axum's bodies): the service below
    ///   then receives `ReplayBody<B>` (or the boxed type again).
    /// - [`ReplayBody::new`] wraps any other `http_body::Body<Data = Bytes>` so that
    ///   `with_retry()` can replay it: send `Request<ReplayBody<YourBody>>`, and the service
    ///   below receives `Request<ReplayBody<YourBody>>`.
    ///
    /// Frames pass through unchanged; the data of a frame is copied into the kept buffer only
    /// while the total stays at or under the cap. Errors are the inner body's, unchanged.
    pub struct ReplayBody<B> {
        #[pin]
        state: State<B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<B> {
        Sending {
            #[pin]
            inner: B,
            recorder: Option<Recorder>,
        },
        Replaying {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
        },
    }
}

/// What the first attempt keeps while its body streams out.
struct Recorder {
    kept: Kept,
    trailers: Option<HeaderMap>,
    max_bytes: usize,
    done: oneshot::Sender<Recorded>,
}

/// The kept bytes: one chunk is kept by reference (the usual single-frame body), more are
/// copied into one buffer.
enum Kept {
    Nothing,
    One(Bytes),
    Many(BytesMut),
}

/// The whole body of a first attempt, as sent.
#[derive(Debug, Default)]
pub struct Recorded {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl<B> ReplayBody<B> {
    /// Wraps `body` so that [`crate::OAuth2Layer::with_retry`] can replay it: it is sent as it
    /// is, and the retry keeps what it sends (up to the cap) for one replay. Use it for body
    /// types this crate does not know (`Request<ReplayBody<YourBody>>`).
    pub fn new(body: B) -> Self {
        Self {
            state: State::Sending {
                inner: body,
                recorder: None,
            },
        }
    }

    /// A body playing back `recorded`.
    pub fn replayed(recorded: Recorded) -> Self {
        Self {
            state: State::Replaying {
                data: (!recorded.data.is_empty()).then_some(recorded.data),
                trailers: recorded.trailers,
            },
        }
    }
}

impl<B: Body> ReplayBody<B> {
    /// Wraps `body` for a first attempt that keeps up to `max_bytes` of what it sends, and the
    /// [`Replay`] that yields the replay body once the first attempt's body went out completely
    /// (no replay when the body's size hint already says it is larger than `max_bytes`).
    pub fn record(body: B, max_bytes: usize) -> (Self, Replay<Self>) {
        Self::record_into(body, max_bytes, Self::replayed)
    }

    /// As [`record`](Self::record), with the replay body converted by `into_sent` (for example
    /// into a boxed body).
    fn record_into<T>(
        body: B,
        max_bytes: usize,
        into_sent: fn(Recorded) -> T,
    ) -> (Self, Replay<T>) {
        if body.size_hint().lower() > max_bytes as u64 {
            return (Self::new(body), Replay::none());
        }
        let (done, receiver) = oneshot::channel();
        let recorder = if body.is_end_stream() {
            // Nothing will be polled: the (empty) body is complete now.
            let _ = done.send(Recorded::default());
            None
        } else {
            Some(Recorder {
                kept: Kept::Nothing,
                trailers: None,
                max_bytes,
                done,
            })
        };
        let sent = Self {
            state: State::Sending {
                inner: body,
                recorder,
            },
        };
        (
            sent,
            Replay {
                kind: ReplayKind::Recorded {
                    receiver,
                    into_sent,
                },
            },
        )
    }
}

impl Recorder {
    /// Keeps `data`; `false` once the body no longer fits (the kept bytes are then dropped).
    fn keep(&mut self, data: &Bytes) -> bool {
        let kept_len = match &self.kept {
            Kept::Nothing => 0,
            Kept::One(bytes) => bytes.len(),
            Kept::Many(buffer) => buffer.len(),
        };
        if kept_len + data.len() > self.max_bytes {
            return false;
        }
        self.kept = match std::mem::replace(&mut self.kept, Kept::Nothing) {
            Kept::Nothing => Kept::One(data.clone()),
            Kept::One(first) => {
                let mut buffer = BytesMut::with_capacity(first.len() + data.len());
                buffer.extend_from_slice(&first);
                buffer.extend_from_slice(data);
                Kept::Many(buffer)
            }
            Kept::Many(mut buffer) => {
                buffer.extend_from_slice(data);
                Kept::Many(buffer)
            }
        };
        true
    }

    fn finish(self) {
        let data = match self.kept {
            Kept::Nothing => Bytes::new(),
            Kept::One(bytes) => bytes,
            Kept::Many(buffer) => buffer.freeze(),
        };
        // Nobody waiting (no rejection, or the retry gave up) is fine.
        let _ = self.done.send(Recorded {
            data,
            trailers: self.trailers,
        });
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().state.project() {
            StateProj::Sending {
                mut inner,
                recorder,
            } => {
                let frame = ready!(inner.as_mut().poll_frame(cx));
                match &frame {
                    Some(Ok(frame)) => {
                        if let Some(keeping) = recorder.as_mut() {
                            let fits = match frame.data_ref() {
                                Some(data) => keeping.keep(data),
                                None => {
                                    if let Some(trailers) = frame.trailers_ref() {
                                        keeping.trailers = Some(trailers.clone());
                                    }
                                    true
                                }
                            };
                            if !fits {
                                // Over the cap: drop what was kept; the replay is off.
                                *recorder = None;
                            } else if inner.is_end_stream() {
                                // Transports stop polling at the last frame: complete now.
                                if let Some(keeping) = recorder.take() {
                                    keeping.finish();
                                }
                            }
                        }
                    }
                    Some(Err(_)) => *recorder = None,
                    None => {
                        if let Some(keeping) = recorder.take() {
                            keeping.finish();
                        }
                    }
                }
                Poll::Ready(frame)
            }
            StateProj::Replaying { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(
                    trailers
                        .take()
                        .map(|trailers| Ok(Frame::trailers(trailers))),
                )
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Sending { inner, .. } => inner.is_end_stream(),
            State::Replaying { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Sending { inner, .. } => inner.size_hint(),
            State::Replaying { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Sending { recorder, .. } if recorder.is_some() => "sending, keeping a copy",
            State::Sending { .. } => "sending",
            State::Replaying { .. } => "replaying",
        };
        f.debug_struct("ReplayBody").field("state", &state).finish()
    }
}

/// How the copy for a replay is obtained: made by [`ReplayableBody::prepare`], consumed by
/// [`crate::RetryOnUnauthorized`] when a token rejection comes back.
pub struct Replay<T> {
    kind: ReplayKind<T>,
}

enum ReplayKind<T> {
    /// No replay possible (too large, or not wanted).
    None,
    /// A copy made before sending (in-memory bodies).
    Copy(Option<T>),
    /// The first attempt's body reports its bytes when it has gone out completely.
    Recorded {
        receiver: oneshot::Receiver<Recorded>,
        into_sent: fn(Recorded) -> T,
    },
}

impl<T> Replay<T> {
    /// No replay: the request is sent once.
    pub fn none() -> Self {
        Self {
            kind: ReplayKind::None,
        }
    }

    /// The replay sends `copy`, made before the first attempt (for bodies that copy cheaply).
    pub fn copy(copy: T) -> Self {
        Self {
            kind: ReplayKind::Copy(Some(copy)),
        }
    }

    /// Whether a replay may be possible (the first attempt may still turn out too large).
    pub(crate) fn is_possible(&self) -> bool {
        !matches!(self.kind, ReplayKind::None)
    }

    /// The replay body once it is known: `None` when the body did not fit under the cap, failed,
    /// or was dropped before it was sent completely. Waits while the first attempt's body is
    /// still going out.
    pub(crate) fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        match &mut self.kind {
            ReplayKind::None => Poll::Ready(None),
            ReplayKind::Copy(copy) => Poll::Ready(copy.take()),
            ReplayKind::Recorded {
                receiver,
                into_sent,
            } => {
                let recorded = ready!(Pin::new(receiver).poll(cx)).ok();
                Poll::Ready(recorded.map(*into_sent))
            }
        }
    }
}

impl<T> fmt::Debug for Replay<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            ReplayKind::None => "none",
            ReplayKind::Copy(_) => "copy",
            ReplayKind::Recorded { .. } => "recorded",
        };
        f.debug_struct("Replay").field("kind", &kind).finish()
    }
}

/// A request body that [`crate::OAuth2Layer::with_retry`] can send once more after a token
/// rejection. Implemented for the bodies users send: `Full<Bytes>`, `Empty<Bytes>`, `String`,
/// `&'static str`, `Bytes`, `Vec<u8>` and `()` (copied, and only when at most the cap);
/// `hyper::body::Incoming`, [`ReplayBody<B>`], `UnsyncBoxBody<Bytes, E>`, `BoxBody<Bytes, E>`,
/// `tonic::body::Body` (feature `tonic`) and `axum::body::Body` (feature `axum`) (their bytes
/// kept while they stream, up to the cap). To replay any other body type, wrap it in
/// [`ReplayBody::new`].
///
/// Implement it for a body type of your own that copies cheaply:
/// `type Sent = Self;` and `(self.clone(), Replay::copy(self))` in `prepare` when the body is
/// at most `max_replay_bytes` long.
#[diagnostic::on_unimplemented(
    message = "`with_retry()` cannot replay a request body of type `{Self}`",
    label = "requests with this body type cannot be replayed after a 401",
    note = "wrap the body in `nuvy_oauth2::ReplayBody::new(body)` (the service below then receives `ReplayBody<{Self}>`), or box it as `UnsyncBoxBody<Bytes, BoxError>`; `tonic::body::Body` and `axum::body::Body` need the crate features `tonic` and `axum`"
)]
pub trait ReplayableBody: Sized {
    /// The body type the service below the retry receives.
    type Sent;

    /// The body for the first attempt and how to get the replay copy; at most
    /// `max_replay_bytes` bytes may be kept (a larger body gets [`Replay::none`]).
    fn prepare(self, max_replay_bytes: usize) -> (Self::Sent, Replay<Self::Sent>);

    /// The body for a request that will not be replayed.
    fn into_sent(self) -> Self::Sent;
}

/// In-memory bodies: replayed from a copy taken before sending, when at most the cap.
macro_rules! replayable_by_copy {
    ($($body:ty => $len:expr),* $(,)?) => {
        $(impl ReplayableBody for $body {
            type Sent = Self;

            fn prepare(self, max_replay_bytes: usize) -> (Self, Replay<Self>) {
                let len: fn(&Self) -> usize = $len;
                if len(&self) > max_replay_bytes {
                    return (self, Replay::none());
                }
                (self.clone(), Replay::copy(self))
            }

            fn into_sent(self) -> Self {
                self
            }
        })*
    };
}

replayable_by_copy!(
    Full<Bytes> => |body| usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX),
    Empty<Bytes> => |_| 0,
    String => String::len,
    &'static str => |body| body.len(),
    Bytes => Bytes::len,
    Vec<u8> => Vec::len,
    () => |_| 0,
);

/// Streaming bodies sent as [`ReplayBody`]: replayed from the bytes kept while they streamed.
macro_rules! replayable_by_recording {
    ($($body:ty),* $(,)?) => {
        $(impl ReplayableBody for $body {
            type Sent = ReplayBody<Self>;

            fn prepare(self, max_replay_bytes: usize) -> (Self::Sent, Replay<Self::Sent>) {
                ReplayBody::record(self, max_replay_bytes)
            }

            fn into_sent(self) -> Self::Sent {
                ReplayBody::new(self)
            }
        })*
    };
}

replayable_by_recording!(hyper::body::Incoming);

impl<B: Body> ReplayableBody for ReplayBody<B> {
    type Sent = Self;

    fn prepare(self, max_replay_bytes: usize) -> (Self, Replay<Self>) {
        match self.state {
            State::Sending { inner, .. } => ReplayBody::record(inner, max_replay_bytes),
            State::Replaying { data, trailers } => {
                let copy = Self {
                    state: State::Replaying {
                        data: data.clone(),
                        trailers: trailers.clone(),
                    },
                };
                let sent = Self {
                    state: State::Replaying { data, trailers },
                };
                (sent, Replay::copy(copy))
            }
        }
    }

    fn into_sent(self) -> Self {
        self
    }
}

impl<E> ReplayableBody for UnsyncBoxBody<Bytes, E>
where
    E: 'static,
{
    type Sent = Self;

    fn prepare(self, max_replay_bytes: usize) -> (Self, Replay<Self>) {
        let (sent, replay) = ReplayBody::record_into(self, max_replay_bytes, |recorded| {
            ReplayBody::<Self>::replayed(recorded).boxed_unsync()
        });
        (sent.boxed_unsync(), replay)
    }

    fn into_sent(self) -> Self {
        self
    }
}

impl<E> ReplayableBody for BoxBody<Bytes, E>
where
    E: 'static,
{
    type Sent = Self;

    fn prepare(self, max_replay_bytes: usize) -> (Self, Replay<Self>) {
        let (sent, replay) = ReplayBody::record_into(self, max_replay_bytes, |recorded| {
            ReplayBody::<Self>::replayed(recorded).boxed()
        });
        (sent.boxed(), replay)
    }

    fn into_sent(self) -> Self {
        self
    }
}

#[cfg(feature = "tonic")]
impl ReplayableBody for tonic::body::Body {
    type Sent = Self;

    fn prepare(self, max_replay_bytes: usize) -> (Self, Replay<Self>) {
        let (sent, replay) = ReplayBody::record_into(self, max_replay_bytes, |recorded| {
            tonic::body::Body::new(ReplayBody::<Self>::replayed(recorded))
        });
        (tonic::body::Body::new(sent), replay)
    }

    fn into_sent(self) -> Self {
        self
    }
}

#[cfg(feature = "axum")]
impl ReplayableBody for axum_core::body::Body {
    type Sent = Self;

    fn prepare(self, max_replay_bytes: usize) -> (Self, Replay<Self>) {
        let (sent, replay) = ReplayBody::record_into(self, max_replay_bytes, |recorded| {
            axum_core::body::Body::new(ReplayBody::<Self>::replayed(recorded))
        });
        (axum_core::body::Body::new(sent), replay)
    }

    fn into_sent(self) -> Self {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::channel::Channel;
    use std::task::Waker;

    fn streamed(chunks: &[&'static [u8]], trailers: bool) -> Channel<Bytes> {
        let (mut sender, body) = Channel::new(chunks.len() + 1);
        for chunk in chunks {
            sender
                .try_send(Frame::data(Bytes::from_static(chunk)))
                .unwrap();
        }
        if trailers {
            let mut map = HeaderMap::new();
            map.insert("grpc-status", "0".parse().unwrap());
            sender.try_send(Frame::trailers(map)).unwrap();
        }
        body
    }

    fn replay_now<T>(replay: &mut Replay<T>) -> Poll<Option<T>> {
        replay.poll_body(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn the_replay_plays_back_every_byte_and_the_trailers_sent() {
        let (sent, mut replay) = ReplayBody::record(streamed(&[b"ab", b"cd", b"e"], true), 5);
        assert!(replay_now(&mut replay).is_pending(), "not sent yet");
        let first = sent.collect().await.unwrap();
        assert_eq!(first.trailers().unwrap()["grpc-status"], "0");
        let Poll::Ready(Some(copy)) = replay_now(&mut replay) else {
            panic!("the whole body fit")
        };
        assert_eq!(copy.size_hint().exact(), Some(5));
        let second = copy.collect().await.unwrap();
        assert_eq!(second.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(second.to_bytes(), "abcde");
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_sent_whole_but_not_replayed() {
        let (sent, mut replay) = ReplayBody::record(streamed(&[b"abc", b"def"], false), 5);
        assert_eq!(sent.collect().await.unwrap().to_bytes(), "abcdef");
        assert!(matches!(replay_now(&mut replay), Poll::Ready(None)));
    }

    #[tokio::test]
    async fn a_body_dropped_before_it_was_sent_completely_is_not_replayed() {
        let (mut sent, mut replay) = ReplayBody::record(streamed(&[b"abc"], false), 100);
        let frame = sent.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        drop(sent);
        assert!(matches!(replay_now(&mut replay), Poll::Ready(None)));
    }

    #[tokio::test]
    async fn a_size_hint_over_the_cap_means_no_recording_at_all() {
        let (_sent, mut replay) = ReplayBody::record(Full::new(Bytes::from_static(b"abcdef")), 5);
        assert!(!replay.is_possible());
        assert!(matches!(replay_now(&mut replay), Poll::Ready(None)));
    }

    #[tokio::test]
    async fn an_empty_body_is_replayable_without_being_polled() {
        let (_sent, mut replay) = ReplayBody::record(Empty::<Bytes>::new(), 5);
        let Poll::Ready(Some(copy)) = replay_now(&mut replay) else {
            panic!("empty bodies are complete at once")
        };
        assert!(copy.is_end_stream());
    }
}
