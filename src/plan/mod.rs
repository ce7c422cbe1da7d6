//! Config -> DAG of stage specs (petgraph), and stage keys.
//!
//! A key hashes the stage kind, its implementation version, the canonical params it reads, its
//! resolved inputs (file digests, hub commits) and its upstream stages' output digests (or the
//! digest of just the files it reads from them). Nothing else decides what reruns.

pub mod checks;

use crate::cache::{FileHashCache, Manifest};
use crate::config::{Settings, TemplateChoice};
use crate::hash::KeyHasher;
use crate::stages::evaluate::{EvalModel, Evaluate, VAL_FILES};
use crate::stages::export::{Export, ExportFormat};
use crate::stages::fetch::{self, Inputs, ResolveError};
use crate::stages::merge::Merge;
use crate::stages::pack::Pack;
use crate::stages::tokenize::{ChatInputs, TemplateSource, Tokenize, TokenizeNeutral};
use crate::stages::train::{Train, TrainMethod, TrainNeutral};
use crate::stages::{AnyStage, StageKind, Staged};
use crate::text::template::builtin;
use crate::text::TOKENIZER_FILES;
use petgraph::graph::{DiGraph, NodeIndex};

/// An edge: which upstream stage, and which of its files this stage reads (None = all).
#[derive(Debug, Clone)]
pub struct Dep {
    pub stage: usize,
    pub files: Option<&'static [&'static str]>,
}

pub struct PlannedStage {
    pub name: String,
    pub stage: AnyStage,
    pub inputs: Inputs,
    pub deps: Vec<Dep>,
}

impl PlannedStage {
    pub fn kind(&self) -> StageKind {
        self.stage.kind()
    }
}

pub struct Plan {
    pub stages: Vec<PlannedStage>,
    pub graph: DiGraph<usize, ()>,
    /// Stage indices in dependency order.
    pub order: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("resolving {stage}: {source}")]
    Resolve {
        stage: String,
        #[source]
        source: ResolveError,
    },
    #[error("the stage graph has a cycle")]
    Cycle,
    #[error("no stage or stage kind named `{0}`{1}")]
    UnknownTarget(String, String),
    #[error("stage {stage}: {source}")]
    Key {
        stage: String,
        #[source]
        source: crate::hash::CanonError,
    },
}

/// Everything a stage key hashes, as one value: the stage kind and implementation version, the
/// canonical encoding of the stage's typed inputs, its resolved fetch inputs and the output
/// digests of what it reads upstream (in dependency order).
#[derive(serde::Serialize)]
struct StageKey<'a> {
    kind: StageKind,
    version: u32,
    #[serde(with = "serde_bytes_as_seq")]
    params: &'a [u8],
    inputs: Vec<(&'a str, &'a str)>,
    upstream: &'a [(String, String)],
}

/// Encodes pre-encoded canonical bytes as a byte string.
mod serde_bytes_as_seq {
    pub fn serialize<S: serde::Serializer>(b: &&[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }
}

/// The key format's name: part of every key, so a new encoding can never collide with an old one.
const KEY_FORMAT: &str = "kiln.stage/2";

/// The digest a dependent hashes for `dep`: all files, or only the selected ones.
pub fn dep_digest(m: &Manifest, dep: &Dep) -> String {
    match dep.files {
        None => m.digest.clone(),
        Some(sel) => m.digest_of_selected(sel),
    }
}

/// The key of a stage given its upstream digests (in `deps` order).
pub fn stage_key(s: &PlannedStage, upstream: &[(String, String)]) -> Result<String, PlanError> {
    let err = |source| PlanError::Key {
        stage: s.name.clone(),
        source,
    };
    let params = s.stage.key_bytes().map_err(err)?;
    let key = StageKey {
        kind: s.kind(),
        version: s.stage.version(),
        params: &params,
        inputs: s
            .inputs
            .iter()
            .map(|(id, i)| (id.as_str(), i.digest.as_str()))
            .collect(),
        upstream,
    };
    let mut h = KeyHasher::new();
    h.str(KEY_FORMAT).canonical(&key).map_err(err)?;
    Ok(h.finish())
}

/// The Jinja source of the template the config chose, None for the tokenizer's own.
pub fn configured_template(choice: &TemplateChoice) -> Option<String> {
    match template_source(choice) {
        TemplateSource::FromTokenizer => None,
        TemplateSource::Text(t) => Some(t),
    }
}

fn template_source(choice: &TemplateChoice) -> TemplateSource {
    match choice {
        TemplateChoice::TokenizerDefault => TemplateSource::FromTokenizer,
        TemplateChoice::Builtin(n) => {
            TemplateSource::Text(builtin(n).unwrap_or_default().to_string())
        }
        TemplateChoice::Jinja(j) => TemplateSource::Text(j.clone()),
    }
}

/// Compiles settings into the stage DAG, resolving fetch inputs (hashing local files through the
/// index's fast path; resolving hub revisions to commits). Stages are declared upstream-first.
pub fn build(s: &Settings, hashes: &FileHashCache<'_>) -> Result<Plan, PlanError> {
    let mut stages: Vec<PlannedStage> = Vec::new();
    model_stage(s, hashes, &mut stages)?;
    let (tokenize_ids, labels) = data_stages(s, hashes, &mut stages)?;
    let pack_idx = pack_stage(s, &tokenize_ids, labels, &mut stages);
    let model_deps = train_stages(s, hashes, pack_idx, &mut stages)?;
    evaluate_stage(s, hashes, pack_idx, &model_deps, &mut stages)?;
    export_stages(s, pack_idx, &model_deps, &mut stages);
    finish(stages)
}

/// `fetch.model` (stage 0: every other stage that reads the model depends on it).
fn model_stage(
    s: &Settings,
    hashes: &FileHashCache<'_>,
    stages: &mut Vec<PlannedStage>,
) -> Result<(), PlanError> {
    let (fm, inputs) =
        fetch::resolve_model(&s.base_model, hashes).map_err(|source| PlanError::Resolve {
            stage: "fetch.model".into(),
            source,
        })?;
    stages.push(PlannedStage {
        name: "fetch.model".into(),
        stage: AnyStage::FetchModel(Box::new(fm)),
        inputs,
        deps: vec![],
    });
    Ok(())
}

/// `fetch.data[i]` + `tokenize[i]` per dataset (then `.test[i]` per test dataset): the
/// tokenize stage indices and dataset labels, in order.
fn data_stages(
    s: &Settings,
    hashes: &FileHashCache<'_>,
    stages: &mut Vec<PlannedStage>,
) -> Result<(Vec<usize>, Vec<String>), PlanError> {
    let mut tokenize_ids = Vec::new();
    let mut labels = Vec::new();
    for (group, list) in [
        ("datasets", &s.datasets),
        ("test_datasets", &s.test_datasets),
    ] {
        for (i, d) in list.iter().enumerate() {
            let suffix = if group == "datasets" {
                format!("[{i}]")
            } else {
                format!(".test[{i}]")
            };
            let fetch_name = format!("fetch.data{suffix}");
            let (fd, inputs): (_, Inputs) =
                fetch::resolve_data(&d.source, d.split.as_deref(), d.name.as_deref(), hashes)
                    .map_err(|source| PlanError::Resolve {
                        stage: fetch_name.clone(),
                        source,
                    })?;
            let file_labels = inputs
                .iter()
                .map(|(id, i)| (id.clone(), i.label.clone()))
                .collect();
            stages.push(PlannedStage {
                name: fetch_name,
                stage: AnyStage::FetchData(Box::new(fd)),
                inputs,
                deps: vec![],
            });
            let fetch_idx = stages.len() - 1;
            let template = d
                .format
                .chat_template()
                .map(|t| template_source(t.unwrap_or(&s.chat_template)));
            let label = format!("{group}[{i}]");
            stages.push(PlannedStage {
                name: format!("tokenize{suffix}"),
                stage: AnyStage::Tokenize(Box::new(Staged::new(
                    Tokenize {
                        format: d.format.clone(),
                        sequence_len: s.sequence_len,
                        excess: s.excess_length_strategy,
                        min_sample_len: s.min_sample_len,
                        train_on_inputs: s.train_on_inputs,
                        special_tokens: s.special_tokens.clone(),
                        chat: template.map(|chat_template| ChatInputs {
                            chat_template,
                            default_system_message: s.default_system_message.clone(),
                            eot_tokens: s.eot_tokens.clone(),
                            chat_template_kwargs: s.chat_template_kwargs.clone(),
                        }),
                    },
                    TokenizeNeutral {
                        label: label.clone(),
                        path_display: d.path.clone(),
                        file_labels,
                    },
                ))),
                inputs: Inputs::new(),
                deps: vec![
                    Dep {
                        stage: 0,
                        files: Some(TOKENIZER_FILES),
                    },
                    Dep {
                        stage: fetch_idx,
                        files: None,
                    },
                ],
            });
            tokenize_ids.push(stages.len() - 1);
            labels.push(label);
        }
    }
    Ok((tokenize_ids, labels))
}

/// `pack` over every tokenize stage; its index.
fn pack_stage(
    s: &Settings,
    tokenize_ids: &[usize],
    labels: Vec<String>,
    stages: &mut Vec<PlannedStage>,
) -> usize {
    stages.push(PlannedStage {
        name: "pack".into(),
        stage: AnyStage::Pack(Box::new(Staged::new(
            Pack {
                sequence_len: s.sequence_len,
                sample_packing: s.sample_packing,
                eval_sample_packing: s.sample_packing,
                val_set_size: s.val_set_size,
                seed: s.seed,
                shuffle: s.shuffle_merged_datasets,
                group_by_length: s.group_by_length,
                n_train_sets: s.datasets.len(),
                dataset_labels: labels,
            },
            (),
        ))),
        inputs: Inputs::new(),
        deps: tokenize_ids
            .iter()
            .map(|&t| Dep {
                stage: t,
                files: None,
            })
            .collect(),
    });
    stages.len() - 1
}

/// Where the model that evaluate and export read lives: which kind, and its dependencies —
/// [merge], [fetch.model, train], [train] (full fine-tuning) or [fetch.model] (nothing trained).
type ModelDeps = (EvalModel, Vec<Dep>);

/// `train` (with `fetch.checkpoint` when resuming) and `merge`; where the trained model lives.
fn train_stages(
    s: &Settings,
    hashes: &FileHashCache<'_>,
    pack_idx: usize,
    stages: &mut Vec<PlannedStage>,
) -> Result<ModelDeps, PlanError> {
    let t = &s.train;
    // Where the trained model lives, as dependencies: [merge], [fetch.model, train], or
    // [fetch.model] when nothing is trained.
    let mut model_deps = (
        EvalModel::Base,
        vec![Dep {
            stage: 0,
            files: None,
        }],
    );
    // No adapter = full fine-tuning (Axolotl's meaning).
    let full = t.adapter.is_none();
    if matches!(t.adapter.as_deref(), Some("lora" | "qlora")) || full {
        let mut train_deps = vec![
            Dep {
                stage: 0,
                files: None,
            },
            Dep {
                stage: pack_idx,
                files: None,
            },
        ];
        if let Some(dir) = &t.resume_from_checkpoint {
            let (fd, inputs) = fetch::resolve_checkpoint(dir, full, hashes).map_err(|source| {
                PlanError::Resolve {
                    stage: "fetch.checkpoint".into(),
                    source,
                }
            })?;
            stages.push(PlannedStage {
                name: "fetch.checkpoint".into(),
                stage: AnyStage::FetchData(Box::new(fd)),
                inputs,
                deps: vec![],
            });
            train_deps.push(Dep {
                stage: stages.len() - 1,
                files: None,
            });
        }
        // A packed base is its own cached stage, shared by every train stage asking for it.
        if !t.base_weights.is_f32() {
            stages.push(PlannedStage {
                name: "quantize".into(),
                stage: AnyStage::Quantize(Box::new(Staged::new(
                    crate::stages::quantize::Quantize {
                        base_weights: t.base_weights,
                    },
                    (),
                ))),
                inputs: Inputs::new(),
                deps: vec![Dep {
                    stage: 0,
                    files: None,
                }],
            });
            train_deps.push(Dep {
                stage: stages.len() - 1,
                files: None,
            });
        }
        // The reference model's scores: one cached entry per (reference, pack), shared by every
        // train stage that reads them.
        if t.rl.is_some_and(|l| l.needs_reference()) {
            let reference = if t.base_weights.is_f32() {
                0
            } else {
                train_deps[train_deps.len() - 1].stage
            };
            stages.push(PlannedStage {
                name: "refscore".into(),
                stage: AnyStage::RefScore(Box::new(Staged::new(
                    crate::stages::refscore::RefScore {
                        base_weights: t.base_weights,
                    },
                    (),
                ))),
                inputs: Inputs::new(),
                deps: vec![
                    Dep {
                        stage: reference,
                        files: None,
                    },
                    Dep {
                        stage: pack_idx,
                        files: None,
                    },
                ],
            });
            train_deps.push(Dep {
                stage: stages.len() - 1,
                files: None,
            });
        }
        stages.push(PlannedStage {
            name: "train".into(),
            stage: AnyStage::Train(Box::new(Staged::new(
                Train {
                    method: if full {
                        TrainMethod::Full
                    } else {
                        TrainMethod::Lora(t.lora.clone())
                    },
                    optim: t.optim.clone(),
                    steps: t.steps.clone(),
                    cadence: t.cadence.clone(),
                    seed: s.seed,
                    neftune_noise_alpha: t.neftune_noise_alpha,
                    unfrozen_parameters: t.unfrozen_parameters.clone(),
                    base_weights: t.base_weights,
                    optimizer_states: t.optimizer_states,
                    from_checkpoint: t.resume_from_checkpoint.is_some(),
                    rl: t.rl,
                },
                TrainNeutral {
                    logging_steps: t.logging_steps.unwrap_or(1),
                    gradient_checkpointing: t.gradient_checkpointing,
                },
            ))),
            inputs: Inputs::new(),
            deps: train_deps,
        });
        let train_idx = stages.len() - 1;
        let train_dep = Dep {
            stage: train_idx,
            files: None,
        };
        model_deps = if full {
            (EvalModel::Trained, vec![train_dep])
        } else {
            (
                EvalModel::BaseWithAdapter,
                vec![
                    Dep {
                        stage: 0,
                        files: None,
                    },
                    train_dep,
                ],
            )
        };
        if s.merge_lora && !full {
            stages.push(PlannedStage {
                name: "merge".into(),
                stage: AnyStage::Merge(Box::new(Staged::new(
                    Merge {
                        max_shard_size: s.max_shard_size,
                        chat_template: configured_template(&s.chat_template),
                        base_weights: s.train.base_weights,
                    },
                    (),
                ))),
                inputs: Inputs::new(),
                deps: model_deps.1.clone(),
            });
            model_deps = (
                EvalModel::Merged,
                vec![Dep {
                    stage: stages.len() - 1,
                    files: None,
                }],
            );
        }
    }
    Ok(model_deps)
}

/// `evaluate` (with `fetch.prompts` when it has a prompts file).
fn evaluate_stage(
    s: &Settings,
    hashes: &FileHashCache<'_>,
    pack_idx: usize,
    model_deps: &ModelDeps,
    stages: &mut Vec<PlannedStage>,
) -> Result<(), PlanError> {
    let t = &s.train;
    if let Some(e) = &s.evaluate {
        let mut deps = model_deps.1.clone();
        deps.push(Dep {
            stage: pack_idx,
            files: Some(VAL_FILES),
        });
        if let Some(p) = &e.prompts {
            let (fd, inputs) = fetch::resolve_data(
                &crate::config::DataSource::Local(vec![p.clone()]),
                None,
                None,
                hashes,
            )
            .map_err(|source| PlanError::Resolve {
                stage: "fetch.prompts".into(),
                source,
            })?;
            stages.push(PlannedStage {
                name: "fetch.prompts".into(),
                stage: AnyStage::FetchData(Box::new(fd)),
                inputs,
                deps: vec![],
            });
            deps.push(Dep {
                stage: stages.len() - 1,
                files: None,
            });
        }
        stages.push(PlannedStage {
            name: "evaluate".into(),
            stage: AnyStage::Evaluate(Box::new(Staged::new(
                Evaluate {
                    model: model_deps.0,
                    base_weights: if model_deps.0 == EvalModel::BaseWithAdapter {
                        t.base_weights
                    } else {
                        Default::default()
                    },
                    batch_size: t.eval_batch_size.unwrap_or(t.steps.micro_batch_size).max(1),
                    has_prompts: e.prompts.is_some(),
                    max_new_tokens: e.max_new_tokens,
                    chat_template: configured_template(&s.chat_template),
                    chat_template_kwargs: s.chat_template_kwargs.clone(),
                },
                (),
            ))),
            inputs: Inputs::new(),
            deps,
        });
    }
    Ok(())
}

/// One `export.<format>` per `export:` entry.
fn export_stages(
    s: &Settings,
    pack_idx: usize,
    model_deps: &ModelDeps,
    stages: &mut Vec<PlannedStage>,
) {
    let t = &s.train;
    for (format, quant) in &s.export {
        let Ok(f) = ExportFormat::parse(format, quant.as_deref()) else {
            continue; // rejected by the config resolver already
        };
        let mut deps = vec![Dep {
            stage: 0,
            files: None,
        }];
        deps.extend(model_deps.1.iter().filter(|d| d.stage != 0).cloned());
        deps.push(Dep {
            stage: pack_idx,
            files: Some(VAL_FILES),
        });
        stages.push(PlannedStage {
            name: format!("export.{}", f.label()),
            stage: AnyStage::Export(Box::new(Staged::new(
                Export {
                    format: f,
                    model: model_deps.0,
                    batch_size: t.eval_batch_size.unwrap_or(t.steps.micro_batch_size).max(1),
                    chat_template: configured_template(&s.chat_template),
                    max_shard_size: s.max_shard_size,
                },
                (),
            ))),
            inputs: Inputs::new(),
            deps,
        });
    }
}

fn finish(stages: Vec<PlannedStage>) -> Result<Plan, PlanError> {
    let mut graph = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| graph.add_node(i)).collect();
    for (i, s) in stages.iter().enumerate() {
        for d in &s.deps {
            graph.add_edge(nodes[d.stage], nodes[i], ());
        }
    }
    petgraph::algo::toposort(&graph, None).map_err(|_| PlanError::Cycle)?;
    // Stages are declared upstream-first, so declaration order is a topological order that
    // reads naturally (model, then each dataset, then pack).
    let order = (0..stages.len()).collect();
    Ok(Plan {
        stages,
        graph,
        order,
    })
}

impl Plan {
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// Stages a target needs: the named stage (or every stage of a kind) and all their ancestors.
    pub fn closure(&self, targets: &[String]) -> Result<Vec<bool>, PlanError> {
        if targets.is_empty() {
            return Ok(vec![true; self.stages.len()]);
        }
        let mut need = vec![false; self.stages.len()];
        let mut stack = Vec::new();
        for t in targets {
            let hits: Vec<usize> = match StageKind::parse(t) {
                Some(k) => (0..self.stages.len())
                    .filter(|&i| self.stages[i].kind() == k)
                    .collect(),
                None => self.index_of(t).into_iter().collect(),
            };
            if hits.is_empty() {
                let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
                let hint = crate::config::did_you_mean(t, names.iter().copied())
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_else(|| format!("; stages: {}", names.join(", ")));
                return Err(PlanError::UnknownTarget(t.clone(), hint));
            }
            stack.extend(hits);
        }
        while let Some(i) = stack.pop() {
            if !need[i] {
                need[i] = true;
                stack.extend(self.stages[i].deps.iter().map(|d| d.stage));
            }
        }
        Ok(need)
    }

    /// Graphviz of the DAG.
    pub fn dot(&self, labels: &[String]) -> String {
        let mut s = String::from(
            "digraph kiln {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
        );
        for (i, st) in self.stages.iter().enumerate() {
            let extra = labels.get(i).map(|l| format!("\\n{l}")).unwrap_or_default();
            s.push_str(&format!("  s{i} [label=\"{}{}\"];\n", st.name, extra));
        }
        for (i, st) in self.stages.iter().enumerate() {
            for d in &st.deps {
                s.push_str(&format!("  s{} -> s{i};\n", d.stage));
            }
        }
        s.push_str("}\n");
        s
    }
}

/// A stage's definition: kind, version, params, inputs, and its dependencies' definitions. Two
/// stages with equal definitions have equal keys once built, so sweep variants share them.
fn definition(stages: &[PlannedStage], defs: &[String], i: usize) -> Result<String, PlanError> {
    let s = &stages[i];
    let deps: Vec<(String, String)> = s
        .deps
        .iter()
        .map(|d| {
            (
                defs[d.stage].clone(),
                d.files.map(|f| f.join(",")).unwrap_or_else(|| "*".into()),
            )
        })
        .collect();
    // A definition is a key whose upstream digests are the upstream definitions.
    stage_key(s, &deps).map(|k| format!("def:{k}"))
}

/// Merges the plans of a sweep's variants into one graph: stages with equal definitions appear
/// once under their plain name (`tokenize[0]`, `pack`); stages that differ between variants are
/// named `name@variant` (`train@1a2b3c4d`). Returns the merged plan and, per variant, the merged
/// index of each of its stages.
pub fn merge(variants: Vec<(String, Plan)>) -> Result<(Plan, Vec<Vec<usize>>), PlanError> {
    // Definitions of every stage of every variant.
    let defs: Vec<Vec<String>> = variants
        .iter()
        .map(|(_, p)| {
            let mut d: Vec<String> = Vec::with_capacity(p.stages.len());
            for i in 0..p.stages.len() {
                let x = definition(&p.stages, &d, i)?;
                d.push(x);
            }
            Ok(d)
        })
        .collect::<Result<_, PlanError>>()?;
    // A name is shared when every variant that has it defines it the same way.
    let mut by_name: std::collections::HashMap<String, std::collections::HashSet<String>> =
        Default::default();
    for ((_, p), d) in variants.iter().zip(&defs) {
        for (s, def) in p.stages.iter().zip(d) {
            by_name
                .entry(s.name.clone())
                .or_default()
                .insert(def.clone());
        }
    }
    let mut merged: Vec<PlannedStage> = Vec::new();
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    let mut maps = Vec::with_capacity(variants.len());
    for ((id, p), d) in variants.into_iter().zip(defs) {
        let mut map = Vec::with_capacity(p.stages.len());
        for (s, def) in p.stages.into_iter().zip(d) {
            if let Some(&j) = seen.get(&def) {
                map.push(j);
                continue;
            }
            let shared = by_name.get(&s.name).map(|x| x.len() == 1).unwrap_or(true);
            let name = if shared {
                s.name.clone()
            } else {
                format!("{}@{id}", s.name)
            };
            let deps = s
                .deps
                .iter()
                .map(|dep| Dep {
                    stage: map[dep.stage],
                    files: dep.files,
                })
                .collect();
            merged.push(PlannedStage {
                name,
                stage: s.stage,
                inputs: s.inputs,
                deps,
            });
            seen.insert(def, merged.len() - 1);
            map.push(merged.len() - 1);
        }
        maps.push(map);
    }
    Ok((finish(merged)?, maps))
}
