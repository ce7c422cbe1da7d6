//! `inference` and `serve`: chat with the fine-tuned model in the terminal, or serve it (chat page
//! and OpenAI-compatible API).

use super::common::{open_single, Common};
use anyhow::Result;
use kiln::model::engine::Engine;
use kiln::text::TextTokenizer;
use kiln::workspace::Workspace;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct InferenceArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    gen: GenArgs,
    /// Answer this prompt and exit.
    #[arg(long)]
    prompt: Option<String>,
    /// Apply this PEFT adapter directory instead of the config's train stage.
    #[arg(long)]
    lora_model_dir: Option<PathBuf>,
    /// Use this base model instead of the config's (hub id, directory or .gguf).
    #[arg(long)]
    base_model: Option<String>,
    /// Chat with this GGUF file (e.g. one `kiln export` wrote), its weights kept quantized;
    /// tokenizer and chat template from its metadata.
    #[arg(long, conflicts_with_all = ["lora_model_dir", "base_model"])]
    gguf: Option<PathBuf>,
    /// Feed the prompt as plain text (no chat template), for base models.
    #[arg(long)]
    raw: bool,
    /// A system message for the conversation.
    #[arg(long)]
    system: Option<String>,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Address to bind (default: `gradio_server_name`, else 127.0.0.1 — this machine only).
    #[arg(long)]
    host: Option<String>,
    /// Port (default: `gradio_server_port`, else 7860; 0 picks a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Apply this PEFT adapter directory instead of the config's train stage.
    #[arg(long)]
    lora_model_dir: Option<PathBuf>,
    /// Serve this GGUF file (e.g. one `kiln export` wrote), its weights kept quantized.
    #[arg(long, conflicts_with = "lora_model_dir")]
    gguf: Option<PathBuf>,
    /// Default answer length (default: `gradio_max_new_tokens`, else 256).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Default temperature (default: `gradio_temperature`, else 0 = greedy).
    #[arg(long)]
    temperature: Option<f64>,
    /// Requests that may wait for the model (more get 503).
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Largest request body in bytes (more get 413, unread).
    #[arg(long, default_value_t = 1_000_000)]
    max_body_bytes: usize,
    /// Open connections at most (more get 503).
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    /// Seconds a connection may idle, and a request take to arrive, before it is closed.
    #[arg(long, default_value_t = 30.0)]
    idle_timeout: f64,
}

#[derive(clap::Args, Clone)]
pub struct GenArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// 0 = no top-k limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl GenArgs {
    pub fn settings(&self) -> kiln::infer::GenSettings {
        kiln::infer::GenSettings {
            sampling: kiln::model::generate::SamplingOptions {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
            },
            max_new_tokens: self.max_new_tokens,
        }
    }
}

pub fn chat_loop(chat: &mut kiln::infer::ChatSession, prompt: Option<String>) -> Result<()> {
    use std::io::{BufRead, Write};
    let mut print = |piece: &str| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
        true
    };
    if let Some(p) = prompt {
        let r = chat.say(&p, &mut print)?;
        println!();
        eprintln!(
            "[{} prompt tokens in {:.2}s; {} tokens at {:.1} tokens/s; {}]",
            r.stats.prompt_tokens,
            r.stats.prompt_seconds,
            r.stats.generated_tokens,
            r.stats.generated_tokens as f64 / r.stats.decode_seconds.max(1e-9),
            r.stats.finish_reason
        );
        return Ok(());
    }
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprintln!("type a message; /reset clears the conversation, /exit quits");
    }
    let stdin = std::io::stdin();
    loop {
        if tty {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                chat.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        let r = chat.say(line, &mut print)?;
        println!();
        if r.stats.finish_reason == "length" {
            eprintln!(
                "(stopped at --max-new-tokens {})",
                chat.settings.max_new_tokens
            );
        }
    }
    Ok(())
}

/// The model to chat with: a GGUF file as it is, or the config's model with the adapter from
/// `--lora-model-dir` (else `lora_model_dir`, else the train stage's).
fn chat_model(
    ws: &Workspace,
    gguf: Option<&Path>,
    lora_model_dir: Option<PathBuf>,
) -> Result<(Engine, TextTokenizer, String)> {
    let lora_model_dir = lora_model_dir.or_else(|| ws.settings.lora_model_dir.clone());
    Ok(match gguf {
        Some(p) => Workspace::load_gguf_chat_model(p)?,
        None => ws.load_chat_model(lora_model_dir.as_deref())?,
    })
}

pub fn inference(mut a: InferenceArgs) -> Result<()> {
    if let Some(b) = &a.base_model {
        a.common.set.push(format!("base_model={b}"));
    }
    let ws = open_single(&a.common)?;
    let (model, tok, what) = chat_model(&ws, a.gguf.as_deref(), a.lora_model_dir)?;
    eprintln!("loaded {what}");
    let template = kiln::plan::configured_template(&ws.settings.chat_template);
    let mut chat = kiln::infer::ChatSession::new(model, tok, template, a.raw, a.gen.settings())
        .map_err(anyhow::Error::from)?;
    chat.set_template_kwargs(&ws.settings.chat_template_kwargs);
    chat.system = a
        .system
        .or_else(|| ws.settings.default_system_message.clone());
    chat_loop(&mut chat, a.prompt)
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let idle_timeout = std::time::Duration::try_from_secs_f64(a.idle_timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--idle-timeout must be a positive number of seconds"))?;
    let ws = open_single(&a.common)?;
    let (model, tok, what) = chat_model(&ws, a.gguf.as_deref(), a.lora_model_dir)?;
    let sv = &ws.settings.serve;
    let defaults = kiln::serve::default_settings(
        a.max_new_tokens.unwrap_or(sv.max_new_tokens as usize),
        a.temperature.unwrap_or(sv.temperature),
    );
    let template = kiln::plan::configured_template(&ws.settings.chat_template);
    let mut chat = kiln::infer::ChatSession::new(model, tok, template, false, defaults.clone())
        .map_err(anyhow::Error::from)?;
    chat.set_template_kwargs(&ws.settings.chat_template_kwargs);
    chat.system = ws.settings.default_system_message.clone();
    let model_name = ws
        .output_dir()
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "kiln".into());
    let opts = kiln::serve::ServeOptions {
        host: a.host.unwrap_or_else(|| sv.host.clone()),
        port: a.port.unwrap_or(sv.port),
        max_body_bytes: a.max_body_bytes,
        queue: a.queue.max(1),
        max_connections: a.max_connections.max(1),
        idle_timeout,
        model_name,
        title: sv.title.clone(),
        defaults,
    };
    kiln::serve::serve(chat, opts, |addr| {
        eprintln!("loaded {what}");
        println!("serving on http://{addr}/  (OpenAI API at http://{addr}/v1)");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}
