//! The body type host-shim passes around: a boxed body, and a channel-fed body for streams whose
//! data goes through the plugin chunk by chunk.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::mpsc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// `body` with its size hidden, so that HTTP/1.1 frames it chunked rather than with a
/// `content-length` of hyper's own.
pub fn without_length(body: Body) -> Body {
    UnsizedBody(body).boxed_unsync()
}

struct UnsizedBody(Body);

impl HttpBody for UnsizedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }
}

/// `body`, aborted (as Envoy resets the stream) if it has not ended by `deadline`: a route's
/// timeout covers the whole response, not only its head. `on_timeout` runs if it fires. The
/// timer starts only once the body has to be waited for, so a response already received whole
/// costs none.
pub fn until(
    body: Body,
    deadline: tokio::time::Instant,
    on_timeout: impl FnOnce() + Send + 'static,
) -> Body {
    DeadlineBody {
        inner: body,
        deadline,
        timer: None,
        on_timeout: Some(Box::new(on_timeout)),
        timed_out: false,
    }
    .boxed_unsync()
}

struct DeadlineBody {
    inner: Body,
    deadline: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    on_timeout: Option<Box<dyn FnOnce() + Send>>,
    timed_out: bool,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.timed_out {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.timed_out = true;
        if let Some(on_timeout) = this.on_timeout.take() {
            on_timeout();
        }
        Poll::Ready(Some(Err("upstream response timeout".into())))
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A body fed from a channel; the sender side sends frames, or an error to abort the stream.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

pub type BodySender = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

pub fn channel() -> (BodySender, Body) {
    let (tx, rx) = mpsc::channel(4);
    (tx, ChannelBody { rx }.boxed_unsync())
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}

/// The body's data if all of it is already buffered (nothing to wait for), else a body that
/// yields exactly what the original would have (the frames read so far come first).
pub fn take_if_complete(mut body: Body) -> Result<Bytes, Body> {
    let mut data: Vec<Bytes> = Vec::new();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let pending = loop {
        if body.is_end_stream() {
            break None;
        }
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(None) => break None,
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => data.push(d),
                Err(other) => break Some(Ok(other)),
            },
            Poll::Ready(Some(Err(e))) => break Some(Err(e)),
            Poll::Pending => {
                return Err(Prepend {
                    head: data,
                    next: None,
                    rest: body,
                }
                .boxed_unsync())
            }
        }
    };
    match pending {
        None => Ok(match data.len() {
            0 => Bytes::new(),
            1 => data.pop().unwrap_or_default(),
            _ => Bytes::from(data.concat()),
        }),
        Some(next) => Err(Prepend {
            head: data,
            next: Some(next),
            rest: body,
        }
        .boxed_unsync()),
    }
}

/// `frame`, already taken from `rest`, put back in front of it.
pub fn prepend(frame: Result<Frame<Bytes>, BoxError>, rest: Body) -> Body {
    Prepend {
        head: Vec::new(),
        next: Some(frame),
        rest,
    }
    .boxed_unsync()
}

/// Frames already taken from a body, then the body itself.
struct Prepend {
    head: Vec<Bytes>,
    next: Option<Result<Frame<Bytes>, BoxError>>,
    rest: Body,
}

impl HttpBody for Prepend {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.head.is_empty() {
            let d = self.head.remove(0);
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if let Some(next) = self.next.take() {
            return Poll::Ready(Some(next));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.next.is_none() && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_complete_body_is_taken_and_a_pending_one_is_given_back_whole() {
        assert_eq!(take_if_complete(full("abc")).ok(), Some(Bytes::from("abc")));
        assert_eq!(take_if_complete(empty()).ok(), Some(Bytes::new()));

        let (tx, b) = channel();
        tx.send(Ok(Frame::data(Bytes::from("one")))).await.unwrap();
        let rest = take_if_complete(b).expect_err("the sender is still open");
        tx.send(Ok(Frame::data(Bytes::from("two")))).await.unwrap();
        drop(tx);
        let all = rest.collect().await.unwrap().to_bytes();
        assert_eq!(all, Bytes::from("onetwo"));
    }
}
