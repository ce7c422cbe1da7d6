//! A chat session over a loaded model: the chat template renders the history, the KV cache is
//! reused across turns when the new prompt extends what it holds, and tokens stream out as text.

use crate::model::engine::{Engine, EngineCache};
use crate::model::generate::{generate, stop_tokens, GenStats, Sampler, SamplingOptions};
use crate::model::ModelError;
use crate::text::template::{ChatTemplate, Message};
use crate::text::{TextError, TextTokenizer};

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("{0}")]
    Invalid(String),
}

/// Generation settings shared by `kiln inference`, `kiln serve` and the evaluate stage.
#[derive(Debug, Clone)]
pub struct GenSettings {
    pub sampling: SamplingOptions,
    pub max_new_tokens: usize,
}

pub struct ChatSession {
    pub model: Engine,
    pub tok: TextTokenizer,
    /// None: prompts are fed as raw text (base models without a template).
    template: Option<ChatTemplate>,
    pub system: Option<String>,
    pub history: Vec<Message>,
    pub settings: GenSettings,
    cache: EngineCache,
    cached_ids: Vec<u32>,
    stop: Vec<u32>,
    turns: u64,
}

/// One finished reply.
pub struct Reply {
    pub text: String,
    pub stats: GenStats,
}

impl ChatSession {
    /// Renders with the config's `chat_template_kwargs` too, as training did.
    pub fn set_template_kwargs(
        &mut self,
        kwargs: &std::collections::BTreeMap<String, serde_json::Value>,
    ) {
        if let Some(t) = self.template.take() {
            self.template = Some(t.with_kwargs(kwargs));
        }
    }

    /// `template`: Jinja source; None = the tokenizer's own; `raw` = no template at all.
    pub fn new(
        model: Engine,
        tok: TextTokenizer,
        template: Option<String>,
        raw: bool,
        settings: GenSettings,
    ) -> Result<Self, InferError> {
        let template = if raw {
            None
        } else {
            let src = template.or_else(|| tok.chat_template.clone()).ok_or_else(|| {
                InferError::Invalid(
                    "the model has no chat template: set `chat_template:` in the config (e.g. chatml), or use --raw to continue plain text"
                        .into(),
                )
            })?;
            Some(ChatTemplate::new(
                &src,
                tok.bos_token.as_deref(),
                tok.eos_token.as_deref(),
            )?)
        };
        let stop = stop_tokens(&tok);
        let cache = model.new_cache();
        Ok(Self {
            model,
            tok,
            template,
            system: None,
            history: Vec::new(),
            settings,
            cache,
            cached_ids: Vec::new(),
            stop,
            turns: 0,
        })
    }

    pub fn reset(&mut self) {
        self.history.clear();
        self.cache.reset();
        self.cached_ids.clear();
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, InferError> {
        Ok(self
            .tok
            .tokenizer
            .encode(text, special)
            .map_err(|e| InferError::Tokenize(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// The prompt ids for the history plus a generation prompt.
    pub fn prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>, InferError> {
        match &self.template {
            Some(t) => {
                let mut all = Vec::new();
                if let Some(s) = &self.system {
                    all.push(Message {
                        role: "system".into(),
                        content: s.clone(),
                    });
                }
                all.extend_from_slice(messages);
                let text = t.render(&all, true)?;
                self.encode(&text, false)
            }
            None => {
                let text: String = messages.iter().map(|m| m.content.as_str()).collect();
                self.encode(&text, true)
            }
        }
    }

    /// Answers a list of messages without touching the session history (the server's path).
    pub fn complete(
        &mut self,
        messages: &[Message],
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Reply, InferError> {
        let ids = self.prompt_ids(messages)?;
        self.run(ids, on_text)
    }

    /// Adds a user turn, generates the assistant's answer and keeps both in the history.
    pub fn say(
        &mut self,
        user: &str,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Reply, InferError> {
        if self.template.is_none() {
            // Raw mode continues the text; no turns.
            let ids = self.encode(user, true)?;
            self.cache.reset();
            self.cached_ids.clear();
            return self.run(ids, on_text);
        }
        self.history.push(Message {
            role: "user".into(),
            content: user.to_string(),
        });
        let ids = self.prompt_ids(&self.history.clone())?;
        let r = self.run(ids, on_text);
        match &r {
            Ok(reply) => self.history.push(Message {
                role: "assistant".into(),
                content: reply.text.clone(),
            }),
            Err(_) => {
                self.history.pop();
            }
        }
        r
    }

    fn run(
        &mut self,
        ids: Vec<u32>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Reply, InferError> {
        let context = self.model.cfg.max_position_embeddings;
        if ids.len() > context {
            return Err(InferError::Invalid(format!(
                "the prompt is {} tokens, over the model's context of {context} tokens (max_position_embeddings); shorten the conversation",
                ids.len()
            )));
        }
        // Reuse the cache when the new prompt extends what it holds; otherwise start over.
        let reuse = !self.cached_ids.is_empty()
            && ids.len() > self.cached_ids.len()
            && ids.starts_with(&self.cached_ids);
        let feed: Vec<u32> = if reuse {
            ids[self.cached_ids.len()..].to_vec()
        } else {
            self.cache.reset();
            ids.clone()
        };
        let mut sampler = Sampler::new(SamplingOptions {
            seed: self.settings.sampling.seed.wrapping_add(self.turns),
            ..self.settings.sampling.clone()
        });
        self.turns += 1;
        let mut stream = crate::model::generate::TextStream::new(&self.tok.tokenizer);
        let mut out_ids = Vec::new();
        let res = generate(
            &self.model,
            &mut self.cache,
            &feed,
            self.settings.max_new_tokens,
            &self.stop,
            &mut sampler,
            &mut |id| {
                out_ids.push(id);
                match stream.push(id) {
                    Some(piece) => on_text(&piece),
                    None => true,
                }
            },
        );
        let stats = match res {
            Ok(s) => s,
            Err(e) => {
                self.cache.reset();
                self.cached_ids.clear();
                return Err(e.into());
            }
        };
        let text = stream.text();
        // What the cache now holds: the prompt, the generated tokens it was fed, and the stop
        // token when there was one.
        self.cached_ids = ids;
        self.cached_ids.extend_from_slice(&out_ids);
        self.cached_ids.extend(stats.stop_token);
        self.cached_ids.truncate(self.cache.len);
        Ok(Reply { text, stats })
    }
}
