//! Chat templates: real Hugging Face Jinja templates rendered with minijinja (HF's settings:
//! trim_blocks, lstrip_blocks, Python string methods, `raise_exception`).

use super::TextError;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

/// Built-in templates by Axolotl's names, written for kiln.
pub fn builtin(name: &str) -> Option<&'static str> {
    Some(match name {
        "chatml" => "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "llama3" => "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        "mistral_v1" => "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}",
        "gemma" => "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        "phi_3" => "{% for message in messages %}{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}",
        _ => return None,
    })
}

/// One message as templates see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The template marks trained spans with `{% generation %}` blocks.
    generation: bool,
    /// Extra variables the template sees (Axolotl's `chat_template_kwargs`, e.g.
    /// `enable_thinking`).
    kwargs: minijinja::Value,
}

/// Variables kiln itself gives every template: `chat_template_kwargs` may not set them.
pub const RESERVED_VARIABLES: &[&str] = &[
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

/// What a `{% generation %}` block's start and end render as, removed after rendering (Unicode
/// private-use characters; a conversation that contains them is refused).
const GEN_START: char = '\u{E000}';
const GEN_END: char = '\u{E001}';

/// `source` with each `{% generation %}` / `{% endgeneration %}` tag (TRL's assistant-mask
/// marker, a block tag in Hugging Face's Jinja setup) replaced by `{% if true %}{{ marker }}{%
/// endif %}`: a pair of block tags, so trim_blocks, lstrip_blocks and `-` whitespace control act
/// on it as on the original tag; the marker is a variable the renderer sets. Returns whether any
/// tag was found.
fn expand_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        let Some(close) = tag.find("%}") else {
            out.push_str(tag);
            return (out, found);
        };
        let inner = &tag[2..close];
        let (left, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, right) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        let marker = match body.trim() {
            "generation" => Some("__kiln_generation_start"),
            "endgeneration" => Some("__kiln_generation_end"),
            _ => None,
        };
        match marker {
            Some(m) => {
                found = true;
                out.push_str(&format!(
                    "{{%{left} if true %}}{{{{ {m} }}}}{{% endif {right}%}}"
                ));
            }
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    (out, found)
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// The date templates see through `strftime_now`: today's date would make tokenization depend
/// on the clock, which the cache key cannot see.
pub const TEMPLATE_DATE: (i32, u32, u32) = (2024, 7, 26);

/// `strftime_now(fmt)`: [`TEMPLATE_DATE`] at midnight, formatted as Python's strftime would.
fn strftime_now(fmt: String) -> Result<String, Error> {
    use std::fmt::Write;
    let (y, m, d) = TEMPLATE_DATE;
    let when = chrono::NaiveDate::from_ymd_opt(y, m, d)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, "bad template date"))?;
    let mut out = String::new();
    write!(out, "{}", when.format(&fmt)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: `{fmt}` is not a date format"),
        )
    })?;
    Ok(out)
}

/// The environment every template is compiled in (Hugging Face's settings).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

/// Why `source` does not compile, if it does not: (line of the template, 1-based, when known;
/// what is wrong). `kiln validate` names the config key or file and line with it.
pub fn syntax_error(source: &str) -> Option<(Option<usize>, String)> {
    let mut env = environment();
    let e = env.add_template_owned("chat", source.to_string()).err()?;
    let what = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    Some((e.line(), what))
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, TextError> {
        let mut env = environment();
        let (expanded, generation) = expand_generation_tags(source);
        env.add_template_owned("chat", expanded)
            .map_err(|e| TextError::Template(format!("does not parse: {e:#}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or("").to_string(),
            eos_token: eos_token.unwrap_or("").to_string(),
            generation,
            kwargs: minijinja::Value::from(
                std::collections::BTreeMap::<String, minijinja::Value>::new(),
            ),
        })
    }

    /// The template with extra variables (`chat_template_kwargs`); names in
    /// [`RESERVED_VARIABLES`] are ignored (the config refuses them).
    pub fn with_kwargs(
        mut self,
        kwargs: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Self {
        let kept: std::collections::BTreeMap<&String, &serde_json::Value> = kwargs
            .iter()
            .filter(|(k, _)| !RESERVED_VARIABLES.contains(&k.as_str()))
            .collect();
        self.kwargs = minijinja::Value::from_serialize(&kept);
        self
    }

    /// Whether the template marks trained spans with `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.generation
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        Ok(self.render_spans(messages, add_generation_prompt)?.0)
    }

    /// The rendered text and the byte spans of its `{% generation %}` blocks (none when the
    /// template has none).
    pub fn render_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<(usize, usize)>), TextError> {
        if messages
            .iter()
            .any(|m| m.content.contains([GEN_START, GEN_END]))
        {
            return Err(TextError::Template(
                "a message contains U+E000 or U+E001, the characters kiln marks generation blocks with".into(),
            ));
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TextError::Template(e.to_string()))?;
        let raw = tmpl
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                __kiln_generation_start => GEN_START.to_string(),
                __kiln_generation_end => GEN_END.to_string(),
                ..self.kwargs.clone()
            })
            .map_err(|e| TextError::Template(format!("failed to render: {e:#}")))?;
        if !self.generation {
            return Ok((raw, Vec::new()));
        }
        let mut text = String::with_capacity(raw.len());
        let mut spans = Vec::new();
        let mut start = None;
        for ch in raw.chars() {
            match ch {
                GEN_START => start = Some(text.len()),
                GEN_END => {
                    if let Some(s) = start.take() {
                        if text.len() > s {
                            spans.push((s, text.len()));
                        }
                    }
                }
                c => text.push(c),
            }
        }
        Ok((text, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(builtin("chatml").unwrap(), None, None).unwrap();
        let out = t
            .render(
                &[Message {
                    role: "user".into(),
                    content: "Hi".into(),
                }],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn strftime_now_honours_its_format_on_the_fixed_date() {
        assert_eq!(strftime_now("%d %b %Y".into()).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime_now("%Y-%m-%d %A".into()).unwrap(),
            "2024-07-26 Friday"
        );
        assert!(strftime_now("%Q".into()).is_err());
    }

    #[test]
    fn generation_tags_become_spans() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{%- generation -%} {{ m.content }}!{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}",
            None,
            None,
        )
        .unwrap();
        assert!(t.has_generation_blocks());
        let msgs = [
            Message {
                role: "user".into(),
                content: "Hi".into(),
            },
            Message {
                role: "assistant".into(),
                content: "Yo".into(),
            },
        ];
        let (text, spans) = t.render_spans(&msgs, false).unwrap();
        // As Python's Jinja2 renders it (trim_blocks eats the newline after `{% endif %}`).
        assert_eq!(text, "user: Hiassistant: Yo!");
        assert_eq!(spans, vec![(19, 22)]);
        assert_eq!(t.render(&msgs, false).unwrap(), text);
        let bad = [Message {
            role: "user".into(),
            content: "\u{E000}".into(),
        }];
        assert!(t.render_spans(&bad, false).is_err());
    }

    #[test]
    fn python_methods_and_raise_work() {
        let src = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}{{ m.content.strip().upper() }}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let ok = t
            .render(
                &[Message {
                    role: "user".into(),
                    content: " hi ".into(),
                }],
                false,
            )
            .unwrap();
        assert_eq!(ok, "HI");
        let bad = t.render(
            &[Message {
                role: "robot".into(),
                content: "x".into(),
            }],
            false,
        );
        assert!(bad.unwrap_err().to_string().contains("bad role"));
    }
}
