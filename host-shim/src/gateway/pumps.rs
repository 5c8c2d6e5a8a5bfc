//! Body pumps: a request or response body fed chunk by chunk through the plugin's body (and
//! trailers) callbacks, buffered while the plugin pauses, and passed on untouched after a VM
//! failure under `fail_open`.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use tokio::sync::Notify;

use crate::abi::Action;
use crate::body::{self, Body, BodySender};
use crate::state::PauseOutcome;

use super::convert::{header_list_of, header_map_of};
use super::stream::{
    closes_unread_body, idle_deadline, idle_timeout_reply, wait_for_wake, StreamFailure, Verdict,
};
use super::worker::Worker;

/// One body on its way through the plugin's body callbacks.
pub(super) struct BodyPump {
    pub(super) worker: Rc<Worker>,
    pub(super) ctx: u32,
    pub(super) generation: u64,
    pub(super) wake: Arc<Notify>,
    pub(super) dir: Direction,
    /// What is there when the pump starts is handed over with the end in one call when it is
    /// all there (Envoy buffered it while the headers phase was paused); otherwise the end
    /// comes in a call of its own, as Envoy's HTTP/1 codec reports it.
    pub(super) end_with_data: bool,
}

/// Which body a pump feeds through the plugin.
#[derive(Clone, Copy)]
pub(super) enum Direction {
    Request,
    Response,
}

/// `first` and the data frames of `body` that are there without waiting for the peer, as one
/// chunk (what one socket read gives Envoy's codec; hyper decodes on its connection task, so
/// that task gets a turn before the body counts as drained), and whether the body ended. A
/// trailers frame stays for the next read.
async fn with_ready_data(first: Bytes, body: &mut Body) -> (Bytes, bool) {
    let mut more: Option<bytes::BytesMut> = None;
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut yielded = false;
    loop {
        if body.is_end_stream() {
            break (more.map_or(first, bytes::BytesMut::freeze), true);
        }
        match std::pin::Pin::new(&mut *body).poll_frame(&mut cx) {
            std::task::Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                let data = frame.into_data().unwrap_or_default();
                more.get_or_insert_with(|| bytes::BytesMut::from(&first[..]))
                    .extend_from_slice(&data);
                yielded = false;
            }
            std::task::Poll::Ready(Some(other)) => {
                *body = body::prepend(other, std::mem::replace(body, body::empty()));
                break (more.map_or(first, bytes::BytesMut::freeze), false);
            }
            std::task::Poll::Ready(None) => {
                *body = body::empty();
                break (more.map_or(first, bytes::BytesMut::freeze), true);
            }
            std::task::Poll::Pending if !yielded => {
                yielded = true;
                tokio::task::yield_now().await;
            }
            std::task::Poll::Pending => break (more.map_or(first, bytes::BytesMut::freeze), false),
        }
    }
}

/// Feeds one body, chunk by chunk, through the plugin's body callback into `tx`. While the
/// plugin answers Pause, chunks accumulate (it sees the whole buffer each time); Continue
/// flushes the buffer. Returns what the plugin decided for the request direction.
pub(super) async fn pump_body(
    pump: &BodyPump,
    body: &mut Body,
    tx: BodySender,
) -> Result<Verdict, StreamFailure> {
    let (worker, ctx, generation, wake, dir) = (
        &pump.worker,
        pump.ctx,
        pump.generation,
        &pump.wake,
        pump.dir,
    );
    let mut end_with_data = pump.end_with_data;
    let mut saw_eos = false;
    // Chunks given to the plugin but not yet released downstream: what a fail-open
    // pass-through still owes the peer if the VM dies.
    let mut held: Vec<Bytes> = Vec::new();
    loop {
        let frame = if saw_eos { None } else { body.frame().await };
        let (chunk, trailers, eos) = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                // Envoy's HTTP/1 codec hands over what one read brought (several chunks of a
                // chunked body at once) and says the request ended in a call of its own:
                // `(n, false)` then `(0, true)`.
                Ok(data) => {
                    let (data, ended) = with_ready_data(data, body).await;
                    let eos = end_with_data && ended;
                    (Some(data), None, eos)
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(t) => (None, Some(header_list_of(&t)), true),
                    Err(_) => continue,
                },
            },
            Some(Err(e)) => {
                let _ = tx.send(Err(e)).await;
                return Ok(Verdict::Continue);
            }
            None => (None, None, true),
        };
        if saw_eos && chunk.is_none() {
            return Ok(Verdict::Continue);
        }
        end_with_data = false;
        saw_eos = eos;
        if let Some(c) = &chunk {
            held.push(c.clone());
        }

        let mut guard = worker.vm.lock().await;
        let Some(slot) = guard.as_mut().filter(|s| s.generation == generation) else {
            drop(guard);
            return body_after_vm_failure(worker, held, body, &tx, eos).await;
        };
        let Some(s) = slot.vm.stream(ctx) else {
            drop(guard);
            return body_after_vm_failure(worker, held, body, &tx, eos).await;
        };
        let buffered = match dir {
            Direction::Request => &mut s.request_body,
            Direction::Response => &mut s.response_body,
        };
        if let Some(chunk) = &chunk {
            buffered.extend_from_slice(chunk);
        }
        let size = buffered.len();
        if let (Direction::Request, Some(chunk)) = (dir, &chunk) {
            s.request_body_received += chunk.len();
        }
        if let Some(t) = &trailers {
            match dir {
                Direction::Request => s.request_trailers = Some(t.clone()),
                Direction::Response => s.response_trailers = Some(t.clone()),
            }
        }
        let mut result = match dir {
            Direction::Request => {
                slot.vm
                    .on_request_body(ctx, size, eos && trailers.is_none())
                    .await
            }
            Direction::Response => {
                slot.vm
                    .on_response_body(ctx, size, eos && trailers.is_none())
                    .await
            }
        };
        if let (Ok(Action::Continue), Some(t)) = (&result, &trailers) {
            result = match dir {
                Direction::Request => slot.vm.on_request_trailers(ctx, t.len()).await,
                Direction::Response => slot.vm.on_response_trailers(ctx, t.len()).await,
            };
        }
        let callouts = slot.vm.take_callouts();
        let action = match result {
            Ok(a) => a,
            Err(_) => {
                drop(guard);
                worker.vm_trapped();
                return body_after_vm_failure(worker, held, body, &tx, eos).await;
            }
        };
        let Some(s) = slot.vm.stream(ctx) else {
            drop(guard);
            return body_after_vm_failure(worker, held, body, &tx, eos).await;
        };
        if s.closed {
            let _ = tx.send(Err("stream closed by the plugin".into())).await;
            return Err(StreamFailure::Closed);
        }
        if let Some(mut local) = s.local_response.take() {
            drop(guard);
            worker.dispatch(callouts, generation);
            let _ = tx.send(Err("replaced by a local reply".into())).await;
            // Before the plugin was given the request's end, as Envoy counts it.
            if !eos && matches!(dir, Direction::Request) {
                closes_unread_body(&mut local);
            }
            return Ok(Verdict::Local(local));
        }
        let mut flush = None;
        if action == Action::Continue {
            let buffered = match dir {
                Direction::Request => &mut s.request_body,
                Direction::Response => &mut s.response_body,
            };
            flush = Some(std::mem::take(buffered));
        }
        let trailers_out = if action == Action::Continue {
            match dir {
                Direction::Request => s.request_trailers.clone(),
                Direction::Response => s.response_trailers.clone(),
            }
        } else {
            None
        };
        drop(guard);
        worker.dispatch(callouts, generation);

        match flush {
            Some(data) => {
                held.clear();
                if !data.is_empty() && tx.send(Ok(Frame::data(Bytes::from(data)))).await.is_err() {
                    return Ok(Verdict::Continue);
                }
                if let Some(t) = trailers_out {
                    let _ = tx.send(Ok(Frame::trailers(header_map_of(&t)))).await;
                }
                if eos {
                    return Ok(Verdict::Continue);
                }
            }
            None if eos => {
                // The plugin holds the whole body: wait for it to resume, then flush; no longer
                // than the stream idle timeout.
                let deadline = idle_deadline(&worker.spec);
                loop {
                    {
                        let mut guard = worker.vm.lock().await;
                        let Some(s) = guard
                            .as_mut()
                            .filter(|s| s.generation == generation)
                            .and_then(|s| s.vm.stream(ctx))
                        else {
                            drop(guard);
                            return body_after_vm_failure(worker, held, body, &tx, true).await;
                        };
                        match s.take_pause_outcome(matches!(dir, Direction::Response)) {
                            None => {}
                            Some(PauseOutcome::Closed) => {
                                let _ = tx.send(Err("stream closed by the plugin".into())).await;
                                return Err(StreamFailure::Closed);
                            }
                            Some(PauseOutcome::Local(local)) => {
                                let _ = tx.send(Err("replaced by a local reply".into())).await;
                                return Ok(Verdict::Local(local));
                            }
                            Some(PauseOutcome::Resumed) => {
                                let (data, trailers) = match dir {
                                    Direction::Request => (
                                        std::mem::take(&mut s.request_body),
                                        s.request_trailers.clone(),
                                    ),
                                    Direction::Response => (
                                        std::mem::take(&mut s.response_body),
                                        s.response_trailers.clone(),
                                    ),
                                };
                                drop(guard);
                                held.clear();
                                if !data.is_empty() {
                                    let _ = tx.send(Ok(Frame::data(Bytes::from(data)))).await;
                                }
                                if let Some(t) = trailers {
                                    let _ = tx.send(Ok(Frame::trailers(header_map_of(&t)))).await;
                                }
                                return Ok(Verdict::Continue);
                            }
                        }
                    }
                    if !wait_for_wake(wake, deadline).await {
                        let _ = tx.send(Err("stream idle timeout".into())).await;
                        return match dir {
                            // Envoy answers 408 while the response has not started...
                            Direction::Request => Ok(Verdict::Local(idle_timeout_reply())),
                            // ...and resets the stream once it has.
                            Direction::Response => Err(StreamFailure::Closed),
                        };
                    }
                }
            }
            None => {}
        }
    }
}

/// The VM failed while a body was going through it. With `fail_open` the rest passes through
/// untouched (first what the plugin had not released yet); otherwise the stream is aborted.
async fn body_after_vm_failure(
    worker: &Rc<Worker>,
    held: Vec<Bytes>,
    body: &mut Body,
    tx: &BodySender,
    eos_seen: bool,
) -> Result<Verdict, StreamFailure> {
    if !worker.fail_open() {
        let _ = tx.send(Err("plugin VM failed".into())).await;
        return Err(StreamFailure::Vm);
    }
    worker
        .shared
        .counters
        .fail_open_passes
        .fetch_add(1, Ordering::Relaxed);
    for chunk in held {
        if tx.send(Ok(Frame::data(chunk))).await.is_err() {
            return Ok(Verdict::Continue);
        }
    }
    if !eos_seen {
        while let Some(frame) = body.frame().await {
            let failed = frame.is_err();
            if tx.send(frame).await.is_err() || failed {
                break;
            }
        }
    }
    Ok(Verdict::Continue)
}
