//! Finding a model: a local directory, or a Hugging Face repo id looked up in the local hub cache
//! and downloaded (with a progress bar) when missing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

use crate::weights::shard_files;

pub const DEFAULT_MODEL: &str = "microsoft/Phi-4-mini-instruct";
/// What `phi4 transcribe` loads unless told otherwise: the model with ears.
pub const DEFAULT_MULTIMODAL_MODEL: &str = "microsoft/Phi-4-multimodal-instruct";

/// Files every checkpoint directory needs, besides its weights.
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
/// Files used when present.
const OPTIONAL: &[&str] = &[
    "generation_config.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

fn cache() -> Cache {
    match std::env::var("HF_HUB_CACHE") {
        Ok(p) => Cache::new(PathBuf::from(p)),
        Err(_) => Cache::from_env(),
    }
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p != &"."
                && p != &".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves `--model` to a directory holding the checkpoint.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        bail!(
            "--model {spec} is a file; pass the directory that holds config.json and the weights"
        );
    }
    if !looks_like_repo_id(spec) {
        bail!("--model {spec}: no such directory, and not a Hugging Face repo id (owner/name)");
    }
    if let Some(dir) = cached_snapshot(spec) {
        return Ok(dir);
    }
    download(spec)
}

/// The snapshot directory of `repo` in the local hub cache, if it holds a complete checkpoint.
fn cached_snapshot(repo: &str) -> Option<PathBuf> {
    let c = cache().model(repo.to_string());
    let config = c.get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    let complete = REQUIRED.iter().all(|f| dir.join(f).exists())
        && match c.get("model.safetensors.index.json") {
            Some(index) => shard_files(&index)
                .ok()?
                .iter()
                .all(|s| dir.join(s).exists()),
            None => dir.join("model.safetensors").exists(),
        };
    complete.then_some(dir)
}

fn offline_help(repo: &str, why: &str) -> String {
    let name = repo.rsplit('/').next().unwrap_or(repo);
    format!(
        "could not download {repo} from the Hugging Face hub ({why}).\n\
         If this machine is offline, download the model elsewhere (for example \
         `huggingface-cli download {repo} --local-dir {name}`), copy the directory \
         here and pass it with --model /path/to/{name}"
    )
}

/// Phi-4-multimodal in transformers' layout keeps its adapters in PEFT folders beside the
/// weights (the remote-code layout has them inside the weights).
const ADAPTER_FILES: &[&str] = &[
    "vision-lora/adapter_config.json",
    "vision-lora/adapter_model.safetensors",
    "speech-lora/adapter_config.json",
    "speech-lora/adapter_model.safetensors",
];

/// Downloads the checkpoint files of `repo` into the hub cache and returns the snapshot dir.
fn download(repo: &str) -> Result<PathBuf> {
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true") {
        bail!(offline_help(
            repo,
            "HF_HUB_OFFLINE is set and the model is not in the local cache"
        ));
    }
    let api = ApiBuilder::from_cache(cache())
        .with_progress(true)
        .build()
        .map_err(|e| anyhow::anyhow!(offline_help(repo, &e.to_string())))?;
    let r = api.repo(Repo::model(repo.to_string()));
    let fetch = |f: &str| -> Result<PathBuf> {
        r.get(f)
            .map_err(|e| anyhow::anyhow!(offline_help(repo, &format!("{f}: {e}"))))
    };
    let mut dir = None;
    for f in REQUIRED {
        dir = fetch(f)?.parent().map(Path::to_path_buf);
    }
    for f in OPTIONAL {
        let _ = r.get(f); // absent optional files are fine
    }
    let config = dir.as_ref().map(|d| d.join("config.json"));
    if config
        .and_then(|c| std::fs::read_to_string(c).ok())
        .is_some_and(|t| t.contains("\"phi4_multimodal\""))
    {
        for f in ADAPTER_FILES {
            fetch(f)?;
        }
    }
    match r.get("model.safetensors.index.json") {
        Ok(index) => {
            for shard in shard_files(&index)? {
                fetch(&shard)?;
            }
        }
        Err(_) => {
            fetch("model.safetensors")?;
        }
    }
    dir.context("cache path has no parent")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        assert!(looks_like_repo_id("microsoft/Phi-4-mini-instruct"));
        assert!(!looks_like_repo_id("./models/phi"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        let e = resolve_model("/definitely/not/here")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such directory"), "{e}");
    }
}
