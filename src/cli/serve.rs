use super::*;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use phi4::server::connection::ConnectionLimits;
use phi4::server::lifecycle::Shutdown;
use phi4::server::{ListenConfig, LogFormat, LogOptions, ServerStatus};

#[derive(Args)]
pub(super) struct ServeArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Name clients use for the model (default: the --model value).
    #[arg(long)]
    served_model_name: Option<String>,
    /// A key clients must send as `Authorization: Bearer KEY` on /v1 (repeatable). Keys also
    /// come from PHI4_API_KEY (comma-separated) and --api-key-file (one per line).
    #[arg(long)]
    api_key: Vec<String>,
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Most requests waiting for a slot; more get 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body in bytes (413 beyond; default 4 MiB, 32 MiB for a multimodal
    /// model, whose images and audio come as base64 or file uploads).
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Longest prompt plus output per request (default: the model's context).
    #[arg(long)]
    max_model_len: Option<usize>,
    #[arg(long, value_enum, default_value = "dynamic")]
    rope_policy: RopePolicyArg,
    /// Fetch http(s) image and audio URLs named in requests (off: only data: URLs and uploads,
    /// so the server makes no request of its own that a client asked for).
    #[arg(long)]
    allow_remote_media: bool,
    /// Let requests name local image and audio files (file:// URLs or paths) under this
    /// directory.
    #[arg(long, value_name = "DIR")]
    allowed_local_media_path: Option<PathBuf>,
    /// Largest image accepted, in pixels (decoded size; 400 beyond).
    #[arg(long, default_value_t = phi4::media::image::DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
    /// Most images in one request (400 beyond).
    #[arg(long, default_value_t = 16)]
    max_images_per_request: usize,
    /// Longest audio accepted, in seconds, per audio (400 beyond).
    #[arg(long, default_value_t = phi4::media::audio::DEFAULT_MAX_SECONDS)]
    max_audio_seconds: f64,
    /// Most audios in one chat request (400 beyond).
    #[arg(long, default_value_t = 16)]
    max_audios_per_request: usize,
    /// Seconds a client has from a request's first byte to the end of its headers; a slower
    /// one is disconnected.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    header_timeout: f64,
    /// Seconds a request body (a large media upload included) may take to arrive; beyond, 408
    /// and the connection is closed.
    #[arg(long, default_value_t = 120.0, value_name = "SECS")]
    body_timeout: f64,
    /// Seconds an open connection may wait for its next request (longer than a load
    /// balancer's idle timeout, so the balancer closes first).
    #[arg(long, default_value_t = 75.0, value_name = "SECS")]
    keep_alive_timeout: f64,
    /// Connections served at once; a new one beyond gets 503 with Retry-After and is closed.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Seconds a request may run in all (queue, prompt, generation); then it ends as if
    /// max_tokens were reached: finish_reason "length", the text so far. 0: no limit.
    #[arg(long, default_value_t = 1800.0, value_name = "SECS")]
    request_timeout: f64,
    /// On SIGTERM or SIGINT: seconds running requests get to finish before they are ended
    /// (streams get a final chunk and [DONE]); a second signal exits at once.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    shutdown_timeout: f64,
    /// One line per API request on stderr: `text` (key=value) or `json`.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormatArg,
    /// Put the request's messages or prompt in its log line (off: no user text in logs).
    #[arg(long)]
    log_prompts: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum LogFormatArg {
    Text,
    Json,
}

/// A positive number of seconds from a flag.
fn seconds(flag: &str, v: f64) -> Result<Duration> {
    if !(v > 0.0 && v.is_finite() && v < 1e9) {
        bail!("--{flag} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

pub(super) fn api_keys(a: &ServeArgs) -> Result<Vec<String>> {
    let mut keys = a.api_key.clone();
    if let Ok(v) = std::env::var("PHI4_API_KEY") {
        keys.extend(v.split(',').map(str::to_string));
    }
    if let Some(f) = &a.api_key_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading API key file {}", f.display()))?;
        keys.extend(text.lines().map(str::to_string));
    }
    let keys: Vec<String> = keys
        .into_iter()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect();
    if a.api_key_file.is_some() && keys.is_empty() {
        bail!("the API key file holds no key");
    }
    Ok(keys)
}

pub(super) fn serve(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 || a.max_queue == 0 {
        bail!("--max-batch and --max-queue must be at least 1");
    }
    let keys = api_keys(&a)?;
    let local_media = match &a.allowed_local_media_path {
        Some(d) => {
            if !d.is_dir() {
                bail!(
                    "--allowed-local-media-path {} is not a directory",
                    d.display()
                );
            }
            LocalMedia::Under(d.clone())
        }
        None => LocalMedia::Denied,
    };
    if a.max_images_per_request == 0 || a.max_image_pixels == 0 || a.max_audios_per_request == 0 {
        bail!("--max-images-per-request, --max-audios-per-request and --max-image-pixels must be at least 1");
    }
    if !(a.max_audio_seconds > 0.0 && a.max_audio_seconds.is_finite()) {
        bail!("--max-audio-seconds must be a positive number of seconds");
    }
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    // 0 turns the limit off; anything else must be a valid duration (NaN is neither).
    let request_timeout = match a.request_timeout {
        0.0 => None,
        v => Some(seconds("request-timeout", v).context("or 0 for no limit")?),
    };
    let listen = ListenConfig {
        limits: ConnectionLimits {
            header_timeout: seconds("header-timeout", a.header_timeout)?,
            keep_alive_timeout: seconds("keep-alive-timeout", a.keep_alive_timeout)?,
        },
        max_connections: a.max_connections,
        shutdown_timeout: seconds("shutdown-timeout", a.shutdown_timeout)?,
    };
    let mut opts = ServerOptions {
        model_id: a.served_model_name.clone().unwrap_or(a.model.model.clone()),
        api_keys: keys,
        max_queue: a.max_queue,
        request_timeout,
        body_timeout: seconds("body-timeout", a.body_timeout)?,
        log: LogOptions {
            format: match a.log_format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            },
            prompts: a.log_prompts,
        },
        status: Arc::new(ServerStatus::loading()),
        ..Default::default()
    };
    raise_fd_limit(a.max_connections);
    let addr = format!("{}:{}", a.host, a.port);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Listen before loading: a taken port fails fast, and /health answers during the load.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    eprintln!(
        "phi4 serve: listening on http://{local} (loading {:?}; /health answers now, /ready once \
         the model is loaded)",
        a.model.model
    );
    let status = opts.status.clone();
    let (model_id, key_count) = (opts.model_id.clone(), opts.api_keys.len());
    let adapters: Arc<OnceLock<Vec<String>>> = Arc::default();
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    let loader_adapters = adapters.clone();
    std::thread::Builder::new()
        .name("phi4-loader".into())
        .spawn(move || {
            let app = load_app(&a, &mut opts, local_media).inspect(|_| {
                let _ = loader_adapters.set(opts.lora_modules.clone());
            });
            let _ = loaded_tx.send(app);
        })
        .context("starting the loader thread")?;
    let on_ready = move || {
        let adapters = adapters.get().cloned().unwrap_or_default();
        eprintln!(
            "phi4 serve: ready on http://{local} (model {model_id:?}{}, {})",
            if adapters.is_empty() {
                String::new()
            } else {
                format!(", LoRA adapters {adapters:?}")
            },
            if key_count == 0 {
                "no API key".to_string()
            } else {
                format!("{key_count} API key(s)")
            }
        );
        eprintln!("phi4 serve: {}", phi4::kernels::amx::status().describe());
    };
    runtime.block_on(async {
        let signals = Shutdown::on_signals().context("handling SIGTERM and SIGINT")?;
        phi4::server::lifecycle::run(listener, listen, status, loaded_rx, on_ready, signals).await
    })
}

/// Loads the model (reporting progress to `/health`) and builds the application around it.
fn load_app(a: &ServeArgs, opts: &mut ServerOptions, local_media: LocalMedia) -> Result<Router> {
    let status = opts.status.clone();
    let (mut engine, lora_modules) = a
        .model
        .load_reporting(false, &|done, total| status.set_load_progress(done, total))?;
    engine.rope_policy = a.rope_policy.into();
    if let Some(n) = a.max_model_len {
        let ctx = engine.model.config.max_position_embeddings;
        if n < 2 || n > ctx {
            bail!("--max-model-len must be between 2 and the model's context ({ctx})");
        }
        engine.max_model_len = n;
    }
    let multimodal = engine.mm.is_some();
    if let Some(mm) = &mut engine.mm {
        mm.limits.allow_remote = a.allow_remote_media;
        mm.limits.local = local_media;
        mm.limits.max_image_pixels = a.max_image_pixels;
        mm.limits.max_images = a.max_images_per_request;
        mm.limits.max_audio_seconds = a.max_audio_seconds;
        mm.limits.max_audios = a.max_audios_per_request;
    }
    opts.max_body_bytes = a
        .max_body_bytes
        .unwrap_or(if multimodal { 32 << 20 } else { 4 << 20 });
    opts.lora_modules = lora_modules;
    Ok(phi4::server::engine_router(
        Arc::new(engine),
        BatcherConfig {
            max_batch: a.max_batch,
            max_queue: a.max_queue,
        },
        opts.clone(),
    ))
}

/// Lifts the soft limit on open files toward the hard one, so `--max-connections` is reached
/// before the process runs out of descriptors (a soft limit of 1024 is common; each connection
/// takes one, and the model's files a few).
fn raise_fd_limit(max_connections: usize) {
    #[cfg(target_os = "linux")]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return;
            }
            let want = (max_connections as libc::rlim_t)
                .saturating_mul(2)
                .saturating_add(256)
                .min(lim.rlim_max);
            if want > lim.rlim_cur {
                lim.rlim_cur = want;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    eprintln!("phi4 serve: could not raise the open-file limit to {want}");
                }
            }
        }
        if (lim.rlim_cur as u128) < max_connections as u128 + 64 {
            eprintln!(
                "phi4 serve: the open-file limit ({}) is below --max-connections ({max_connections}); \
                 raise it (ulimit -n) or lower the flag",
                lim.rlim_cur
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = max_connections;
}
