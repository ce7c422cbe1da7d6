//! Prompt formats: one record -> the text the model sees and the byte spans that carry loss.
//! Masks for chat come from rendering the real template turn by turn and mapping each turn's
//! content to its span; no regex surgery on templates.

use crate::config::pref::{PairFields, PairMarkup};
use crate::config::{DataFormat, PairStyle, TrainOnEos};
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
        DataFormat::Preference { .. } | DataFormat::Unpaired { .. } => {
            Err("a preference record is two sequences (see format_pair)".into())
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
        DataFormat::Preference { style } => pair_texts(style, rec, None).map(|_| ()),
        DataFormat::Unpaired { style } => unpaired_texts(style, rec).map(|_| ()),
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
        let role = canonical_role(roles, role_src, &at)?;
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

/// A message's role by the dataset's role map (`roles:` over the usual aliases).
fn canonical_role(roles: &[(String, String)], role: &str, at: &str) -> Result<String, String> {
    roles
        .iter()
        .find(|(k, _)| k == role)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| format!("{at}: unknown role `{role}` (map it with `roles:`)"))
}

/// The content of message `i` of the conversation in `field` (Axolotl's `chosen[1].content`).
fn turn_content(rec: &Value, field: &str, i: usize) -> Result<String, String> {
    rec.get(field)
        .and_then(|v| v.as_array())
        .and_then(|a| a.get(i))
        .and_then(|m| m.get("content"))
        .and_then(|c| c.as_str())
        .map(String::from)
        .ok_or_else(|| {
            format!("`{field}[{i}].content` is missing (`{field}` must be a [user, assistant] conversation)")
        })
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

/// A preference record's prompt, chosen and rejected text, as Axolotl's preference types make
/// them (data passed to TRL as plain strings).
pub fn pair_texts(
    style: &PairStyle,
    rec: &Value,
    template: Option<&ChatTemplate>,
) -> Result<(String, String, String), String> {
    if !rec.is_object() {
        return Err("expected a JSON object".into());
    }
    match style {
        PairStyle::Raw => Ok((
            required(rec, "prompt")?,
            required(rec, "chosen")?,
            required(rec, "rejected")?,
        )),
        PairStyle::Fixed { markup, fields } => fixed_pair(*markup, *fields, rec),
        PairStyle::OrpoChat { .. } => {
            let turn = |field: &str| turn_content(rec, field, 1);
            let system = Message {
                role: "system".into(),
                content: field_str(rec, "system")?.unwrap_or_default(),
            };
            let user = Message {
                role: "user".into(),
                content: required(rec, "prompt")?,
            };
            let (chosen, rejected) = (turn("chosen")?, turn("rejected")?);
            let Some(template) = template else {
                return Ok((String::new(), chosen, rejected));
            };
            let prompt = template
                .render(&[system.clone(), user.clone()], true)
                .map_err(|e| e.to_string())?;
            let completion = |content: String| -> Result<String, String> {
                let all = template
                    .render(
                        &[
                            system.clone(),
                            user.clone(),
                            Message {
                                role: "assistant".into(),
                                content,
                            },
                        ],
                        false,
                    )
                    .map_err(|e| e.to_string())?;
                all.strip_prefix(prompt.as_str())
                    .map(String::from)
                    .ok_or_else(|| "the chat template renders the prompt differently before an answer; kiln cannot tell where the completion starts".to_string())
            };
            Ok((prompt.clone(), completion(chosen)?, completion(rejected)?))
        }
        PairStyle::ChatTemplate {
            field_messages,
            field_chosen,
            field_rejected,
            role_field,
            content_field,
            roles,
            argilla_chat,
            ..
        } => {
            let msg = |v: &Value, at: &str, default_role: &str| -> Result<Message, String> {
                pair_message(v, at, default_role, role_field, content_field, roles)
            };
            let last = |field: &str| -> Result<(Vec<Message>, Message), String> {
                let v = rec
                    .get(field)
                    .filter(|v| !v.is_null())
                    .ok_or_else(|| format!("missing field `{field}`"))?;
                match v {
                    Value::Array(a) if !a.is_empty() => {
                        let all = a
                            .iter()
                            .enumerate()
                            .map(|(i, m)| msg(m, &format!("`{field}[{i}]`"), "assistant"))
                            .collect::<Result<Vec<_>, _>>()?;
                        let (end, rest) = all.split_last().ok_or("empty")?;
                        Ok((rest.to_vec(), end.clone()))
                    }
                    Value::Array(_) => Err(format!("`{field}` is an empty list")),
                    other => Ok((vec![], msg(other, &format!("`{field}`"), "assistant")?)),
                }
            };
            let (history, chosen) = last(field_chosen)?;
            let (_, rejected) = last(field_rejected)?;
            let messages = if *argilla_chat {
                if history.is_empty() {
                    return Err(format!(
                        "`{field_chosen}` must be a conversation: the prompt's messages, then the completion"
                    ));
                }
                history
            } else {
                match rec.get(field_messages) {
                    Some(Value::String(s)) => vec![Message {
                        role: "user".into(),
                        content: s.clone(),
                    }],
                    Some(Value::Array(a)) if !a.is_empty() => a
                        .iter()
                        .enumerate()
                        .map(|(i, m)| msg(m, &format!("`{field_messages}[{i}]`"), "user"))
                        .collect::<Result<Vec<_>, _>>()?,
                    Some(Value::Array(_)) => return Err(format!("`{field_messages}` is empty")),
                    _ => {
                        return Err(format!(
                            "missing field `{field_messages}` (the prompt: a list of messages, or a string)"
                        ))
                    }
                }
            };
            let Some(template) = template else {
                // `kiln validate`: the fields parse; rendering needs the tokenizer's template.
                return Ok((String::new(), chosen.content, rejected.content));
            };
            let prompt = template
                .render(&messages, true)
                .map_err(|e| e.to_string())?;
            // Each completion as the template renders an assistant turn after a user turn, from
            // the completion's own text on, trailing whitespace removed (Axolotl's strip).
            let completion = |m: &Message| -> Result<String, String> {
                let dummy = Message {
                    role: "user".into(),
                    content: "[[dummy_message]]".into(),
                };
                let text = template
                    .render(&[dummy, m.clone()], false)
                    .map_err(|e| e.to_string())?;
                let from = text.find(&m.content).ok_or_else(|| {
                    "the chat template did not render the completion verbatim".to_string()
                })?;
                Ok(text[from..].trim_end().to_string())
            };
            Ok((prompt, completion(&chosen)?, completion(&rejected)?))
        }
    }
}

/// A message of a preference record: an object with role and content, or a string (the
/// `default_role`'s message), roles mapped to canonical names.
fn pair_message(
    v: &Value,
    at: &str,
    default_role: &str,
    role_field: &str,
    content_field: &str,
    roles: &[(String, String)],
) -> Result<Message, String> {
    match v {
        Value::String(s) => Ok(Message {
            role: default_role.into(),
            content: s.clone(),
        }),
        Value::Object(o) => {
            let role_src = match o.get(role_field) {
                Some(Value::String(s)) => s.as_str(),
                None => default_role,
                Some(v) => {
                    return Err(format!(
                        "{at}.{role_field} is {}, not a string",
                        json_kind(v)
                    ))
                }
            };
            let role = canonical_role(roles, role_src, at)?;
            match o.get(content_field) {
                Some(Value::String(s)) => Ok(Message {
                    role,
                    content: s.clone(),
                }),
                Some(v) => Err(format!(
                    "{at}.{content_field} is {}, not a string",
                    json_kind(v)
                )),
                None => Err(format!("{at} has no `{content_field}`")),
            }
        }
        other => Err(format!("{at} is {}, not a message", json_kind(other))),
    }
}

/// Axolotl's `chatml.*` / `llama3.*` preference types: the prompt in the markup's user turn
/// (after a system turn when `system` is set) and the assistant header; each completion ends
/// with the markup's end-of-turn.
fn fixed_pair(
    markup: PairMarkup,
    fields: PairFields,
    rec: &Value,
) -> Result<(String, String, String), String> {
    let first = |keys: &[&str]| -> Result<String, String> {
        let k = keys
            .iter()
            .find(|k| rec.get(**k).is_some())
            .copied()
            .unwrap_or(keys[keys.len() - 1]);
        required(rec, k)
    };
    let turn = |field: &str, i: usize| turn_content(rec, field, i);
    let (prompt, chosen, rejected, system) = match fields {
        PairFields::Argilla => (
            first(&["prompt", "input", "question", "instruction"])?,
            first(&["chosen", "chosen_response"])?,
            first(&["rejected", "rejected_response"])?,
            true,
        ),
        PairFields::ArgillaChat => (
            turn("chosen", 0)?,
            turn("chosen", 1)?,
            turn("rejected", 1)?,
            false,
        ),
        PairFields::Icr => (
            required(rec, "input")?,
            required(rec, "chosen")?,
            required(rec, "rejected")?,
            true,
        ),
        PairFields::Intel => (
            required(rec, "question")?,
            required(rec, "chosen")?,
            required(rec, "rejected")?,
            true,
        ),
        PairFields::PromptPairs => (
            required(rec, "prompt")?,
            required(rec, "chosen")?,
            required(rec, "rejected")?,
            true,
        ),
        PairFields::Ultra => (
            required(rec, "prompt")?,
            turn("chosen", 1)?,
            turn("rejected", 1)?,
            true,
        ),
    };
    let system = if system {
        field_str(rec, "system")?.filter(|s| !s.is_empty())
    } else {
        None
    };
    let turn_end = fixed_turn_end(markup);
    Ok((
        fixed_prompt(markup, system.as_deref(), &prompt),
        format!("{chosen}{turn_end}"),
        format!("{rejected}{turn_end}"),
    ))
}

/// The end-of-turn text of Axolotl's fixed preference markup.
fn fixed_turn_end(markup: PairMarkup) -> &'static str {
    match markup {
        PairMarkup::Chatml => "<|im_end|>",
        PairMarkup::Llama3 => "<|eot_id|>",
    }
}

/// Axolotl's fixed preference prompt: a system turn when set, the user turn, the assistant
/// header.
fn fixed_prompt(markup: PairMarkup, system: Option<&str>, prompt: &str) -> String {
    let (sys_open, user_open, assistant) = match markup {
        PairMarkup::Chatml => (
            "<|im_start|>system\n",
            "<|im_start|>user\n",
            "\n<|im_start|>assistant\n",
        ),
        PairMarkup::Llama3 => (
            "<|start_header_id|>system<|end_header_id|>\n\n",
            "<|start_header_id|>user<|end_header_id|>\n\n",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
    };
    let turn_end = fixed_turn_end(markup);
    let mut p = String::new();
    if let Some(sys) = system {
        p.push_str(sys_open);
        p.push_str(sys);
        p.push_str(turn_end);
        if markup == PairMarkup::Chatml {
            p.push('\n');
        }
    }
    p.push_str(user_open);
    p.push_str(prompt);
    p.push_str(turn_end);
    p.push_str(assistant);
    p
}

/// A KTO record's prompt, completion and label (true = desirable), as Axolotl's KTO types
/// make them: no `type` = `prompt`, `completion`, `label` as they are; `chatml.*` / `llama3.*`
/// the fixed markup around `instruction` (argilla), `question` (intel) or `prompt`
/// (prompt_pairs, ultra), or the [user, assistant] conversation in `completion`
/// (argilla_chat); the label in `label` (a boolean, or 0/1).
pub fn unpaired_texts(style: &PairStyle, rec: &Value) -> Result<(String, String, bool), String> {
    if !rec.is_object() {
        return Err("expected a JSON object".into());
    }
    let label = match rec.get("label") {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) if n.as_f64() == Some(1.0) => true,
        Some(Value::Number(n)) if n.as_f64() == Some(0.0) => false,
        Some(v) => {
            return Err(format!(
                "field `label` is {}, not true or false",
                json_kind(v)
            ))
        }
        None => return Err(
            "missing field `label` (true for a desirable completion, false for an undesirable one)"
                .into(),
        ),
    };
    match style {
        PairStyle::Fixed { markup, fields } => {
            let turn = |i: usize| turn_content(rec, "completion", i);
            let (prompt, completion, system) = match fields {
                PairFields::ArgillaChat => (turn(0)?, turn(1)?, None),
                other => {
                    let key = match other {
                        PairFields::Argilla => "instruction",
                        PairFields::Intel => "question",
                        PairFields::Icr => "input",
                        _ => "prompt",
                    };
                    let system = field_str(rec, "system")?.filter(|s| !s.is_empty());
                    (required(rec, key)?, required(rec, "completion")?, system)
                }
            };
            Ok((
                fixed_prompt(*markup, system.as_deref(), &prompt),
                format!("{completion}{}", fixed_turn_end(*markup)),
                label,
            ))
        }
        _ => Ok((
            required(rec, "prompt")?,
            required(rec, "completion")?,
            label,
        )),
    }
}

/// A prompt + completion sequence of preference data, only the completion trained: the
/// tokenizer's special tokens around it and eos appended unless the text ends with it (TRL's
/// rule for string data), or, `as_rendered`, the text as it is.
pub fn completion_seq(
    prompt: &str,
    completion: &str,
    eos: Option<&str>,
    as_rendered: bool,
) -> Formatted {
    let text = format!("{prompt}{completion}");
    let eos_in_text = eos.is_some_and(|e| !e.is_empty() && text.ends_with(e));
    Formatted {
        trained: vec![(prompt.len(), text.len())],
        text,
        add_special_tokens: !as_rendered,
        append_eos: (!eos_in_text && !as_rendered).then_some(true),
    }
}

/// A preference record as its two training sequences, chosen then rejected: the prompt then the
/// completion, only the completion trained. As TRL 1.x's DPO/ORPO/CPO trainers do with string
/// data: the tokenizer's special tokens around the text (its bos), and eos appended (trained)
/// unless the completion already ends with the eos text; Axolotl's ORPO chat strategy
/// (`chat_template.argilla`) tokenizes the rendered conversation as it is.
pub fn format_pair(
    style: &PairStyle,
    rec: &Value,
    ctx: &FormatCtx<'_>,
) -> Result<[Formatted; 2], String> {
    let (prompt, chosen, rejected) = pair_texts(style, rec, ctx.template)?;
    // Axolotl's ORPO chat strategy tokenizes the rendered text as it is.
    let as_rendered = matches!(style, PairStyle::OrpoChat { .. });
    Ok([
        completion_seq(&prompt, &chosen, ctx.eos_token, as_rendered),
        completion_seq(&prompt, &rejected, ctx.eos_token, as_rendered),
    ])
}
