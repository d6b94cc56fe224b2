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
use crate::server::auth::Caller;
use crate::server::backend::{
    BaseKind, Finished, GenEvent, GenStream, GenerateJob, Piece, Prompt, Sampling, TokenLogprobs,
};
use crate::server::call::{ModelRequest, admit};
use crate::server::error::ApiError;
use crate::server::metrics;
use crate::server::resolve::Target;
use crate::server::state::AppState;
use crate::server::wire::{
    ApiJson, Endpoint, GenerationRequest, Usage, finish_str, request_id, unix_now,
};

pub async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<GenerationRequest>,
) -> Result<Response, ApiError> {
    let prompt = Prompt::Text(req.prompt()?);
    run(
        state,
        caller,
        req.model()?,
        prompt,
        req,
        Endpoint::Completion,
    )
    .await
}

pub async fn chat(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<GenerationRequest>,
) -> Result<Response, ApiError> {
    let prompt = Prompt::Chat(req.messages()?);
    run(state, caller, req.model()?, prompt, req, Endpoint::Chat).await
}

async fn run(
    state: AppState,
    caller: Caller,
    model: String,
    prompt: Prompt,
    fields: GenerationRequest,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let sampling = fields.sampling(state.limits.default_max_tokens, endpoint)?;
    let choices = fields.choices()?;
    let req = ModelRequest::parse(&model, fields.merge.clone())?;
    let user = fields.user.as_deref();
    let mut admitted = admit(&state, &caller, &req, user, Some(BaseKind::Generator)).await?;
    let call = Call {
        id: request_id(match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        }),
        model,
        endpoint,
        logprobs: sampling.logprobs.is_some(),
        started: admitted.started,
        deadline: admitted.deadline,
    };
    let target = admitted.target.clone();
    if let Some((exp, arm)) = &target.arm {
        state
            .experiments
            .remember(&call.id, exp, arm, caller.key_id.as_deref())?;
    }
    let include_usage = fields
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let head = headers(&target, &call.id);
    let mut streams = Vec::with_capacity(choices);
    for i in 0..choices {
        let sampling = Sampling {
            // Each choice draws its own tokens; with a seed, each is still reproducible.
            seed: sampling.seed.map(|s| s.wrapping_add(i as u64)),
            ..sampling.clone()
        };
        let job = job(
            &caller,
            &call.model,
            &target,
            prompt.clone(),
            sampling,
            call.deadline,
        );
        streams.push(submit(&state, job).await?);
    }
    // Queued: the engine bounds its own queue from here.
    admitted.release_slot();
    if fields.stream {
        let stream = stream(state, target, streams, call, include_usage);
        return Ok((head, Sse::new(stream).keep_alive(KeepAlive::default())).into_response());
    }
    let outcomes = futures_util::future::join_all(streams.into_iter().map(collect)).await;
    let answers = outcomes
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .inspect_err(|_| record_arm(&state, &target, &call, None))?;
    let finished: Vec<&Finished> = answers.iter().map(|a| &a.finished).collect();
    record_arm(&state, &target, &call, Some(&finished));
    Ok((head, Json(call.body(&answers))).into_response())
}

/// The engine job of a resolved request.
fn job(
    caller: &Caller,
    model: &str,
    target: &Target,
    prompt: Prompt,
    sampling: Sampling,
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

/// Generates a whole answer from `model` (an arm's model) for the compare call.
pub async fn answer(
    state: &AppState,
    caller: &Caller,
    model: &str,
    prompt: Prompt,
    sampling: Sampling,
) -> Result<(String, Finished, Target), ApiError> {
    let req = ModelRequest::parse(model, None)?;
    let admitted = admit(state, caller, &req, None, Some(BaseKind::Generator)).await?;
    let target = admitted.target.clone();
    let job = job(caller, model, &target, prompt, sampling, admitted.deadline);
    let answer = collect(submit(state, job).await?).await?;
    Ok((answer.text, answer.finished, target))
}

/// One whole choice: its text, its tokens' log-probabilities (when asked for) and how it ended.
struct Answer {
    text: String,
    logprobs: Vec<TokenLogprobs>,
    finished: Finished,
}

/// Per-request facts the response needs.
struct Call {
    id: String,
    model: String,
    endpoint: Endpoint,
    /// Whether the request asked for log-probabilities.
    logprobs: bool,
    started: Instant,
    deadline: Instant,
}

impl Call {
    fn body(&self, answers: &[Answer]) -> Value {
        let usage = total_usage(answers.iter().map(|a| &a.finished));
        let choices: Vec<Value> = answers
            .iter()
            .enumerate()
            .map(|(index, a)| {
                let finish = finish_str(a.finished.finish_reason);
                let logprobs = self.logprobs_json(&a.logprobs, 0);
                match self.endpoint {
                    Endpoint::Completion => {
                        json!({"index": index, "text": a.text, "logprobs": logprobs, "finish_reason": finish})
                    }
                    Endpoint::Chat => json!({
                        "index": index, "message": {"role": "assistant", "content": a.text},
                        "logprobs": logprobs, "finish_reason": finish,
                    }),
                }
            })
            .collect();
        let object = match self.endpoint {
            Endpoint::Completion => "text_completion",
            Endpoint::Chat => "chat.completion",
        };
        json!({"id": self.id, "object": object, "created": unix_now(), "model": self.model,
               "choices": choices, "usage": usage})
    }

    /// Log-probabilities in the endpoint's format (`null` when not asked for): the legacy
    /// completions object of parallel lists, with text offsets counted from `offset`, or chat's
    /// list of token objects.
    fn logprobs_json(&self, tokens: &[TokenLogprobs], offset: usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.endpoint {
            Endpoint::Completion => {
                let mut at = offset;
                let offsets: Vec<usize> = tokens
                    .iter()
                    .map(|t| {
                        let here = at;
                        at += t.token.len();
                        here
                    })
                    .collect();
                json!({
                    "tokens": tokens.iter().map(|t| &t.token).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|t| {
                        t.top.iter().map(|(tok, lp)| (tok.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
            Endpoint::Chat => {
                let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(&t.token, t.logprob);
                        e["top_logprobs"] = t.top.iter().map(|(tok, lp)| entry(tok, *lp)).collect();
                        e
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
        }
    }

    /// One streamed chunk of choice `index`: a piece of text, or (with `finish`) its last chunk.
    fn chunk(
        &self,
        index: usize,
        piece: Option<&Piece>,
        finish: Option<&str>,
        first: bool,
        offset: usize,
    ) -> Value {
        let text = piece.map(|p| p.text.as_str());
        let logprobs = match piece.and_then(|p| p.logprob.as_ref()) {
            Some(lp) => self.logprobs_json(std::slice::from_ref(lp), offset),
            None => Value::Null,
        };
        match self.endpoint {
            Endpoint::Completion => json!({
                "id": self.id, "object": "text_completion", "created": unix_now(), "model": self.model,
                "choices": [{"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish}],
            }),
            Endpoint::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": unix_now(), "model": self.model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                })
            }
        }
    }

    fn usage_chunk(&self, finished: &[Finished]) -> Value {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": unix_now(), "model": self.model, "choices": [],
               "usage": total_usage(finished.iter())})
    }
}

/// Usage of a request's choices: the prompt once, every choice's completion.
fn total_usage<'a>(finished: impl Iterator<Item = &'a Finished>) -> Usage {
    let mut prompt = 0;
    let mut completion = 0;
    for f in finished {
        prompt = f.prompt_tokens;
        completion += f.completion_tokens;
    }
    Usage::new(prompt, completion)
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

/// Reads a whole generation: its text, log-probabilities and how it ended.
async fn collect(mut events: GenStream) -> Result<Answer, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            GenEvent::Text(piece) => {
                text.push_str(&piece.text);
                logprobs.extend(piece.logprob);
            }
            GenEvent::Done(finished) => {
                count_tokens(&finished);
                return Ok(Answer {
                    text,
                    logprobs,
                    finished,
                });
            }
            GenEvent::Failed(e) => return Err(e.into()),
        }
    }
    Err(ended_early())
}

fn ended_early() -> ApiError {
    ApiError::internal("generation ended unexpectedly")
}

fn count_tokens(f: &Finished) {
    metrics::tokens("prompt", f.prompt_tokens);
    metrics::tokens("completion", f.completion_tokens);
}

/// Records how a request served by an experiment arm ended: failed (`None`) or its choices'
/// tokens. A store failure is logged: the answer is already on its way.
fn record_arm(state: &AppState, target: &Target, call: &Call, finished: Option<&[&Finished]>) {
    if let Some((exp, arm)) = &target.arm {
        let seconds = call.started.elapsed().as_secs_f64();
        let tokens = finished.map_or(0, |f| f.iter().map(|f| f.completion_tokens).sum());
        metrics::arm(exp, arm, finished.is_some(), seconds, tokens);
        let stored = state
            .experiments
            .finished(exp, &call.id, finished.is_some(), seconds, tokens);
        if let Err(e) = stored {
            tracing::error!(request = %call.id, error = %e, "recording an experiment outcome failed");
        }
    }
}

/// Where one streamed choice stands.
#[derive(Default)]
struct ChoiceState {
    started: bool,
    /// Bytes of token text sent so far (the completions format's text offsets).
    offset: usize,
    finished: Option<Finished>,
}

/// The SSE stream of a request's choices, interleaved as their tokens arrive. Dropping it (the
/// client went away) drops every choice's events, which cancels them at the engine's next step.
fn stream(
    state: AppState,
    target: Target,
    streams: Vec<GenStream>,
    call: Call,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let mut choices: Vec<ChoiceState> = streams.iter().map(|_| ChoiceState::default()).collect();
    let mut ended = false;
    let tagged = streams
        .into_iter()
        .enumerate()
        .map(|(i, events)| UnboundedReceiverStream::new(events).map(move |e| (i, e)));
    futures_util::stream::select_all(tagged)
        .map(Some)
        .chain(futures_util::stream::once(async { None }))
        .flat_map(move |event| {
            let events: Vec<Event> = match event {
                _ if ended => Vec::new(),
                Some((i, GenEvent::Text(piece))) => {
                    let c = &mut choices[i];
                    let chunk = call.chunk(i, Some(&piece), None, !c.started, c.offset);
                    c.started = true;
                    c.offset += piece.logprob.as_ref().map_or(0, |lp| lp.token.len());
                    vec![data(&chunk)]
                }
                Some((i, GenEvent::Done(finished))) => {
                    count_tokens(&finished);
                    let finish = finish_str(finished.finish_reason);
                    let mut events = vec![data(&call.chunk(i, None, Some(finish), false, 0))];
                    choices[i].finished = Some(finished);
                    if choices.iter().all(|c| c.finished.is_some()) {
                        ended = true;
                        let done: Vec<Finished> =
                            choices.iter().filter_map(|c| c.finished.clone()).collect();
                        record_arm(
                            &state,
                            &target,
                            &call,
                            Some(&done.iter().collect::<Vec<_>>()),
                        );
                        if include_usage {
                            events.push(data(&call.usage_chunk(&done)));
                        }
                        events.push(Event::default().data("[DONE]"));
                    }
                    events
                }
                failure => {
                    ended = true;
                    record_arm(&state, &target, &call, None);
                    let error = match failure {
                        Some((_, GenEvent::Failed(e))) => ApiError::from(e),
                        _ => ended_early(),
                    };
                    vec![data(&error.body()), Event::default().data("[DONE]")]
                }
            };
            futures_util::stream::iter(events.into_iter().map(Ok))
        })
}

fn data(value: &Value) -> Event {
    Event::default().data(value.to_string())
}
