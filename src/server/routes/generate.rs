//! `POST /v1/completions` and `POST /v1/chat/completions`, plain or streamed as SSE.

use std::convert::Infallible;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::headers;
use crate::error::ApiError;
use crate::server::auth::Caller;
use crate::server::backend::{BaseKind, Finished, GenEvent, GenStream, GenerateJob, Prompt};
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
    let started = Instant::now();
    let target = resolve(
        &state,
        &caller,
        &model,
        &fields.merge_field(),
        fields.user.as_deref(),
    )
    .await?;
    if state.base(&target.base).map(|b| b.kind) != Some(BaseKind::Generator) {
        return Err(ApiError::bad(
            "model",
            format!("{model} is served by an encoder; use /v1/embeddings or /v1/classify"),
        ));
    }
    let call = Call {
        id: request_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        model,
        kind,
        started,
        deadline: started + state.limits.request_timeout,
    };
    let job = job(
        &caller,
        &call.model,
        &target,
        prompt,
        sampling,
        call.deadline,
    );
    if let Some((exp, arm)) = &target.arm {
        state.experiments.remember(&call.id, exp, arm);
    }
    let include_usage = fields
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let head = headers(&target, &call.id);
    let events = submit(&state, job).await?;
    if fields.stream {
        let stream = stream(state, target, events, call, include_usage);
        return Ok((head, Sse::new(stream).keep_alive(KeepAlive::default())).into_response());
    }
    let (text, outcome) = collect(events).await;
    let finished = outcome.inspect_err(|_| record_arm(&state, &target, &call, None))?;
    record_arm(&state, &target, &call, Some(&finished));
    Ok((head, Json(call.body(&text, &finished))).into_response())
}

/// The engine job of a resolved request.
fn job(
    caller: &Caller,
    model: &str,
    target: &Target,
    prompt: Prompt,
    sampling: crate::server::backend::Sampling,
    deadline: Instant,
) -> GenerateJob {
    GenerateJob {
        base: target.base.clone(),
        prompt,
        sampling,
        delta: target.delta.clone(),
        tenant: caller.tenant.clone().unwrap_or_default(),
        label: model.to_string(),
        deadline,
    }
}

/// Generates a whole answer from `spec` (an arm's model) for the compare call.
pub async fn answer(
    state: &AppState,
    caller: &Caller,
    model: &str,
    prompt: Prompt,
    sampling: crate::server::backend::Sampling,
) -> Result<(String, Finished, Target), ApiError> {
    let target = resolve(state, caller, model, &Default::default(), None).await?;
    if state.base(&target.base).map(|b| b.kind) != Some(BaseKind::Generator) {
        return Err(ApiError::bad(
            "model",
            format!("{model} is not served by a generation model"),
        ));
    }
    let deadline = Instant::now() + state.limits.request_timeout;
    let job = job(caller, model, &target, prompt, sampling, deadline);
    let (text, outcome) = collect(submit(state, job).await?).await;
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

/// Queues the job with the model's engine (tokenizing and converting the delta off the async
/// workers); the answer arrives on the returned stream.
async fn submit(state: &AppState, job: GenerateJob) -> Result<GenStream, ApiError> {
    let backend = state.backend.clone();
    tokio::task::spawn_blocking(move || backend.generate(job))
        .await
        .map_err(|e| ApiError::internal(format!("submitting the generation failed: {e}")))?
        .map_err(ApiError::from)
}

/// Reads a whole generation: its text and how it ended.
async fn collect(mut events: GenStream) -> (String, Result<Finished, ApiError>) {
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            GenEvent::Text(piece) => text.push_str(&piece),
            GenEvent::Done(finished) => {
                count_tokens(&finished);
                return (text, Ok(finished));
            }
            GenEvent::Failed(e) => return (text, Err(e.into())),
        }
    }
    (text, Err(ended_early()))
}

fn ended_early() -> ApiError {
    ApiError::internal("generation ended unexpectedly")
}

fn count_tokens(f: &Finished) {
    metrics::tokens("prompt", f.prompt_tokens);
    metrics::tokens("completion", f.completion_tokens);
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

/// The SSE stream of a generation. Dropping it (the client went away) drops `events`, which
/// cancels the generation at the engine's next step.
fn stream(
    state: AppState,
    target: Target,
    events: GenStream,
    call: Call,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut first = true;
    let mut ended = false;
    UnboundedReceiverStream::new(events)
        .map(Some)
        .chain(futures_util::stream::once(async { None }))
        .flat_map(move |event| {
            let events: Vec<Event> = match event {
                _ if ended => Vec::new(),
                Some(GenEvent::Text(piece)) => {
                    let chunk = call.chunk(Some(&piece), None, first);
                    first = false;
                    vec![Event::default().data(chunk.to_string())]
                }
                Some(GenEvent::Done(finished)) => {
                    ended = true;
                    count_tokens(&finished);
                    record_arm(&state, &target, &call, Some(&finished));
                    let finish = finish_str(finished.finish_reason);
                    let mut events = vec![
                        Event::default().data(call.chunk(None, Some(finish), false).to_string()),
                    ];
                    if include_usage {
                        events.push(Event::default().data(call.usage_chunk(&finished).to_string()));
                    }
                    events.push(Event::default().data("[DONE]"));
                    events
                }
                failure => {
                    ended = true;
                    record_arm(&state, &target, &call, None);
                    let error = match failure {
                        Some(GenEvent::Failed(e)) => ApiError::from(e),
                        _ => ended_early(),
                    };
                    vec![
                        Event::default().data(error.body().to_string()),
                        Event::default().data("[DONE]"),
                    ]
                }
            };
            futures_util::stream::iter(events.into_iter().map(Ok))
        })
}
