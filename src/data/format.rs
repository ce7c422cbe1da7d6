//! Prompt formats: one record -> the text the model sees and the byte spans that carry loss.
//! Masks for chat come from rendering the real template turn by turn and mapping each turn's
//! content to its span; no regex surgery on templates.

use crate::config::{DataFormat, TrainOnEos};
use crate::text::template::{ChatTemplate, Message};
use serde_json::Value;

/// A formatted sample: text plus trained byte spans.
#[derive(Debug, Clone, PartialEq)]
pub struct Formatted {
    pub text: String,
    /// Byte ranges of `text` whose tokens are trained.
    pub trained: Vec<(usize, usize)>,
    /// Let the tokenizer add its own special tokens (bos) around the text.
    pub add_special_tokens: bool,
    /// Append the tokenizer's eos token; `Some(trained)`.
    pub append_eos: Option<bool>,
}

const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n";
const ALPACA_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n";

/// Everything a format needs besides the record.
pub struct FormatCtx<'a> {
    pub template: Option<&'a ChatTemplate>,
    pub eos_token: Option<&'a str>,
    pub eot_tokens: &'a [String],
    pub default_system_message: Option<&'a str>,
}

fn field_str(rec: &Value, field: &str) -> Result<Option<String>, String> {
    match rec.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(_) => Err(format!("field `{field}` must be a string")),
    }
}

fn required(rec: &Value, field: &str) -> Result<String, String> {
    field_str(rec, field)?.ok_or_else(|| {
        let have: Vec<String> = rec
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        format!(
            "missing field `{field}` (the record has: {})",
            if have.is_empty() {
                "no fields".to_string()
            } else {
                have.join(", ")
            }
        )
    })
}

pub fn format_record(
    fmt: &DataFormat,
    rec: &Value,
    ctx: &FormatCtx<'_>,
) -> Result<Formatted, String> {
    if !rec.is_object() {
        return Err("expected a JSON object".into());
    }
    match fmt {
        DataFormat::Alpaca {
            field_instruction,
            field_input,
            field_output,
            field_system,
        } => {
            let instruction = required(rec, field_instruction)?;
            let input = field_str(rec, field_input)?.filter(|s| !s.trim().is_empty());
            let output = required(rec, field_output)?;
            let system = field_str(rec, field_system)?;
            let mut text = String::new();
            match (&system, &input) {
                (Some(sys), _) => {
                    text.push_str(sys);
                    text.push_str("\n\n");
                }
                (None, Some(_)) => text.push_str(ALPACA_WITH_INPUT),
                (None, None) => text.push_str(ALPACA_NO_INPUT),
            }
            text.push_str("### Instruction:\n");
            text.push_str(&instruction);
            if let Some(inp) = &input {
                text.push_str("\n\n### Input:\n");
                text.push_str(inp);
            }
            text.push_str("\n\n### Response:\n");
            let start = text.len();
            text.push_str(&output);
            let end = text.len();
            Ok(Formatted {
                text,
                trained: vec![(start, end)],
                add_special_tokens: true,
                append_eos: Some(true),
            })
        }
        DataFormat::Completion { field } => {
            let text = required(rec, field)?;
            let n = text.len();
            Ok(Formatted {
                text,
                trained: vec![(0, n)],
                add_special_tokens: true,
                append_eos: Some(true),
            })
        }
        DataFormat::InputOutput { field } => {
            let segs = rec.get(field).and_then(|v| v.as_array()).ok_or_else(|| {
                format!("missing field `{field}` (a list of {{text, label}} segments)")
            })?;
            let mut text = String::new();
            let mut trained = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                let t = s
                    .get("text")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| format!("`{field}[{i}]` has no string `text`"))?;
                let label = match s.get("label") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(format!("`{field}[{i}].label` must be true or false")),
                };
                let start = text.len();
                text.push_str(t);
                if label && text.len() > start {
                    trained.push((start, text.len()));
                }
            }
            Ok(Formatted {
                text,
                trained,
                add_special_tokens: false,
                append_eos: None,
            })
        }
        DataFormat::ChatTemplate {
            roles_to_train,
            train_on_eos,
            ..
        } => {
            let template = ctx
                .template
                .ok_or_else(|| "no chat template: the tokenizer has none and the config sets none; set `chat_template: chatml` (or another)".to_string())?;
            let mut messages = chat_messages(fmt, rec)?;
            if let Some(sys) = ctx.default_system_message {
                if messages[0].role != "system" {
                    messages.insert(
                        0,
                        Message {
                            role: "system".into(),
                            content: sys.to_string(),
                        },
                    );
                }
            }
            render_chat(template, &messages, roles_to_train, *train_on_eos, ctx)
        }
    }
}

/// Checks one record against the format without a tokenizer or template (`kiln validate`): the
/// fields every format needs, and for chat every message's role and content. The same parsing
/// the tokenize stage uses, so what passes here formats there.
pub fn check_record(fmt: &DataFormat, rec: &Value) -> Result<(), String> {
    if !rec.is_object() {
        return Err("expected a JSON object".into());
    }
    match fmt {
        DataFormat::ChatTemplate { .. } => chat_messages(fmt, rec).map(|_| ()),
        _ => {
            let ctx = FormatCtx {
                template: None,
                eos_token: None,
                eot_tokens: &[],
                default_system_message: None,
            };
            format_record(fmt, rec, &ctx).map(|_| ())
        }
    }
}

/// The conversation of a chat record, roles mapped to canonical names. A message's content must
/// be a string: `null` (or missing) is refused, since Python's Jinja renders it as the text
/// "None" and the turn would train on that; lists of content parts (images, tool results) are not
/// supported yet.
fn chat_messages(fmt: &DataFormat, rec: &Value) -> Result<Vec<Message>, String> {
    let DataFormat::ChatTemplate {
        field_messages,
        role_field,
        content_field,
        roles,
        drop_system_message,
        ..
    } = fmt
    else {
        return Err("not a chat format".into());
    };
    let raw = rec
        .get(field_messages)
        .and_then(|v| v.as_array())
        .ok_or_else(|| format!("missing field `{field_messages}` (a list of messages)"))?;
    let mut messages = Vec::new();
    for (i, m) in raw.iter().enumerate() {
        let at = format!("`{field_messages}[{i}]`");
        if !m.is_object() {
            return Err(format!("{at} is {}, not a message object", json_kind(m)));
        }
        let role_src = match m.get(role_field) {
            Some(Value::String(s)) => s.as_str(),
            None => return Err(format!("{at} has no `{role_field}`")),
            Some(v) => {
                return Err(format!(
                    "{at}.{role_field} is {}, not a string",
                    json_kind(v)
                ))
            }
        };
        let role = roles
            .iter()
            .find(|(k, _)| k == role_src)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("{at}: unknown role `{role_src}` (map it with `roles:`)"))?;
        let content = match m.get(content_field) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(_)) => {
                return Err(format!(
                    "{at}.{content_field} is a list of content parts; not supported yet: give each message its text as one string"
                ))
            }
            Some(Value::Null) | None => {
                let tool = m.get("tool_calls").is_some_and(|t| !t.is_null());
                return Err(format!(
                    "{at}.{content_field} is {}{}; give every message a string (use \"\" for an empty turn)",
                    if m.get(content_field).is_some() { "null" } else { "missing" },
                    if tool { " (tool calls are not supported yet)" } else { "" }
                ));
            }
            Some(v) => {
                return Err(format!(
                    "{at}.{content_field} is {}, not a string",
                    json_kind(v)
                ))
            }
        };
        if *drop_system_message && role == "system" {
            continue;
        }
        messages.push(Message { role, content });
    }
    if messages.is_empty() {
        return Err(format!("`{field_messages}` is empty"));
    }
    Ok(messages)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Renders the conversation and finds each message's span: from the template's own
/// `{% generation %}` blocks when it has them; else turn by turn (render the first i+1
/// messages; the growth over the first i is turn i), falling back to an in-order search of the
/// full render for templates whose prefixes are not stable or that refuse a partial
/// conversation.
fn render_chat(
    template: &ChatTemplate,
    messages: &[Message],
    roles_to_train: &[String],
    train_on_eos: TrainOnEos,
    ctx: &FormatCtx<'_>,
) -> Result<Formatted, String> {
    let (full, generation) = template
        .render_spans(messages, false)
        .map_err(|e| e.to_string())?;
    // A template with `{% generation %}` blocks says itself which text is trained.
    if template.has_generation_blocks() {
        return Ok(Formatted {
            text: full,
            trained: generation,
            add_special_tokens: false,
            append_eos: None,
        });
    }
    let mut trained = Vec::new();
    let mut cursor = 0usize;
    let mut prev_len = 0usize;
    let last_trainable = messages
        .iter()
        .rposition(|m| roles_to_train.contains(&m.role));
    for (i, m) in messages.iter().enumerate() {
        // Where this turn starts: after the previous turn when the template is prefix-stable.
        // A template may refuse a partial conversation ("No user query found") or fold the
        // system message into the first user turn: then only the whole render counts, and the
        // message is searched for in order.
        let prefix = template.render(&messages[..=i], false).ok();
        let turn_start = match prefix {
            Some(p) if full.starts_with(&p) && p.len() >= prev_len => {
                let s = prev_len.max(cursor);
                prev_len = p.len();
                s
            }
            _ => cursor,
        };
        if m.content.is_empty() {
            continue;
        }
        let needle = if full[turn_start..].contains(&m.content) {
            m.content.as_str()
        } else {
            m.content.trim()
        };
        let Some(off) = full[turn_start..].find(needle) else {
            return Err(format!(
                "the chat template did not render message {i} ({}) verbatim; kiln cannot tell which tokens belong to it",
                m.role
            ));
        };
        let start = turn_start + off;
        let mut end = start + needle.len();
        cursor = end;
        if roles_to_train.contains(&m.role) {
            let eos_here = match train_on_eos {
                TrainOnEos::All | TrainOnEos::Turn => true,
                TrainOnEos::Last => Some(i) == last_trainable,
                TrainOnEos::None => false,
            };
            if eos_here {
                let rest = &full[end..];
                let marker = ctx
                    .eos_token
                    .into_iter()
                    .chain(ctx.eot_tokens.iter().map(|s| s.as_str()))
                    .filter(|t| !t.is_empty())
                    .find(|t| rest.starts_with(t));
                if let Some(t) = marker {
                    end += t.len();
                    cursor = end;
                }
            }
            trained.push((start, end));
        }
    }
    Ok(Formatted {
        text: full,
        trained,
        add_special_tokens: false,
        append_eos: None,
    })
}
