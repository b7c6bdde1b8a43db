use super::*;

#[derive(Args)]
pub(super) struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Print {"ids": [...]}.
    #[arg(long)]
    json: bool,
}

pub(super) fn tokenize(a: TokenizeArgs) -> Result<()> {
    let dir = resolve_model(&a.model.model)?;
    let tok = phi4::text::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("reading stdin")?;
    let text =
        String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("stdin is not valid UTF-8 ({e})"))?;
    let ids = tok.encode(&text)?;
    if a.json {
        println!("{}", json!({ "ids": ids }));
    } else {
        println!(
            "{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        );
    }
    Ok(())
}
