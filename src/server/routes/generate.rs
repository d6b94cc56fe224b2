//! `POST /v1/completions` and `POST /v1/chat/completions`, plain or streamed as SSE.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::headers;
use crate::error::ApiError;
use crate::server::auth::Caller;
use crate::server::backend::{BaseKind, Finished, GenerateJob, Prompt};
use crate::server::metrics;
use crate::server::resolve::{Target, resolve};
use crate::server::state::AppState;
use crate::server::wire::{ApiJson, GenerationRequest, Usage, finish_str, request_id, unix_now};

/// Which endpoint a generation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

pub async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<GenerationRequest>,
) -> Result<Response, ApiError> {
    let prompt = Prompt::Text(req.prompt()?);
    run(state, caller, req.model()?, prompt, req, Kind::Completion).await
}

pub async fn chat(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<GenerationRequest>,
) -> Result<Response, ApiError> {
    let prompt = Prompt::Chat(req.messages()?);
    run(state, caller, req.model()?, prompt, req, Kind::Chat).await
}

async fn run(
    state: AppState,
    caller: Caller,
    model: String,
    prompt: Prompt,
    fields: GenerationRequest,
    kind: Kind,
) -> Result<Response, ApiError> {
    let sampling = fields.sampling(state.limits.default_max_tokens)?;
    let permit = state.admit()?;
    let target = resolve(
        &state,
        &caller,
        &model,
        &fields.merge_field(),
        fields.user.as_deref(),
    )
    .await?;
    match state.base(&target.base).map(|b| b.kind) {
        Some(BaseKind::Generator) => {}
        _ => {
            return Err(ApiError::bad(
                "model",
                format!("{model} is served by an encoder; use /v1/embeddings or /v1/classify"),
            ));
        }
    }
    let job = GenerateJob {
        base: target.base.clone(),
        prompt,
        sampling,
        delta: target.delta.clone(),
    };
    let call = Call {
        id: request_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        model,
        kind,
        started: Instant::now(),
        deadline: Instant::now() + state.limits.request_timeout,
    };
    if let Some((exp, arm)) = &target.arm {
        state.experiments.remember(&call.id, exp, arm);
    }
    let running = state.inflight.start(target.adapter_names());
    let include_usage = fields
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let head = headers(&target, &call.id);
    if fields.stream {
        let stream = stream(state, target, job, call, include_usage, (permit, running));
        return Ok((head, Sse::new(stream).keep_alive(KeepAlive::default())).into_response());
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let (text, outcome) = generate_blocking(&state, job, call.deadline, cancel, |_| true).await;
    drop((permit, running));
    let finished = outcome.inspect_err(|_| record_arm(&state, &target, &call, None))?;
    record_arm(&state, &target, &call, Some(&finished));
    Ok((head, Json(call.body(&text, &finished))).into_response())
}

/// Generates a whole answer from `spec` (an arm's model) for the compare call.
pub async fn answer(
    state: &AppState,
    caller: &Caller,
    model: &str,
    prompt: Prompt,
    sampling: crate::server::backend::Sampling,
) -> Result<(String, Finished, Target), ApiError> {
    let _permit = state.admit()?;
    let target = resolve(state, caller, model, &Default::default(), None).await?;
    if state.base(&target.base).map(|b| b.kind) != Some(BaseKind::Generator) {
        return Err(ApiError::bad(
            "model",
            format!("{model} is not served by a generation model"),
        ));
    }
    let _running = state.inflight.start(target.adapter_names());
    let job = GenerateJob {
        base: target.base.clone(),
        prompt,
        sampling,
        delta: target.delta.clone(),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let deadline = Instant::now() + state.limits.request_timeout;
    let (text, outcome) = generate_blocking(state, job, deadline, cancel, |_| true).await;
    Ok((text, outcome?, target))
}

/// Per-request facts the response needs.
struct Call {
    id: String,
    model: String,
    kind: Kind,
    started: Instant,
    deadline: Instant,
}

impl Call {
    fn body(&self, text: &str, f: &Finished) -> Value {
        let usage = Usage::new(f.prompt_tokens, f.completion_tokens);
        let finish = finish_str(f.finish_reason);
        match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": unix_now(), "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": unix_now(), "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
        }
    }

    /// One streamed chunk: a piece of text, or (with `finish`) the last chunk.
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": unix_now(), "model": self.model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
            }),
            Kind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": unix_now(), "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
        }
    }

    fn usage_chunk(&self, f: &Finished) -> Value {
        let object = if self.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({"id": self.id, "object": object, "created": unix_now(), "model": self.model, "choices": [],
               "usage": Usage::new(f.prompt_tokens, f.completion_tokens)})
    }
}

/// Sets the flag when the request future is dropped (the client went away).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs the generation on a blocking thread; `on_text` sees every piece (return `false` to
/// stop). Returns the whole text and how it ended.
async fn generate_blocking(
    state: &AppState,
    job: GenerateJob,
    deadline: Instant,
    cancel: Arc<AtomicBool>,
    mut on_text: impl FnMut(&str) -> bool + Send + 'static,
) -> (String, Result<Finished, ApiError>) {
    let backend = state.backend.clone();
    let task = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        let mut timed_out = false;
        let result = backend.generate(&job, &mut |piece| {
            if Instant::now() > deadline {
                timed_out = true;
                return false;
            }
            text.push_str(piece);
            !cancel.load(Ordering::SeqCst) && on_text(piece)
        });
        let result = match result {
            Err(_) if timed_out => Err(ApiError::Timeout),
            other => other.map_err(ApiError::from),
        };
        (text, result)
    });
    match task.await {
        Ok((text, result)) => {
            if let Ok(f) = &result {
                metrics::tokens("prompt", f.prompt_tokens);
                metrics::tokens("completion", f.completion_tokens);
            }
            (text, result)
        }
        Err(e) => (
            String::new(),
            Err(ApiError::internal(format!("generation task failed: {e}"))),
        ),
    }
}

fn record_arm(state: &AppState, target: &Target, call: &Call, finished: Option<&Finished>) {
    if let Some((exp, arm)) = &target.arm {
        let seconds = call.started.elapsed().as_secs_f64();
        let tokens = finished.map_or(0, |f| f.completion_tokens);
        metrics::arm(exp, arm, finished.is_some(), seconds, tokens);
        if let Some(e) = state.experiments.get(exp) {
            e.record(arm, finished.is_some(), seconds, tokens);
        }
    }
}

/// The SSE stream of a generation. The generation stops when the client goes away: the
/// channel closes and the next piece cannot be sent.
fn stream<G: Send + 'static>(
    state: AppState,
    target: Target,
    job: GenerateJob,
    call: Call,
    include_usage: bool,
    guard: G,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let (tx, rx) = mpsc::channel::<String>(64);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let deadline = call.deadline;
    let gen_state = state.clone();
    tokio::spawn(async move {
        let send = tx.clone();
        let (_, outcome) = generate_blocking(&gen_state, job, deadline, cancel, move |piece| {
            send.blocking_send(piece.to_string()).is_ok()
        })
        .await;
        drop(tx);
        let _ = done_tx.send(outcome);
    });
    let call = Arc::new(call);
    let pieces_call = call.clone();
    let mut first = true;
    let pieces = ReceiverStream::new(rx).map(move |piece| {
        let chunk = pieces_call.chunk(Some(&piece), None, first);
        first = false;
        Ok(Event::default().data(chunk.to_string()))
    });
    let tail = futures_util::stream::once(async move {
        let outcome = done_rx
            .await
            .unwrap_or_else(|_| Err(ApiError::internal("generation ended unexpectedly")));
        let _guard = guard;
        let events: Vec<Event> = match outcome {
            Ok(finished) => {
                record_arm(&state, &target, &call, Some(&finished));
                let mut events = vec![
                    Event::default().data(
                        call.chunk(None, Some(finish_str(finished.finish_reason)), false)
                            .to_string(),
                    ),
                ];
                if include_usage {
                    events.push(Event::default().data(call.usage_chunk(&finished).to_string()));
                }
                events
            }
            Err(e) => {
                record_arm(&state, &target, &call, None);
                vec![Event::default().data(e.body().to_string())]
            }
        };
        futures_util::stream::iter(
            events
                .into_iter()
                .chain([Event::default().data("[DONE]")])
                .map(Ok),
        )
    })
    .flatten();
    pieces.chain(tail)
}
