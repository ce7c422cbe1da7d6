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
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> String {
    // Templates ask for today's date for system prompts; a fixed date keeps tokenization a pure
    // function of its inputs (the cache key cannot see the clock).
    let _ = fmt;
    "26 Jul 2024".to_string()
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
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TextError::Template(format!("does not parse: {e:#}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or("").to_string(),
            eos_token: eos_token.unwrap_or("").to_string(),
        })
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TextError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| TextError::Template(format!("failed to render: {e:#}")))
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
