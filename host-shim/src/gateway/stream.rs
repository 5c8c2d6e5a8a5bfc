//! One request through the plugin: `on_request_headers`, waiting while the plugin pauses, the
//! upstream exchange, `on_response_headers` and the response body, local replies, and the end of
//! the stream (`on_done`, `on_log`, `on_delete`) wherever it comes.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body::Body as _;
use tokio::sync::Notify;

use crate::abi::{Action, HeaderList};
use crate::body::{self, Body};
use crate::conn_manager;
use crate::envoy_config::RouteEntry;
use crate::state::{PauseOutcome, StreamInfo, StreamState};
use crate::vm::{Vm, VmError};

use super::convert::{header_list_of, header_str, response_builder, response_header_list};
use super::pumps::{pump_body, BodyPump, Direction};
use super::replies::{local_response_parts, plain_response, reset_response};
use super::worker::Worker;
use super::GatewaySpec;

/// Why a stream could not go on through the plugin.
pub(super) enum StreamFailure {
    /// The VM trapped or was replaced: apply the failure policy.
    Vm,
    /// The plugin closed the stream: reset the connection.
    Closed,
}

/// What the plugin decided at a pause point.
pub(super) enum Verdict {
    Continue,
    Local(crate::state::LocalResponse),
}

/// One request going through the plugin.
pub(super) struct FilteredStream {
    pub(super) worker: Rc<Worker>,
    pub(super) ctx: u32,
    pub(super) generation: u64,
    pub(super) wake: Arc<Notify>,
    pub(super) finished: bool,
    /// The request headers as received, for a fail-open pass-through (empty otherwise).
    original_headers: HeaderList,
    /// The last headers phase paused (the plugin resumed it later): Envoy buffered what body
    /// arrived meanwhile, its end included, and hands it over in one call.
    paused: bool,
}

impl Drop for FilteredStream {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away mid-stream: the plugin still gets on_done/on_log/on_delete.
            // Queued (not spawned) so that a drop during shutdown cannot panic.
            let _ = self.worker.abandoned.send((self.ctx, self.generation));
        }
    }
}

pub(super) async fn finish(worker: &Rc<Worker>, ctx: u32, generation: u64) {
    let mut guard = worker.vm.lock().await;
    let Some(slot) = guard.as_mut().filter(|s| s.generation == generation) else {
        return;
    };
    if let Some(s) = slot.vm.stream(ctx) {
        encoded_response_map(&worker.spec.connection_manager, s);
    }
    let result = slot.vm.finish_stream(ctx).await;
    let callouts = slot.vm.take_callouts();
    drop(guard);
    worker.after_callback(result, callouts, generation);
}

/// The response map as the log phase reads it in Envoy: the connection manager and the codec
/// add `date`, `server` and `connection: close` to the map itself after the response phase
/// (Envoy 1.40, measured; the chunked framing is written without entering the map).
fn encoded_response_map(cm: &conn_manager::ConnectionManagerConfig, s: &mut StreamState) {
    let closes = s.info.client_closes;
    let Some(map) = s.response_headers.as_mut() else {
        return;
    };
    let mut encoded = http::HeaderMap::new();
    for (k, v) in map.iter() {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_bytes(v),
        ) {
            encoded.append(k, v);
        }
    }
    conn_manager::encode_response_headers(cm, &mut encoded);
    for name in [http::header::DATE, http::header::SERVER] {
        let value = encoded.get(&name).map(|v| v.as_bytes().to_vec());
        match (map.iter_mut().find(|(k, _)| k == name.as_str()), value) {
            (Some(entry), Some(v)) => entry.1 = v,
            (None, Some(v)) => map.push((name.as_str().to_string(), v)),
            _ => {}
        }
    }
    if closes && !map.iter().any(|(k, _)| k == "connection") {
        map.push(("connection".into(), b"close".to_vec()));
    }
}

/// Envoy 1.40 answers a local reply sent before the plugin was given the request's end (in the
/// headers phase of a request with a body, or in a body call before the last) with
/// `connection: close`, and closes the connection after it.
pub(super) fn closes_unread_body(local: &mut crate::state::LocalResponse) {
    local.closes_connection = true;
}

/// Stream state read back from the VM after a callback.
struct Outcome {
    action: Action,
    pub(super) local: Option<crate::state::LocalResponse>,
    pub(super) closed: bool,
}

impl FilteredStream {
    /// Creates the stream's context and runs `on_request_headers`.
    pub(super) async fn begin(
        worker: Rc<Worker>,
        info: StreamInfo,
        headers: HeaderList,
        kept: Option<HeaderList>,
    ) -> Result<FilteredStream, StreamFailure> {
        let original_headers = kept.unwrap_or_default();
        let mut guard = worker.vm.lock().await;
        let Some(slot) = guard.as_mut() else {
            return Err(StreamFailure::Vm);
        };
        let state = StreamState::new(info, headers);
        let wake = state.wake.clone();
        let generation = slot.generation;
        let ctx = match slot.vm.create_stream(state).await {
            Ok(ctx) => ctx,
            Err(_) => {
                drop(guard);
                worker.vm_trapped();
                return Err(StreamFailure::Vm);
            }
        };
        drop(guard);
        Ok(FilteredStream {
            worker,
            ctx,
            generation,
            wake,
            finished: false,
            original_headers,
            paused: false,
        })
    }

    /// Runs one callback on this stream's VM, then reads back what the plugin decided.
    async fn callback<F>(&mut self, f: F) -> Result<Outcome, StreamFailure>
    where
        F: for<'a> FnOnce(
            &'a mut Vm,
            u32,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Action, VmError>> + 'a>,
        >,
    {
        let mut guard = self.worker.vm.lock().await;
        let Some(slot) = guard.as_mut().filter(|s| s.generation == self.generation) else {
            self.finished = true;
            return Err(StreamFailure::Vm);
        };
        let result = f(&mut slot.vm, self.ctx).await;
        let callouts = slot.vm.take_callouts();
        let outcome = match result {
            Ok(action) => match slot.vm.stream(self.ctx) {
                Some(s) => Ok(Outcome {
                    action,
                    local: s.local_response.take(),
                    closed: s.closed,
                }),
                None => Err(StreamFailure::Vm),
            },
            Err(_) => Err(StreamFailure::Vm),
        };
        drop(guard);
        match &outcome {
            Ok(_) => self.worker.dispatch(callouts, self.generation),
            Err(_) => {
                self.finished = true;
                self.worker.vm_trapped();
            }
        }
        outcome
    }

    /// Waits until the plugin resumes the request (or response) or answers locally.
    async fn wait(&mut self, response: bool) -> Result<Verdict, StreamFailure> {
        // Envoy's stream idle timeout: a plugin that never resumes does not hold the client
        // forever.
        let deadline = idle_deadline(&self.worker.spec);
        loop {
            {
                let mut guard = self.worker.vm.lock().await;
                // A VM that trapped (or was replaced) will not resume this stream.
                let Some(slot) = guard
                    .as_mut()
                    .filter(|s| s.generation == self.generation && s.vm.failed.is_none())
                else {
                    self.finished = true;
                    return Err(StreamFailure::Vm);
                };
                let Some(s) = slot.vm.stream(self.ctx) else {
                    return Err(StreamFailure::Vm);
                };
                match s.take_pause_outcome(response) {
                    Some(PauseOutcome::Closed) => return Err(StreamFailure::Closed),
                    Some(PauseOutcome::Local(local)) => return Ok(Verdict::Local(local)),
                    Some(PauseOutcome::Resumed) => return Ok(Verdict::Continue),
                    None => {}
                }
            }
            if !wait_for_wake(&self.wake, deadline).await {
                return Ok(Verdict::Local(idle_timeout_reply()));
            }
        }
    }

    /// After a callback that may pause: wait if paused; a local reply wins either way.
    async fn settle(&mut self, outcome: Outcome, response: bool) -> Result<Verdict, StreamFailure> {
        if outcome.closed {
            return Err(StreamFailure::Closed);
        }
        if let Some(local) = outcome.local {
            return Ok(Verdict::Local(local));
        }
        self.paused = outcome.action == Action::Pause;
        match outcome.action {
            Action::Continue => {
                // A resume the plugin issued during the callback itself is not needed any more.
                Ok(Verdict::Continue)
            }
            Action::Pause => self.wait(response).await,
        }
    }

    pub(super) async fn run(mut self, route: Option<RouteEntry>, mut body: Body) -> Response<Body> {
        let eos = body.is_end_stream();
        let outcome = match self
            .callback(|vm, ctx| Box::pin(vm.on_request_headers(ctx, eos)))
            .await
        {
            Ok(o) => o,
            Err(e) => return self.failed(e, route.as_ref(), body).await,
        };
        match self.settle(outcome, false).await {
            Ok(Verdict::Continue) => {}
            Ok(Verdict::Local(mut local)) => {
                if !eos {
                    closes_unread_body(&mut local);
                }
                return self.local_reply(local).await;
            }
            Err(e) => return self.failed(e, route.as_ref(), body).await,
        }

        // Request body: stream chunks through on_request_body into the upstream request.
        let upstream_body = if eos {
            body::empty()
        } else {
            let (tx, upstream_body) = body::channel();
            let (local_tx, local_rx) = tokio::sync::oneshot::channel();
            let pump = BodyPump {
                worker: self.worker.clone(),
                ctx: self.ctx,
                generation: self.generation,
                wake: self.wake.clone(),
                dir: Direction::Request,
                end_with_data: self.paused,
            };
            tokio::task::spawn_local(async move {
                let verdict = pump_body(&pump, &mut body, tx).await;
                let _ = local_tx.send(verdict);
            });
            // Hold the upstream exchange until the body settles, unless a local reply or a
            // failure comes first.
            return self.proxy(route, upstream_body, Some(local_rx)).await;
        };
        self.proxy(route, upstream_body, None).await
    }

    async fn proxy(
        mut self,
        mut route: Option<RouteEntry>,
        upstream_body: Body,
        body_verdict: Option<tokio::sync::oneshot::Receiver<Result<Verdict, StreamFailure>>>,
    ) -> Response<Body> {
        let headers = {
            let mut guard = self.worker.vm.lock().await;
            match guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
            {
                Some(s) => {
                    // The router matches the request as the filters left it (Envoy clears its
                    // route cache when a plugin edits the headers), and finds no route for a
                    // request without x-forwarded-proto (Envoy 1.40's route table refuses it).
                    route = match header_str(&s.request_headers, "x-forwarded-proto") {
                        None => None,
                        Some(_) => header_str(&s.request_headers, ":path")
                            .and_then(|p| self.worker.spec.route_for(p).cloned()),
                    };
                    // The router edits the request's own map: the log phase sees it so.
                    conn_manager::router_request_headers(
                        &self.worker.spec.connection_manager,
                        &mut s.request_headers,
                        route.as_ref().and_then(RouteEntry::effective_timeout),
                    );
                    let mut h = s.request_headers.clone();
                    if s.request_body_modified {
                        h.retain(|(k, _)| k != "content-length");
                    }
                    h
                }
                None => {
                    drop(guard);
                    self.finished = true;
                    return self
                        .worker
                        .fail_by_policy(route.as_ref(), Vec::new(), body::empty())
                        .await;
                }
            }
        };
        let worker = self.worker.clone();
        let upstream = worker.send_upstream(route.as_ref(), headers, upstream_body);
        let upstream = match body_verdict {
            None => upstream.await,
            Some(mut verdict_rx) => {
                tokio::pin!(upstream);
                tokio::select! {
                    r = &mut upstream => r,
                    v = &mut verdict_rx => match v {
                        Ok(Ok(Verdict::Continue)) | Err(_) => upstream.await,
                        Ok(Ok(Verdict::Local(local))) => return self.local_reply(local).await,
                        Ok(Err(StreamFailure::Closed)) => return reset_response(),
                        Ok(Err(StreamFailure::Vm)) => {
                            self.finished = true;
                            return plain_response(503, "");
                        }
                    },
                }
            }
        };
        let mut close = false;
        let (status, resp_headers, resp_body) = match upstream {
            Ok(resp) => {
                let (parts, incoming) = resp.into_parts();
                let mut h = vec![(
                    ":status".to_string(),
                    parts.status.as_str().as_bytes().to_vec(),
                )];
                h.extend(response_header_list(&parts));
                (parts.status, h, incoming)
            }
            Err(local) => {
                let (parts, b) = local.into_parts();
                close = parts.headers.get(http::header::CONNECTION)
                    == Some(&HeaderValue::from_static("close"));
                let mut h = vec![(
                    ":status".to_string(),
                    parts.status.as_str().as_bytes().to_vec(),
                )];
                h.extend(header_list_of(&parts.headers));
                (parts.status, h, b)
            }
        };
        let _ = status;
        let mut resp = self.respond(resp_headers, resp_body, false).await;
        if close {
            // Hop-by-hop, so the response phase does not carry it: the codec's own decision.
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// Runs the response phase: `on_response_headers`, then the body through `on_response_body`.
    /// `local`: the plugin's own reply, whose body Envoy hands the response phase in one call
    /// with the end.
    async fn respond(
        mut self,
        headers: HeaderList,
        resp_body: Body,
        local: bool,
    ) -> Response<Body> {
        let eos = resp_body.is_end_stream();
        // With fail_open, a VM failure here passes the upstream's response on as it came.
        let kept = self.worker.fail_open().then(|| headers.clone());
        {
            let mut guard = self.worker.vm.lock().await;
            if let Some(s) = guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
            {
                s.response_headers = Some(headers);
            }
        }
        let outcome = match self
            .callback(|vm, ctx| Box::pin(vm.on_response_headers(ctx, eos)))
            .await
        {
            Ok(o) => o,
            Err(StreamFailure::Closed) => return reset_response(),
            Err(StreamFailure::Vm) => return self.response_after_vm_failure(kept, resp_body),
        };
        match self.settle(outcome, true).await {
            Ok(Verdict::Continue) => {}
            Ok(Verdict::Local(local)) => {
                // A local reply during the response phase replaces the response as it is.
                self.shared_local_count();
                let resp = local_response_parts(&local);
                self.finish_now().await;
                return resp;
            }
            Err(StreamFailure::Closed) => return reset_response(),
            Err(StreamFailure::Vm) => return self.response_after_vm_failure(kept, resp_body),
        }
        let headers = {
            let mut guard = self.worker.vm.lock().await;
            guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
                .and_then(|s| s.response_headers.clone())
                .unwrap_or_default()
        };
        if eos {
            self.finish_later();
            return response_builder(&headers)
                .body(body::empty())
                .unwrap_or_else(|_| plain_response(502, "invalid response headers"));
        }
        // A body already complete in the receive buffer (the common small response) goes
        // through the plugin inline: the client gets headers and body in one write, with no
        // pump task.
        let end_with_data = local || self.paused;
        let mut resp_body = match body::take_if_complete(resp_body) {
            Ok(data) => return self.respond_complete(data, kept, end_with_data).await,
            Err(rest) => rest,
        };
        let builder = response_builder(&headers);
        let (tx, downstream) = body::channel();
        let pump = BodyPump {
            worker: self.worker.clone(),
            ctx: self.ctx,
            generation: self.generation,
            wake: self.wake.clone(),
            dir: Direction::Response,
            end_with_data,
        };
        // The pump owns the end of the stream (on_done/on_log/on_delete) from here on.
        self.finished = true;
        tokio::task::spawn_local(async move {
            let _ = pump_body(&pump, &mut resp_body, tx).await;
            finish(&pump.worker, pump.ctx, pump.generation).await;
        });
        builder
            .body(downstream)
            .unwrap_or_else(|_| plain_response(502, "invalid response headers"))
    }

    /// The whole response body, already received, through `on_response_body`: as `(n, false)`
    /// then `(0, true)` (Envoy's codec reports the end on its own), or with `end_with_data` in
    /// one call (a local reply's body, or one that arrived while the headers phase paused).
    async fn respond_complete(
        mut self,
        data: Bytes,
        kept: Option<HeaderList>,
        end_with_data: bool,
    ) -> Response<Body> {
        let mut len = data.len();
        {
            let mut guard = self.worker.vm.lock().await;
            if let Some(s) = guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
            {
                s.response_body = data.to_vec();
            }
        }
        // What the plugin let through before the end.
        let mut released = Vec::new();
        if !end_with_data {
            let first = match self
                .callback(|vm, ctx| Box::pin(vm.on_response_body(ctx, len, false)))
                .await
            {
                Ok(o) => o,
                Err(StreamFailure::Closed) => return reset_response(),
                Err(StreamFailure::Vm) => {
                    return self.response_after_vm_failure(kept, body::full(data));
                }
            };
            if first.closed {
                return reset_response();
            }
            if let Some(local) = first.local {
                self.shared_local_count();
                self.finish_later();
                return local_response_parts(&local);
            }
            let mut guard = self.worker.vm.lock().await;
            if let Some(s) = guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
            {
                // Continue passes the buffer on; Pause keeps it for the next call.
                if first.action == Action::Continue {
                    released = std::mem::take(&mut s.response_body);
                }
                len = s.response_body.len();
            }
        }
        let outcome = match self
            .callback(|vm, ctx| Box::pin(vm.on_response_body(ctx, len, true)))
            .await
        {
            Ok(o) => o,
            Err(StreamFailure::Closed) => return reset_response(),
            Err(StreamFailure::Vm) => {
                return self.response_after_vm_failure(kept, body::full(data));
            }
        };
        match self.settle(outcome, true).await {
            Ok(Verdict::Continue) => {}
            Ok(Verdict::Local(local)) => {
                self.shared_local_count();
                self.finish_later();
                return local_response_parts(&local);
            }
            Err(StreamFailure::Closed) => return reset_response(),
            Err(StreamFailure::Vm) => return plain_response(503, ""),
        }
        let (mut headers, body, modified) = {
            let mut guard = self.worker.vm.lock().await;
            match guard
                .as_mut()
                .filter(|s| s.generation == self.generation)
                .and_then(|s| s.vm.stream(self.ctx))
            {
                Some(s) => {
                    let rest = std::mem::take(&mut s.response_body);
                    let body = if released.is_empty() {
                        rest
                    } else {
                        released.extend_from_slice(&rest);
                        released
                    };
                    (
                        s.response_headers.clone().unwrap_or_default(),
                        body,
                        s.response_body_modified,
                    )
                }
                None => return plain_response(503, ""),
            }
        };
        if modified {
            // The whole body is known here, so a rewritten one gets its true length (in place:
            // the codec's framing, not a plugin's edit).
            if let Some(entry) = headers.iter_mut().find(|(k, _)| k == "content-length") {
                entry.1 = body.len().to_string().into_bytes();
            }
        }
        self.finish_later();
        response_builder(&headers)
            .body(body::full(body))
            .unwrap_or_else(|_| plain_response(502, "invalid response headers"))
    }

    /// Hands the end of the stream (on_done/on_log/on_delete) to the worker's queue, so that
    /// the response does not wait for it.
    fn finish_later(&mut self) {
        self.finished = true;
        let _ = self.worker.abandoned.send((self.ctx, self.generation));
    }

    /// The VM failed in the response phase: pass the response on (fail_open) or answer 503.
    fn response_after_vm_failure(
        &mut self,
        kept: Option<HeaderList>,
        body: Body,
    ) -> Response<Body> {
        self.finished = true;
        match kept {
            Some(headers) => {
                self.worker
                    .shared
                    .counters
                    .fail_open_passes
                    .fetch_add(1, Ordering::Relaxed);
                response_builder(&headers)
                    .body(body)
                    .unwrap_or_else(|_| plain_response(502, "invalid response headers"))
            }
            None => plain_response(503, ""),
        }
    }

    fn shared_local_count(&self) {
        self.worker
            .shared
            .counters
            .local_responses
            .fetch_add(1, Ordering::Relaxed);
    }

    async fn finish_now(&mut self) {
        self.finished = true;
        finish(&self.worker, self.ctx, self.generation).await;
    }

    /// The plugin answered in the request phase: the reply goes through the response phase of
    /// the filter chain, as Envoy encodes local replies.
    async fn local_reply(self, local: crate::state::LocalResponse) -> Response<Body> {
        self.shared_local_count();
        let resp = local_response_parts(&local);
        let (parts, b) = resp.into_parts();
        let mut h = vec![(
            ":status".to_string(),
            parts.status.as_str().as_bytes().to_vec(),
        )];
        h.extend(header_list_of(&parts.headers));
        let mut resp = self.respond(h, b, true).await;
        if local.closes_connection {
            // The codec's, after the filters: the plugin's response phase does not see it.
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        resp
    }

    pub(super) async fn failed(
        mut self,
        e: StreamFailure,
        route: Option<&RouteEntry>,
        body: Body,
    ) -> Response<Body> {
        self.finished = true;
        match e {
            StreamFailure::Closed => reset_response(),
            StreamFailure::Vm => {
                let headers = std::mem::take(&mut self.original_headers);
                self.worker.fail_by_policy(route, headers, body).await
            }
        }
    }
}

/// When a stream paused from now on times out (`None`: never).
pub(super) fn idle_deadline(spec: &GatewaySpec) -> Option<Instant> {
    spec.stream_idle_timeout.map(|t| Instant::now() + t)
}

/// Waits for the stream's wake-up; false when the deadline passed first.
pub(super) async fn wait_for_wake(wake: &tokio::sync::Notify, deadline: Option<Instant>) -> bool {
    match deadline {
        Some(d) => tokio::time::timeout_at(d.into(), wake.notified())
            .await
            .is_ok(),
        None => {
            wake.notified().await;
            true
        }
    }
}

/// Envoy's answer to a request whose stream idled out before its response started.
pub(super) fn idle_timeout_reply() -> crate::state::LocalResponse {
    crate::state::LocalResponse {
        status: 408,
        details: "stream_idle_timeout".into(),
        body: b"stream timeout".to_vec(),
        headers: Vec::new(),
        closes_connection: false,
    }
}
