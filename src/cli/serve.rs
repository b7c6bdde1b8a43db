use super::*;

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
    let addr = format!("{}:{}", a.host, a.port);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bind before loading so a taken port fails fast.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("cannot listen on {addr}"))?;
    let (mut engine, lora_modules) = a.model.load(false)?;
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
    let max_body_bytes = a
        .max_body_bytes
        .unwrap_or(if multimodal { 32 << 20 } else { 4 << 20 });
    let model_id = a.served_model_name.clone().unwrap_or(a.model.model.clone());
    let app = phi4::server::engine_router(
        std::sync::Arc::new(engine),
        BatcherConfig {
            max_batch: a.max_batch,
            max_queue: a.max_queue,
        },
        ServerOptions {
            model_id: model_id.clone(),
            api_keys: keys.clone(),
            max_body_bytes,
            lora_modules: lora_modules.clone(),
        },
    );
    let local = listener.local_addr()?;
    eprintln!(
        "phi4 serve: listening on http://{local} (model {model_id:?}{}, {})",
        if lora_modules.is_empty() {
            String::new()
        } else {
            format!(", LoRA adapters {lora_modules:?}")
        },
        if keys.is_empty() {
            "no API key".to_string()
        } else {
            format!("{} API key(s)", keys.len())
        }
    );
    runtime
        .block_on(phi4::server::serve(listener, app))
        .context("serving")
}
