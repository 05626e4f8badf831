//! The filter-chain interface the proxy drives: [`FilterChain`] (an ordered list of filters)
//! and [`ChainStream`] (one HTTP stream through it), with plain Rust types in and
//! [`Action`]s out.
//!
//! Phase chart (Envoy order; request phases run filters first→last, response phases
//! last→first):
//!
//! ```text
//! start_stream ── proxy_on_context_create(ctx, root)        (each filter)
//! on_request_headers ── proxy_on_request_headers             → Continue | Pause | LocalReply | Close
//!   (Pause) take_http_calls → proxy dispatches → on_http_call_response ── proxy_on_http_call_response
//!                                  → resumes with the next filter on proxy_continue_stream
//! on_request_body* ──── proxy_on_request_body (buffered size) → Continue(data) | Pause(buffered)
//!   (Pause with callouts) as above; on proxy_continue_stream the filter's buffer goes on
//!                         through the next filters → take_resumed_body
//! on_response_headers ─ proxy_on_response_headers            (reverse order; callouts as above)
//! on_response_body* ─── proxy_on_response_body              (reverse order; callouts as above)
//!   gRPC callouts likewise: take_grpc_ops → the proxy carries them over HTTP/2 →
//!   on_grpc_event ── proxy_on_grpc_receive_initial_metadata / _receive /
//!   _receive_trailing_metadata / _close → resumes on proxy_continue_stream
//! finish / drop ─────── proxy_on_done → proxy_on_log → proxy_on_delete   (always, once)
//! ```
//!
//! TCP (stream) filters use the same stream type, started with
//! [`FilterChain::start_connection`]:
//!
//! ```text
//! on_new_connection ─── proxy_on_new_connection (first→last)   → Continue | Close
//! on_downstream_data* ─ proxy_on_downstream_data (first→last)  → Continue(data) | Pause(held) | Close
//! on_upstream_data* ─── proxy_on_upstream_data (last→first)    → Continue(data) | Pause(held) | Close
//! on_downstream_close / on_upstream_close ─ proxy_on_*_connection_close(peer)
//! finish / drop ─────── proxy_on_done → proxy_on_log → proxy_on_delete
//! ```
//!
//! Callouts can be made in any of the four phases (Envoy allows them from every callback).
//! They are dispatched while the phase is paused: a callout made in a phase that goes on
//! (fire and forget) is never sent — the filter sees it fail (`proxy_on_http_call_response`
//! with 0 headers) when the stream ends, before `proxy_on_done`, so no filter waits for an
//! answer that cannot come. Every delivered outcome is a decision ([`DecisionKind::Callout`]).
//!
//! Rules the chain enforces regardless of what the guest returns:
//! - a local reply stops the phase (cpp-host's "stop after local reply"), then travels the
//!   response path of the filters that saw the request (the replying one included), so they can
//!   decorate it, and comes back as [`Action::LocalReply`];
//! - `proxy_continue_stream` during a callback turns its Pause into Continue;
//! - a failed instance applies the filter's [`FailurePolicy`] to this stream only;
//! - done/log/delete run for every created context, also when the stream is dropped early
//!   (client reset) or was answered locally.
//!
//! Callbacks are synchronous and bounded by the filter's callback deadline (default 10 ms);
//! typical header filters take a few µs, so the proxy calls them inline on its runtime.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::config::FailurePolicy;
use crate::filter::{Filter, Generation, VmSlot};
use crate::shared::lock;
use crate::state::{CallResponseData, FilterStreamState, PendingLocalReply, StreamShared};
use crate::state::{GrpcDelivery, PendingGrpcOp};
use crate::types::{
    Action, DecisionKind, FailureOutcome, FilterDecision, GrpcCallId, GrpcEvent, GrpcOp, GrpcStart,
    Headers, HttpCall, HttpCallId, HttpCallResponse, LocalReply, PeerType, Phase, StreamInfo,
    grpc_status,
};
use crate::vm::{Callback, GrpcCallback, VmFailure};

/// An ordered list of filters. Cheap to clone; build a new one to change the order.
#[derive(Clone, Default)]
pub struct FilterChain {
    filters: Arc<[Arc<Filter>]>,
}

impl FilterChain {
    pub fn new(filters: Vec<Arc<Filter>>) -> Self {
        Self {
            filters: filters.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    pub fn filters(&self) -> &[Arc<Filter>] {
        &self.filters
    }

    /// Starts a TCP connection through the chain (a stream context per filter, as Envoy's
    /// network filters): then [`ChainStream::on_new_connection`], the data and close
    /// callbacks, and [`ChainStream::finish`] once both sides closed.
    pub fn start_connection(&self, info: StreamInfo) -> ChainStream {
        self.start_stream(info)
    }

    /// Starts a stream: assigns each filter's instance and creates the stream contexts.
    /// Failures here surface as the first phase's action (per failure policy).
    pub fn start_stream(&self, info: StreamInfo) -> ChainStream {
        let mut stream = ChainStream {
            shared: StreamShared {
                info: Arc::new(info),
                ..StreamShared::default()
            },
            filters: Vec::with_capacity(self.filters.len()),
            decisions: Vec::new(),
            finished: false,
            paused: None,
            paused_end: false,
            calls: Vec::new(),
            unsent: Vec::new(),
            in_flight: Vec::new(),
            resumed_body: None,
            grpc_ops: Vec::new(),
            grpc_live: Vec::new(),
        };
        for filter in self.filters.iter() {
            let generation = filter.current();
            let mut fs = FilterStream {
                generation,
                slot: None,
                ctx: 0,
                own: FilterStreamState::default(),
                state: StreamState::Active,
            };
            match fs.generation.acquire() {
                Ok(slot) => {
                    let created = lock(&slot.vm).create_stream_context(&fs.generation.limits);
                    match created {
                        Ok(ctx) => {
                            fs.ctx = ctx;
                            fs.slot = Some(slot);
                        }
                        Err(f) => {
                            fs.slot = Some(slot);
                            fs.fail_instance(&f);
                            stream.note_failure(&mut fs, Phase::StreamStart, &f);
                        }
                    }
                }
                Err(f) => stream.note_failure(&mut fs, Phase::StreamStart, &f),
            }
            stream.filters.push(fs);
        }
        stream
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Active,
    /// Failed open: the filter is skipped for the rest of the stream.
    Bypassed,
    /// Failed closed: the stream must be answered with this status.
    Rejected(u16),
}

struct FilterStream {
    generation: Arc<Generation>,
    slot: Option<Arc<VmSlot>>,
    ctx: u32,
    own: FilterStreamState,
    state: StreamState,
}

impl FilterStream {
    fn name(&self) -> Arc<str> {
        self.generation.settings.name.clone()
    }

    /// Marks the instance failed (other streams on it will fail on their next callback) and
    /// lets the pool replace it.
    fn fail_instance(&mut self, f: &VmFailure) {
        if let Some(slot) = &self.slot {
            slot.failed.store(true, Ordering::Relaxed);
        }
        self.generation.record_failure(f);
    }
}

/// What one filter's callback asked for.
enum Step {
    Continue,
    Pause,
    LocalReply(PendingLocalReply),
    Close,
    /// The filter's instance failed and the policy rejects the stream with this status.
    Reject(u16),
}

/// One HTTP stream through a [`FilterChain`]. Owns the stream's header maps between phases;
/// read them back with [`ChainStream::request_headers`] / [`ChainStream::response_headers`].
pub struct ChainStream {
    shared: StreamShared,
    filters: Vec<FilterStream>,
    decisions: Vec<FilterDecision>,
    finished: bool,
    /// The phase and filter that returned Pause (resumed by a callout response).
    paused: Option<(Phase, usize)>,
    /// For a paused body phase: whether the chunk that paused it ended the stream.
    paused_end: bool,
    /// Callouts made and not yet taken by the proxy.
    calls: Vec<HttpCall>,
    /// Callouts made in a phase that went on: never sent, failed when the stream ends.
    unsent: Vec<HttpCall>,
    /// Callouts taken by the proxy and not answered yet (their upstream names, for the
    /// decision recorded when the outcome arrives).
    in_flight: Vec<(HttpCallId, String)>,
    /// Body bytes a resumed body phase released (see [`ChainStream::take_resumed_body`]).
    resumed_body: Option<Vec<u8>>,
    /// gRPC operations made and not yet taken by the proxy.
    grpc_ops: Vec<GrpcOp>,
    /// gRPC calls and streams that have not ended, in the order they were made.
    grpc_live: Vec<LiveGrpc>,
}

/// A gRPC call the chain tracks until its end is delivered.
struct LiveGrpc {
    id: GrpcCallId,
    upstream: String,
    service: String,
    method: String,
    unary: bool,
    /// Taken by the proxy (else it was made in a phase that went on: never sent).
    sent: bool,
    /// A unary call's response message was delivered (the call is over for the guest).
    answered: bool,
}

impl ChainStream {
    /// Request headers as the filters left them (pseudo-headers included).
    pub fn request_headers(&self) -> &Headers {
        &self.shared.request_headers
    }

    /// Response headers as the filters left them (`:status` included).
    pub fn response_headers(&self) -> &Headers {
        &self.shared.response_headers
    }

    /// Decisions so far (local replies, header/body changes, failures), for the flow record.
    pub fn decisions(&self) -> &[FilterDecision] {
        &self.decisions
    }

    /// Runs `proxy_on_request_headers` through the chain. The chain keeps `headers`; on
    /// `Continue` forward [`ChainStream::request_headers`]. On `Pause`, dispatch
    /// [`ChainStream::take_http_calls`] and deliver their outcomes with
    /// [`ChainStream::on_http_call_response`], which resumes the chain.
    pub fn on_request_headers(&mut self, headers: Headers, end_of_stream: bool) -> Action {
        self.shared.request_headers = headers;
        self.paused = None;
        let action = self.request_headers_from(0, end_of_stream);
        self.settled(action)
    }

    fn request_headers_from(&mut self, first: usize, end_of_stream: bool) -> Action {
        for i in first..self.filters.len() {
            let count = self.shared.request_headers.len() as u32;
            let cb = Callback::RequestHeaders {
                count,
                end_of_stream,
            };
            match self.step(i, Phase::RequestHeaders, cb) {
                Step::Continue => {}
                Step::Pause => {
                    self.paused = Some((Phase::RequestHeaders, i));
                    return Action::Pause;
                }
                Step::Close => return Action::Close,
                Step::Reject(status) => return self.reject(i, status),
                Step::LocalReply(r) => return self.local_reply(i, Phase::RequestHeaders, r),
            }
        }
        Action::Continue
    }

    /// Callouts the filters made since the last call (`proxy_http_call`). The proxy
    /// dispatches them and reports each outcome with [`ChainStream::on_http_call_response`];
    /// a stream dropped meanwhile simply never delivers them (the calls are cancelled).
    pub fn take_http_calls(&mut self) -> Vec<HttpCall> {
        let calls = std::mem::take(&mut self.calls);
        self.in_flight
            .extend(calls.iter().map(|c| (c.id, c.upstream.clone())));
        calls
    }

    /// After [`ChainStream::on_http_call_response`] resumed a paused body phase with
    /// `Action::Continue`: the bytes to forward now (the resuming filter's buffer, through the
    /// filters after it). `None` when no body phase was resumed.
    pub fn take_resumed_body(&mut self) -> Option<Vec<u8>> {
        self.resumed_body.take()
    }

    /// Whether a phase is paused (a headers phase waiting for a callout, or a body phase
    /// buffering or waiting for one).
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Delivers a callout's outcome (`proxy_on_http_call_response`; `None`: the call failed)
    /// to the filter that made it. If that filter paused a headers phase and now continues
    /// (`proxy_continue_stream`), the phase resumes with the next filter and this returns
    /// what the rest of the chain decided; a local reply or close is returned as usual;
    /// otherwise the stream stays paused (`Action::Pause`) — or, if it was not paused,
    /// `Action::Continue`.
    pub fn on_http_call_response(
        &mut self,
        id: HttpCallId,
        response: Option<HttpCallResponse>,
    ) -> Action {
        let action = self.deliver_call_response(id, response, None);
        self.settled(action)
    }

    /// `phase`: the phase to name in the decision when no phase is paused (default: request
    /// headers).
    fn deliver_call_response(
        &mut self,
        id: HttpCallId,
        response: Option<HttpCallResponse>,
        phase: Option<Phase>,
    ) -> Action {
        let i = id.filter;
        if i >= self.filters.len() {
            return self.resting_action();
        }
        let (headers, body_size, trailers) = response.as_ref().map_or((0, 0, 0), |r| {
            (
                r.headers.len() as u32,
                r.body.len() as u32,
                r.trailers.len() as u32,
            )
        });
        let status = response.as_ref().and_then(|r| {
            r.headers
                .get_str(":status")
                .and_then(|s| s.parse::<u16>().ok())
        });
        let upstream = self
            .in_flight
            .iter()
            .position(|(c, _)| *c == id)
            .map(|at| self.in_flight.swap_remove(at).1)
            .unwrap_or_default();
        let response = response.unwrap_or_default();
        let phase = self
            .paused
            .map(|(p, _)| p)
            .or(phase)
            .unwrap_or(Phase::RequestHeaders);
        self.decisions.push(FilterDecision {
            filter: self.filters[i].name(),
            phase,
            kind: DecisionKind::Callout { upstream, status },
        });
        self.filters[i].own.call_response = Some(CallResponseData {
            headers: response.headers,
            body: response.body,
            trailers: response.trailers,
        });
        let cb = Callback::HttpCallResponse {
            token: id.token,
            headers,
            body_size,
            trailers,
        };
        let step = self.step(i, phase, cb);
        self.filters[i].own.call_response = None;
        self.after_callout(i, phase, step)
    }

    /// What a callout callback (HTTP response, gRPC event) of filter `i` means for the
    /// stream: a paused phase resumes with the next filter when that filter continued it.
    fn after_callout(&mut self, i: usize, phase: Phase, step: Step) -> Action {
        if self.finished {
            // The stream is ending: whatever the filter asks for has no one to go to.
            return Action::Continue;
        }
        let paused_here = self.paused.is_some_and(|(_, p)| p == i);
        match step {
            Step::Pause => self.resting_action(),
            Step::Continue if paused_here => {
                let (phase, _) = self.paused.take().unwrap_or((Phase::RequestHeaders, i));
                match phase {
                    Phase::ResponseHeaders => self.response_headers_below(i, false),
                    Phase::RequestBody | Phase::ResponseBody => self.resume_body(phase, i),
                    Phase::Downstream | Phase::Upstream => self.resume_data(phase, i),
                    Phase::NewConnection => self.new_connection_from(i + 1),
                    _ => self.request_headers_from(i + 1, false),
                }
            }
            Step::Continue => self.resting_action(),
            Step::Close => {
                self.paused = None;
                Action::Close
            }
            Step::Reject(status) => {
                self.paused = None;
                self.reject(i, status)
            }
            Step::LocalReply(r) => {
                self.paused = None;
                self.local_reply(i, phase, r)
            }
        }
    }

    /// A phase's outcome: callouts made in a phase that is not paused are set aside as unsent
    /// (only a paused phase waits for the proxy to dispatch them).
    fn settled(&mut self, action: Action) -> Action {
        if action != Action::Pause && !self.calls.is_empty() {
            self.unsent.append(&mut self.calls);
        }
        if action != Action::Pause && !self.grpc_ops.is_empty() {
            // Never sent: the live entries stay unsent and fail when the stream ends.
            self.grpc_ops.clear();
        }
        action
    }

    fn resting_action(&self) -> Action {
        if self.paused.is_some() {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    /// Runs `proxy_on_request_body` through the chain. `data` is the new chunk on input and
    /// what to forward now on output: a filter that returns Pause keeps the bytes buffered
    /// (and sees the whole buffer, cumulative size, on the next chunk); Continue releases them.
    pub fn on_request_body(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> Action {
        // A new chunk supersedes a body pause (the filter sees the whole buffer again).
        self.paused = None;
        for i in 0..self.filters.len() {
            if let Some(action) = self.body_step(i, Phase::RequestBody, data, end_of_stream) {
                return self.settled(action);
            }
        }
        self.settled(Action::Continue)
    }

    /// Runs `proxy_on_response_headers` (filters in reverse order).
    pub fn on_response_headers(&mut self, headers: Headers, end_of_stream: bool) -> Action {
        self.shared.response_headers = headers;
        self.paused = None;
        let action = self.response_headers_below(self.filters.len(), end_of_stream);
        self.settled(action)
    }

    /// Response headers through filters `end-1` down to 0.
    fn response_headers_below(&mut self, end: usize, end_of_stream: bool) -> Action {
        for i in (0..end).rev() {
            let count = self.shared.response_headers.len() as u32;
            let cb = Callback::ResponseHeaders {
                count,
                end_of_stream,
            };
            match self.step(i, Phase::ResponseHeaders, cb) {
                Step::Continue => {}
                Step::Pause => {
                    self.paused = Some((Phase::ResponseHeaders, i));
                    return Action::Pause;
                }
                Step::Close => return Action::Close,
                Step::Reject(status) => return self.reject(i, status),
                Step::LocalReply(r) => return self.local_reply(i, Phase::ResponseHeaders, r),
            }
        }
        Action::Continue
    }

    /// Runs `proxy_on_response_body` (filters in reverse order); `data` as for requests.
    pub fn on_response_body(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> Action {
        self.paused = None;
        for i in (0..self.filters.len()).rev() {
            if let Some(action) = self.body_step(i, Phase::ResponseBody, data, end_of_stream) {
                return self.settled(action);
            }
        }
        self.settled(Action::Continue)
    }

    /// A paused body phase resumed by filter `i`: its buffer goes on through the filters after
    /// it (request: `i+1..`, response: `i-1..=0`) with the end-of-stream flag of the chunk
    /// that paused; what comes out waits in `resumed_body`.
    fn resume_body(&mut self, phase: Phase, i: usize) -> Action {
        let end_of_stream = self.paused_end;
        let fs = &mut self.filters[i];
        let mut data = match phase {
            Phase::RequestBody => std::mem::take(&mut fs.own.request_body),
            _ => std::mem::take(&mut fs.own.response_body),
        };
        let next: Vec<usize> = match phase {
            Phase::RequestBody => (i + 1..self.filters.len()).collect(),
            _ => (0..i).rev().collect(),
        };
        for j in next {
            if let Some(action) = self.body_step(j, phase, &mut data, end_of_stream) {
                return action;
            }
        }
        self.resumed_body = Some(data);
        Action::Continue
    }

    /// gRPC operations the filters asked for since the last call, in order (see
    /// [`GrpcOp`]). The proxy carries them while the phase is paused and reports what comes
    /// back with [`ChainStream::on_grpc_event`]; operations of a phase that went on are never
    /// taken (the calls fail with UNAVAILABLE when the stream ends).
    pub fn take_grpc_ops(&mut self) -> Vec<GrpcOp> {
        let ops = std::mem::take(&mut self.grpc_ops);
        for op in &ops {
            if let GrpcOp::Start(start) = op
                && let Some(live) = self.grpc_live.iter_mut().find(|l| l.id == start.id)
            {
                live.sent = true;
            }
        }
        ops
    }

    /// Whether a gRPC call of this stream is still waiting for events.
    pub fn has_live_grpc(&self) -> bool {
        self.grpc_live.iter().any(|l| l.sent && !l.answered)
    }

    /// Delivers one event of a gRPC call to the filter that made it, as Envoy does: a unary
    /// call (`proxy_grpc_call`) sees its response message (`proxy_on_grpc_receive`) or, when
    /// it failed, `proxy_on_grpc_close` with the status (metadata is not delivered for unary
    /// calls); a stream sees every event. Events for a call the filter cancelled are
    /// dropped. The returned action is as for [`ChainStream::on_http_call_response`]: a
    /// paused phase resumes when the filter continues it.
    pub fn on_grpc_event(&mut self, id: GrpcCallId, event: GrpcEvent) -> Action {
        let action = self.deliver_grpc_event(id, event);
        self.settled(action)
    }

    fn deliver_grpc_event(&mut self, id: GrpcCallId, event: GrpcEvent) -> Action {
        let i = id.filter;
        let Some(at) = self.grpc_live.iter().position(|l| l.id == id) else {
            return self.resting_action();
        };
        if i >= self.filters.len() {
            return self.resting_action();
        }
        let live = &self.grpc_live[at];
        let mut delivery = GrpcDelivery::default();
        let (kind, n, ends) = match event {
            GrpcEvent::InitialMetadata(_) | GrpcEvent::TrailingMetadata(_) if live.unary => {
                return self.resting_action();
            }
            GrpcEvent::InitialMetadata(h) => {
                let n = h.len() as u32;
                delivery.initial_metadata = h;
                (GrpcCallback::InitialMetadata, n, None)
            }
            GrpcEvent::TrailingMetadata(h) => {
                let n = h.len() as u32;
                delivery.trailing_metadata = h;
                (GrpcCallback::TrailingMetadata, n, None)
            }
            GrpcEvent::Message(_) if live.unary && live.answered => {
                return self.resting_action();
            }
            GrpcEvent::Message(m) => {
                let n = m.len() as u32;
                delivery.message = m;
                // A unary call is over once its response arrived (Envoy's onSuccess).
                let ends = live.unary.then_some(grpc_status::OK);
                (GrpcCallback::Receive, n, ends)
            }
            GrpcEvent::Close { status, .. } if live.unary && live.answered => {
                // The response was delivered; a trailing OK says nothing new.
                let _ = status;
                self.grpc_live.remove(at);
                return self.resting_action();
            }
            GrpcEvent::Close {
                mut status,
                mut message,
            } => {
                if live.unary && status == grpc_status::OK {
                    // OK without a response message: not a valid unary answer.
                    status = grpc_status::INTERNAL;
                    message = "no response message".into();
                }
                delivery.status = Some((status, message));
                (GrpcCallback::Close, status, Some(status))
            }
        };
        let upstream = live.upstream.clone();
        let (service, method) = (live.service.clone(), live.method.clone());
        if let Some(status) = ends {
            if kind == GrpcCallback::Receive {
                self.grpc_live[at].answered = true;
            } else {
                self.grpc_live.remove(at);
            }
            let phase = self.paused.map_or(Phase::RequestHeaders, |(p, _)| p);
            self.decisions.push(FilterDecision {
                filter: self.filters[i].name(),
                phase,
                kind: DecisionKind::GrpcCallout {
                    upstream,
                    service,
                    method,
                    grpc_status: status,
                },
            });
        }
        let phase = if self.finished {
            Phase::Log
        } else {
            self.paused.map_or(Phase::RequestHeaders, |(p, _)| p)
        };
        self.filters[i].own.grpc_delivery = Some(delivery);
        let step = self.step(
            i,
            phase,
            Callback::Grpc {
                kind,
                token: id.token,
                n,
            },
        );
        self.filters[i].own.grpc_delivery = None;
        if ends.is_some() {
            self.end_grpc_token(id);
        }
        self.after_callout(i, phase, step)
    }

    /// The instance forgets a call that ended.
    fn end_grpc_token(&mut self, id: GrpcCallId) {
        if let Some(slot) = self.filters.get(id.filter).and_then(|f| f.slot.clone()) {
            lock(&slot.vm).end_grpc_token(id.token);
        }
    }

    /// At the end of the stream every gRPC call still open is closed for its filter (before
    /// `proxy_on_done`): UNAVAILABLE for calls never sent (made in a phase that went on),
    /// CANCELLED for calls in flight.
    fn end_live_grpc(&mut self) {
        let ids: Vec<(GrpcCallId, bool)> = self
            .grpc_live
            .iter()
            .filter(|l| !l.answered)
            .map(|l| (l.id, l.sent))
            .collect();
        for (id, sent) in ids {
            let (status, message) = if sent {
                (grpc_status::CANCELLED, "the stream ended".to_owned())
            } else {
                (
                    grpc_status::UNAVAILABLE,
                    "not sent: the phase that made the call went on".to_owned(),
                )
            };
            let _ = self.deliver_grpc_event(id, GrpcEvent::Close { status, message });
        }
        self.grpc_live.clear();
    }

    // ---- TCP (stream) filters ----

    /// TCP filters: `proxy_on_new_connection` through the chain (first to last). Call once,
    /// before any data. `Close` means reset the client; `Pause` means hold the connection
    /// (the filter waits for a callout).
    pub fn on_new_connection(&mut self) -> Action {
        self.paused = None;
        let action = self.new_connection_from(0);
        self.settled(action)
    }

    fn new_connection_from(&mut self, first: usize) -> Action {
        for i in first..self.filters.len() {
            match self.step(i, Phase::NewConnection, Callback::NewConnection) {
                Step::Continue | Step::LocalReply(_) => {}
                Step::Pause => {
                    self.paused = Some((Phase::NewConnection, i));
                    return Action::Pause;
                }
                Step::Close | Step::Reject(_) => return Action::Close,
            }
        }
        Action::Continue
    }

    /// TCP filters: bytes from the client (`proxy_on_downstream_data`, filters first to
    /// last). `data` in: the new bytes; out: what to send upstream now. A filter that returns
    /// Pause keeps the bytes (it sees them again, with the next ones, on the next call), as
    /// Envoy's network filters do; `proxy_set_buffer_bytes(DOWNSTREAM_DATA)` rewrites them.
    /// `Close`: close both sides (a failure policy that rejects also closes).
    pub fn on_downstream_data(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> Action {
        self.paused = None;
        for i in 0..self.filters.len() {
            if let Some(action) = self.data_step(i, Phase::Downstream, data, end_of_stream) {
                return self.settled(action);
            }
        }
        self.settled(Action::Continue)
    }

    /// TCP filters: bytes from the upstream (`proxy_on_upstream_data`, filters last to first,
    /// Envoy's write-filter order); otherwise as [`ChainStream::on_downstream_data`].
    pub fn on_upstream_data(&mut self, data: &mut Vec<u8>, end_of_stream: bool) -> Action {
        self.paused = None;
        for i in (0..self.filters.len()).rev() {
            if let Some(action) = self.data_step(i, Phase::Upstream, data, end_of_stream) {
                return self.settled(action);
            }
        }
        self.settled(Action::Continue)
    }

    /// TCP filters: the client side closed (`proxy_on_downstream_connection_close`).
    pub fn on_downstream_close(&mut self, peer: PeerType) {
        for i in 0..self.filters.len() {
            let cb = Callback::DownstreamClose { peer: peer as u32 };
            let _ = self.step(i, Phase::Downstream, cb);
        }
    }

    /// TCP filters: the upstream side closed (`proxy_on_upstream_connection_close`).
    pub fn on_upstream_close(&mut self, peer: PeerType) {
        for i in (0..self.filters.len()).rev() {
            let cb = Callback::UpstreamClose { peer: peer as u32 };
            let _ = self.step(i, Phase::Upstream, cb);
        }
    }

    /// One filter's data callback; `None` means "go on to the next filter with `data`".
    fn data_step(
        &mut self,
        i: usize,
        phase: Phase,
        data: &mut Vec<u8>,
        end_of_stream: bool,
    ) -> Option<Action> {
        if self.filters[i].state == StreamState::Bypassed {
            return None;
        }
        let limit = self.filters[i].generation.limits.max_buffered_body;
        let fs = &mut self.filters[i];
        let buffer = match phase {
            Phase::Downstream => &mut fs.own.downstream_data,
            _ => &mut fs.own.upstream_data,
        };
        buffer.append(data);
        if buffer.len() > limit {
            // Envoy's network filters have no local reply: an overflowing buffer closes.
            buffer.clear();
            self.decisions.push(FilterDecision {
                filter: fs.name(),
                phase,
                kind: DecisionKind::Closed,
            });
            return Some(Action::Close);
        }
        let size = buffer.len() as u32;
        let cb = match phase {
            Phase::Downstream => Callback::DownstreamData {
                size,
                end_of_stream,
            },
            _ => Callback::UpstreamData {
                size,
                end_of_stream,
            },
        };
        let step = self.step(i, phase, cb);
        let fs = &mut self.filters[i];
        let buffer = match phase {
            Phase::Downstream => &mut fs.own.downstream_data,
            _ => &mut fs.own.upstream_data,
        };
        match step {
            Step::Continue | Step::LocalReply(_) => {
                *data = std::mem::take(buffer);
                None
            }
            Step::Pause => {
                self.paused = Some((phase, i));
                self.paused_end = end_of_stream;
                Some(Action::Pause)
            }
            Step::Close | Step::Reject(_) => Some(Action::Close),
        }
    }

    /// A paused data phase resumed by filter `i` (after a callout): its buffer goes on
    /// through the filters after it; what comes out waits in `resumed_body`.
    fn resume_data(&mut self, phase: Phase, i: usize) -> Action {
        let end_of_stream = self.paused_end;
        let fs = &mut self.filters[i];
        let mut data = match phase {
            Phase::Downstream => std::mem::take(&mut fs.own.downstream_data),
            _ => std::mem::take(&mut fs.own.upstream_data),
        };
        let next: Vec<usize> = match phase {
            Phase::Downstream => (i + 1..self.filters.len()).collect(),
            _ => (0..i).rev().collect(),
        };
        for j in next {
            if let Some(action) = self.data_step(j, phase, &mut data, end_of_stream) {
                return action;
            }
        }
        self.resumed_body = Some(data);
        Action::Continue
    }

    /// Callouts made in a phase that went on (not paused) are never sent: tell each filter
    /// its call failed, as Envoy does for a call that cannot complete.
    fn fail_unsent_calls(&mut self) {
        let mut calls = std::mem::take(&mut self.unsent);
        calls.append(&mut self.calls);
        for call in calls {
            self.in_flight.push((call.id, call.upstream.clone()));
            let _ = self.deliver_call_response(call.id, None, Some(Phase::Log));
        }
    }

    /// Ends the stream: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` for every filter,
    /// and returns the decisions for the flow record. Dropping the stream does the same.
    pub fn finish(mut self) -> Vec<FilterDecision> {
        self.finish_inner();
        std::mem::take(&mut self.decisions)
    }

    fn finish_inner(&mut self) {
        if self.finished {
            return;
        }
        self.paused = None;
        // From here on callbacks only inform the filters (see deliver_call_response).
        self.finished = true;
        self.fail_unsent_calls();
        self.end_live_grpc();
        for fs in &mut self.filters {
            let Some(slot) = fs.slot.clone() else {
                continue;
            };
            slot.streams.fetch_sub(1, Ordering::Relaxed);
            if slot.failed.load(Ordering::Relaxed) {
                continue;
            }
            let result = lock(&slot.vm).finish_stream(
                fs.ctx,
                &mut self.shared,
                &mut fs.own,
                &fs.generation.limits,
            );
            match result {
                Ok(()) if fs.state == StreamState::Active => fs.generation.record_success(),
                Ok(()) => {}
                Err(f) => fs.fail_instance(&f),
            }
        }
    }

    fn note_failure(&mut self, fs: &mut FilterStream, phase: Phase, f: &VmFailure) {
        let decision = apply_policy(fs, phase, f);
        self.decisions.push(decision);
    }

    /// Runs one callback of filter `i` and interprets the outcome.
    fn step(&mut self, i: usize, phase: Phase, cb: Callback) -> Step {
        match self.filters[i].state {
            StreamState::Bypassed => return Step::Continue,
            StreamState::Rejected(status) => return Step::Reject(status),
            StreamState::Active => {}
        }
        let fs = &mut self.filters[i];
        let Some(slot) = fs.slot.clone() else {
            return Step::Continue;
        };
        fs.own.continue_requested = false;
        fs.own.headers_modified = false;
        fs.own.body_modified = false;
        let (result, calls, grpc) = {
            let mut vm = lock(&slot.vm);
            if slot.failed.load(Ordering::Relaxed) {
                vm.failed = true;
            }
            let result = vm.run(
                fs.ctx,
                cb,
                &mut self.shared,
                &mut fs.own,
                &fs.generation.limits,
            );
            (result, vm.take_calls(), vm.take_grpc_ops())
        };
        if result.is_ok() {
            let filter = fs.name();
            for op in grpc {
                let id = |token| GrpcCallId { filter: i, token };
                self.grpc_ops.push(match op {
                    PendingGrpcOp::Start {
                        token,
                        upstream,
                        service,
                        method,
                        metadata,
                        message,
                        timeout_ms,
                    } => {
                        self.grpc_live.push(LiveGrpc {
                            id: id(token),
                            upstream: upstream.clone(),
                            service: service.clone(),
                            method: method.clone(),
                            unary: message.is_some(),
                            sent: false,
                            answered: false,
                        });
                        GrpcOp::Start(GrpcStart {
                            id: id(token),
                            filter: filter.clone(),
                            upstream,
                            service,
                            method,
                            initial_metadata: metadata,
                            message,
                            timeout: std::time::Duration::from_millis(u64::from(timeout_ms)),
                        })
                    }
                    PendingGrpcOp::Send {
                        token,
                        message,
                        end_stream,
                    } => GrpcOp::Send {
                        id: id(token),
                        message,
                        end_stream,
                    },
                    PendingGrpcOp::Close { token } => GrpcOp::Close { id: id(token) },
                    PendingGrpcOp::Cancel { token } => {
                        // Cancelled: nothing more is delivered for it.
                        self.grpc_live.retain(|l| l.id != id(token));
                        GrpcOp::Cancel { id: id(token) }
                    }
                });
            }
            self.calls.extend(calls.into_iter().map(|c| HttpCall {
                id: HttpCallId {
                    filter: i,
                    token: c.token,
                },
                filter: filter.clone(),
                upstream: c.upstream,
                headers: c.headers,
                body: c.body,
                trailers: c.trailers,
                timeout: std::time::Duration::from_millis(u64::from(c.timeout_ms)),
            }));
        }
        let action = match result {
            Ok(action) => action,
            Err(f) => {
                let fs = &mut self.filters[i];
                fs.fail_instance(&f);
                let decision = apply_policy(fs, phase, &f);
                let state = fs.state;
                self.decisions.push(decision);
                return match state {
                    StreamState::Rejected(status) => Step::Reject(status),
                    _ => Step::Continue,
                };
            }
        };
        let fs = &mut self.filters[i];
        let name = fs.name();
        if fs.own.headers_modified
            && matches!(phase, Phase::RequestHeaders | Phase::ResponseHeaders)
        {
            self.decisions.push(FilterDecision {
                filter: name.clone(),
                phase,
                kind: DecisionKind::HeadersModified,
            });
        }
        if fs.own.body_modified {
            self.decisions.push(FilterDecision {
                filter: name.clone(),
                phase,
                kind: DecisionKind::BodyModified,
            });
        }
        if let Some(reply) = fs.own.local_reply.take() {
            return Step::LocalReply(reply);
        }
        if fs.own.close_requested {
            self.decisions.push(FilterDecision {
                filter: name,
                phase,
                kind: DecisionKind::Closed,
            });
            return Step::Close;
        }
        if action == crate::abi::action::PAUSE as u32 && !fs.own.continue_requested {
            return Step::Pause;
        }
        Step::Continue
    }

    /// One filter's body callback; `None` means "go on to the next filter with `data`".
    fn body_step(
        &mut self,
        i: usize,
        phase: Phase,
        data: &mut Vec<u8>,
        end_of_stream: bool,
    ) -> Option<Action> {
        if self.filters[i].state == StreamState::Bypassed {
            return None;
        }
        let limit = self.filters[i].generation.limits.max_buffered_body;
        let buffer = match phase {
            Phase::RequestBody => &mut self.filters[i].own.request_body,
            _ => &mut self.filters[i].own.response_body,
        };
        buffer.append(data);
        if buffer.len() > limit {
            buffer.clear();
            let name = self.filters[i].name();
            // Envoy's answer when a filter's buffer overflows.
            return Some(self.local_reply(
                i,
                phase,
                PendingLocalReply {
                    status: 413,
                    details: format!("wasm_buffer_limit_exceeded:{name}"),
                    body: b"Payload Too Large".to_vec(),
                    headers: Vec::new(),
                    grpc_status: None,
                },
            ));
        }
        let size = buffer.len() as u32;
        let cb = match phase {
            Phase::RequestBody => Callback::RequestBody {
                size,
                end_of_stream,
            },
            _ => Callback::ResponseBody {
                size,
                end_of_stream,
            },
        };
        let step = self.step(i, phase, cb);
        let fs = &mut self.filters[i];
        let buffer = match phase {
            Phase::RequestBody => &mut fs.own.request_body,
            _ => &mut fs.own.response_body,
        };
        match step {
            Step::Continue => {
                *data = std::mem::take(buffer);
                None
            }
            Step::Pause => {
                self.paused = Some((phase, i));
                self.paused_end = end_of_stream;
                Some(Action::Pause)
            }
            Step::Close => Some(Action::Close),
            Step::Reject(status) => Some(self.reject(i, status)),
            Step::LocalReply(r) => Some(self.local_reply(i, phase, r)),
        }
    }

    /// A failure policy's reply (Envoy: 503 with details `wasm_fail_stream`).
    fn reject(&mut self, i: usize, status: u16) -> Action {
        Action::LocalReply(LocalReply {
            status,
            headers: Headers::new(),
            body: Vec::new(),
            details: "wasm_fail_stream".into(),
            grpc_status: None,
            filter: self.filters[i].name(),
        })
    }

    /// Sends filter `i`'s local reply through the response path of filters `i..=0` (reverse
    /// order, as Envoy's encoder chain), ignoring further local replies, and returns it.
    fn local_reply(&mut self, i: usize, phase: Phase, reply: PendingLocalReply) -> Action {
        let filter = self.filters[i].name();
        self.decisions.push(FilterDecision {
            filter: filter.clone(),
            phase,
            kind: DecisionKind::LocalReply {
                status: reply.status,
            },
        });
        let mut headers =
            Headers::response(reply.status, reply.headers.iter().map(|(k, v)| (k, v)));
        if !reply.body.is_empty() && headers.get("content-type").is_none() {
            headers.add(b"content-type", b"text/plain");
        }
        headers.replace(b"content-length", reply.body.len().to_string().as_bytes());
        self.shared.response_headers = headers;
        let mut body = reply.body;
        for j in (0..=i).rev() {
            let cb = Callback::ResponseHeaders {
                count: self.shared.response_headers.len() as u32,
                end_of_stream: body.is_empty(),
            };
            // Only failures matter here: the reply is already decided.
            let _ = self.step(j, Phase::ResponseHeaders, cb);
        }
        if !body.is_empty() {
            for j in (0..=i).rev() {
                if self.filters[j].state != StreamState::Active {
                    continue;
                }
                self.filters[j].own.response_body = std::mem::take(&mut body);
                let cb = Callback::ResponseBody {
                    size: self.filters[j].own.response_body.len() as u32,
                    end_of_stream: true,
                };
                let _ = self.step(j, Phase::ResponseBody, cb);
                body = std::mem::take(&mut self.filters[j].own.response_body);
            }
            self.shared
                .response_headers
                .replace(b"content-length", body.len().to_string().as_bytes());
        }
        let mut headers = self.shared.response_headers.clone();
        let status = headers
            .get_str(":status")
            .and_then(|s| s.parse().ok())
            .unwrap_or(reply.status);
        headers.remove(b":status");
        Action::LocalReply(LocalReply {
            status,
            headers,
            body,
            details: reply.details,
            grpc_status: reply.grpc_status,
            filter,
        })
    }
}

/// Applies the filter's failure policy to this stream and describes it for the flow record.
fn apply_policy(fs: &mut FilterStream, phase: Phase, f: &VmFailure) -> FilterDecision {
    let (state, outcome) = match fs.generation.spec_policy {
        FailurePolicy::FailOpen => (StreamState::Bypassed, FailureOutcome::Bypassed),
        FailurePolicy::FailClosed { status } | FailurePolicy::Reload { status, .. } => (
            StreamState::Rejected(status),
            FailureOutcome::Rejected { status },
        ),
    };
    fs.state = state;
    FilterDecision {
        filter: fs.name(),
        phase,
        kind: DecisionKind::Failed {
            reason: f.reason.clone(),
            outcome,
        },
    }
}

impl Drop for ChainStream {
    fn drop(&mut self) {
        self.finish_inner();
    }
}
