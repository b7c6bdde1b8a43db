//! OpenAI's audio endpoints: `POST /v1/audio/transcriptions` and `/v1/audio/translations`,
//! multipart/form-data in, the response formats of OpenAI's API out (json, text, srt, vtt,
//! verbose_json with segments), so the official SDKs' `client.audio.transcriptions.create(...)`
//! works unchanged. The model transcribes or translates; translations go into English as
//! OpenAI's do.

use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::cut::Cut;
use super::error::ApiError;
use super::AppState;
use crate::engine::{SpeechOptions, SpeechTask, Transcript};
use crate::SamplingParams;

/// What a transcription request may hold.
#[derive(Default)]
struct Form {
    file: Option<Vec<u8>>,
    model: Option<String>,
    language: Option<String>,
    prompt: Option<String>,
    response_format: Option<String>,
    temperature: Option<f32>,
}

fn multipart_error(e: MultipartError) -> ApiError {
    let status = e.status();
    let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "request body is larger than the server accepts".to_string()
    } else {
        format!("malformed multipart/form-data body: {}", e.body_text())
    };
    ApiError::new(status, "invalid_request_error", msg)
}

async fn read_form(
    mp: Result<Multipart, MultipartRejection>,
    translation: bool,
) -> Result<Form, ApiError> {
    let mut mp = mp.map_err(|r| {
        ApiError::new(
            r.status(),
            "invalid_request_error",
            format!(
                "the body must be multipart/form-data with a `file` field ({})",
                r.body_text()
            ),
        )
    })?;
    let mut f = Form::default();
    while let Some(field) = mp.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_owned();
        if name == "file" {
            let bytes = field.bytes().await.map_err(multipart_error)?;
            f.file = Some(bytes.to_vec());
            continue;
        }
        let text = field.text().await.map_err(multipart_error)?;
        match name.as_str() {
            "model" => f.model = Some(text),
            "language" if !translation => f.language = Some(text),
            "prompt" => f.prompt = Some(text),
            "response_format" => f.response_format = Some(text),
            "temperature" => {
                let t: f32 = text.trim().parse().map_err(|_| {
                    ApiError::param(
                        "temperature",
                        format!("temperature {text:?} is not a number"),
                    )
                })?;
                if !(0.0..=1.0).contains(&t) {
                    return Err(ApiError::param(
                        "temperature",
                        format!("temperature must be between 0 and 1, not {t}"),
                    ));
                }
                f.temperature = Some(t);
            }
            // Segment times are what we have; word times are not modelled.
            "timestamp_granularities[]" | "timestamp_granularities" => {
                if text != "segment" {
                    return Err(ApiError::param(
                        &name,
                        format!(
                            "timestamp granularity {text:?} is not supported (only \"segment\")"
                        ),
                    ));
                }
            }
            "stream" if text == "false" => {}
            "stream" => {
                return Err(ApiError::param(
                    "stream",
                    "streaming transcriptions are not supported",
                ))
            }
            other => {
                return Err(ApiError::param(
                    other,
                    format!("Unrecognized request argument supplied: {other}"),
                ))
            }
        }
    }
    Ok(f)
}

async fn handle(
    st: AppState,
    mp: Result<Multipart, MultipartRejection>,
    translation: bool,
) -> Result<Response, ApiError> {
    let t0 = std::time::Instant::now();
    let form = read_form(mp, translation).await?;
    let Some(model) = form.model else {
        return Err(ApiError::param(
            "model",
            "you must provide a model parameter",
        ));
    };
    if model != st.opts.model_id {
        return Err(ApiError::not_found(format!(
            "The model `{model}` does not exist; this server serves `{}`.",
            st.opts.model_id
        ))
        .code("model_not_found"));
    }
    let Some(file) = form.file else {
        return Err(ApiError::param("file", "the request has no `file` field"));
    };
    if file.is_empty() {
        return Err(ApiError::param("file", "the audio file is empty (0 bytes)"));
    }
    let format = form.response_format.unwrap_or_else(|| "json".into());
    if !["json", "text", "srt", "vtt", "verbose_json"].contains(&format.as_str()) {
        return Err(ApiError::param(
            "response_format",
            format!("response_format {format:?} is not one of json, text, srt, vtt, verbose_json"),
        ));
    }
    let task = if translation {
        SpeechTask::Translate {
            language: "English".into(),
        }
    } else {
        SpeechTask::Transcribe
    };
    let mut opts = SpeechOptions::new(task);
    opts.prompt = form.prompt;
    opts.language = if translation {
        Some("english".into())
    } else {
        form.language
    };
    opts.params = SamplingParams {
        temperature: form.temperature.unwrap_or(0.0),
        ..SamplingParams::greedy(1024)
    };
    let backend = st.backend.clone();
    let cut = Cut::new(&st, t0);
    let t: Transcript = tokio::task::spawn_blocking(move || backend.transcribe(file, &opts, cut))
        .await
        .map_err(|e| ApiError::internal(format!("transcription failed: {e}")))??;
    st.metrics.generation_tokens.inc_by(
        t.segments
            .iter()
            .map(|s| s.tokens.len() as u64)
            .sum::<u64>(),
    );
    let plain = |body: String| {
        ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
    };
    let usage = json!({"type": "duration", "seconds": t.duration.ceil() as u64});
    Ok(match format.as_str() {
        "text" => plain(format!("{}\n", t.text)),
        "srt" => plain(t.to_srt()),
        "vtt" => plain(t.to_vtt()),
        "verbose_json" => {
            let mut v: Value = t.to_verbose_json();
            v["usage"] = usage;
            Json(v).into_response()
        }
        _ => {
            let mut v = t.to_json();
            v["usage"] = usage;
            Json(v).into_response()
        }
    })
}

pub async fn transcriptions(
    State(st): State<AppState>,
    mp: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    handle(st, mp, false).await
}

pub async fn translations(
    State(st): State<AppState>,
    mp: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    handle(st, mp, true).await
}
