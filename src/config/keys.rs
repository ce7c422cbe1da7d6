//! What kiln does with each Axolotl key it does not read (the ones it reads are `Handled` in
//! `resolve::classify`): no effect, with the reason; not supported yet and harmless (a warning:
//! training gives the same kind of result without it); or not supported yet and refused (an
//! error even without `strict`: ignoring it would train something other than what the config
//! asks for). Also the keys of Axolotl's plugins (`plugins:`) and legacy spellings still found
//! in published configs. docs/config.md's key table is generated from these lists
//! (`reference_markdown`; tests/config_docs.rs checks the two agree).

/// What kiln does with a key it does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Accepted; has no effect in kiln, for the reason given.
    NoEffect(&'static str),
    /// Not supported yet; kiln trains without it and the result is of the same kind.
    Later(&'static str),
    /// Not supported yet; without it kiln would train something else, so the config is refused.
    Refused(&'static str),
}

const DISTRIBUTED: &str = "kiln trains on this machine's CPU cores: device placement, sharding and distribution have no effect";
const PRECISION: &str =
    "kiln computes in f32 with its own CPU kernels: precision switches have no effect";
const KERNELS: &str = "a PyTorch kernel choice; kiln uses its own kernels";
const LOGGING: &str = "kiln logs metrics to its cache index (see `kiln runs`)";
const WORKERS: &str = "kiln sizes its own worker pool (`num_threads`)";
const HUB_PUSH: &str = "kiln does not push to the Hugging Face Hub";
const COMPUTED: &str = "kiln computes and caches its preprocessing itself";
const TOKENIZER_LOAD: &str = "kiln reads the model's tokenizer.json (the fast tokenizer) directly";
const PREFERENCE: &str =
    "GRPO, reward models and other RL methods (kiln trains rl: dpo, ipo, orpo, simpo and kto)";
const QUANTIZED: &str =
    "quantized or quantization-aware training (kiln trains LoRA on the model as loaded)";
const SYNTHETIC: &str = "synthetic datasets";
const THINKING: &str = "reasoning traces in a separate field (put them in the content)";
const PER_MESSAGE: &str = "per-message training flags";
const DISTILL: &str = "knowledge distillation from a teacher's logits";
const STEPWISE: &str = "stepwise supervised (process reward) datasets";
const USER_FORMAT: &str = "user-defined prompt formats";
const FASTCHAT: &str = "fastchat conversation templates (use `chat_template`)";
const PACKING: &str = "packing heuristics (kiln packs to sequence_len)";
const ORDER: &str = "sample order heuristics (kiln shuffles with `seed`)";
const CHECKPOINT_POLICY: &str = "checkpoint policies beyond save_steps / save_total_limit";
const WATCHDOG: &str = "stopping a run whose loss diverges";
const CLOUD: &str = "an `axolotl cloud` launcher setting; kiln runs on this machine";
const OPTIMIZER: &str = "an optimizer or schedule variant kiln does not implement; kiln's AdamW would train with other settings";
const PARTIAL: &str = "training a chosen subset of parameters or layers; kiln trains every LoRA target (or every weight)";
const EMBEDDINGS: &str = "changing the vocabulary or the embedding matrix";
const ARCH: &str = "a change to the model's attention, positions or loss";
const PEFT_VARIANT: &str = "a PEFT variant kiln does not implement (kiln's LoRA applies one rank and alpha to every target)";
const DATA_SUBSET: &str =
    "selecting or deduplicating part of the data; kiln would train on all of it";
const EVAL_EXTRA: &str =
    "an extra evaluation during training (kiln evaluates validation loss and the `evaluate` stage)";
const CHECKPOINT_KWARGS: &str = "PyTorch's checkpointing options (use_reentrant); kiln's `gradient_checkpointing` recomputes each layer in its own op";
const CHECKPOINT_MEMORY: &str = "trading compute for memory; the result is the same without it";
const MOE: &str = "mixture-of-experts kernels (kiln has no MoE models yet)";
const VISION: &str = "vision and multimodal inputs (kiln trains on text)";
const PRETRAINING: &str =
    "streamed pretraining data (give the text as a `completion` dataset under `datasets:` instead)";

/// Every top-level key of Axolotl's schema kiln does not read, with its class. Keys kiln reads
/// are in `resolve::classify`; a key in both is a bug (tests/config_docs.rs checks).
pub const TOP_LEVEL: &[(&str, Class)] = &[
    (
        "auto_resume_from_checkpoints",
        Class::NoEffect("kiln always resumes an interrupted train stage from its newest intact checkpoint"),
    ),
    ("gradio_share", Class::NoEffect("`kiln serve` serves on your machine only; no share links")),
    ("merge_method", Class::NoEffect("kiln merges every layer in f32 on the CPU")),
    (
        "dataset_prepared_path",
        Class::NoEffect("kiln keeps prepared data in its content-addressed cache (`cache_dir`)"),
    ),
    ("dataset_processes", Class::NoEffect(WORKERS)),
    ("dataset_num_proc", Class::NoEffect(WORKERS)),
    ("dataloader_num_workers", Class::NoEffect(WORKERS)),
    ("dataloader_pin_memory", Class::NoEffect(WORKERS)),
    ("dataloader_prefetch_factor", Class::NoEffect(WORKERS)),
    ("flash_attention", Class::NoEffect(KERNELS)),
    ("sdp_attention", Class::NoEffect(KERNELS)),
    ("xformers_attention", Class::NoEffect(KERNELS)),
    ("flash_attn_cross_entropy", Class::NoEffect(KERNELS)),
    ("flash_attn_rms_norm", Class::NoEffect(KERNELS)),
    ("flash_attn_fuse_mlp", Class::NoEffect(KERNELS)),
    ("eager_attention", Class::NoEffect(KERNELS)),
    ("tf32", Class::NoEffect(KERNELS)),
    ("torch_compile", Class::NoEffect(KERNELS)),
    ("attn_implementation", Class::NoEffect(KERNELS)),
    ("trust_remote_code", Class::NoEffect("kiln runs no Python model code")),
    ("use_wandb", Class::NoEffect(LOGGING)),
    ("wandb_entity", Class::NoEffect(LOGGING)),
    ("wandb_log_model", Class::NoEffect(LOGGING)),
    ("wandb_mode", Class::NoEffect(LOGGING)),
    ("wandb_name", Class::NoEffect(LOGGING)),
    ("wandb_project", Class::NoEffect(LOGGING)),
    ("wandb_run_id", Class::NoEffect(LOGGING)),
    ("wandb_watch", Class::NoEffect(LOGGING)),
    // Distribution and placement.
    ("accelerator_config", Class::NoEffect(DISTRIBUTED)),
    ("context_parallel_size", Class::NoEffect(DISTRIBUTED)),
    ("ddp", Class::NoEffect(DISTRIBUTED)),
    ("ddp_broadcast_buffers", Class::NoEffect(DISTRIBUTED)),
    ("ddp_bucket_cap_mb", Class::NoEffect(DISTRIBUTED)),
    ("ddp_find_unused_parameters", Class::NoEffect(DISTRIBUTED)),
    ("ddp_timeout", Class::NoEffect(DISTRIBUTED)),
    ("deepcompile", Class::NoEffect(DISTRIBUTED)),
    ("deepspeed", Class::NoEffect(DISTRIBUTED)),
    ("device", Class::NoEffect(DISTRIBUTED)),
    ("device_map", Class::NoEffect(DISTRIBUTED)),
    ("dp_replicate_size", Class::NoEffect(DISTRIBUTED)),
    ("dp_shard_size", Class::NoEffect(DISTRIBUTED)),
    ("fsdp", Class::NoEffect(DISTRIBUTED)),
    ("fsdp_config", Class::NoEffect(DISTRIBUTED)),
    ("fsdp_final_state_dict_type", Class::NoEffect(DISTRIBUTED)),
    ("fsdp_version", Class::NoEffect(DISTRIBUTED)),
    ("fp8_enable_fsdp_float8_all_gather", Class::NoEffect(DISTRIBUTED)),
    ("gpu_memory_limit", Class::NoEffect(DISTRIBUTED)),
    ("heads_k_stride", Class::NoEffect(DISTRIBUTED)),
    ("local_rank", Class::NoEffect(DISTRIBUTED)),
    ("lora_on_cpu", Class::NoEffect(DISTRIBUTED)),
    ("low_cpu_mem_usage", Class::NoEffect(DISTRIBUTED)),
    ("max_memory", Class::NoEffect(DISTRIBUTED)),
    ("experimental_skip_move_to_device", Class::NoEffect(DISTRIBUTED)),
    ("qlora_sharded_model_loading", Class::NoEffect(DISTRIBUTED)),
    ("ray_num_workers", Class::NoEffect(DISTRIBUTED)),
    ("ray_run_name", Class::NoEffect(DISTRIBUTED)),
    ("resources_per_worker", Class::NoEffect(DISTRIBUTED)),
    ("ring_attn_func", Class::NoEffect(DISTRIBUTED)),
    ("sequence_parallel_degree", Class::NoEffect(DISTRIBUTED)),
    ("tensor_parallel_size", Class::NoEffect(DISTRIBUTED)),
    ("use_ray", Class::NoEffect(DISTRIBUTED)),
    ("world_size", Class::NoEffect(DISTRIBUTED)),
    // Precision.
    ("embeddings_skip_upcast", Class::NoEffect(PRECISION)),
    ("float32", Class::NoEffect(PRECISION)),
    ("fp32_norm_classes", Class::NoEffect(PRECISION)),
    ("fp32_norms", Class::NoEffect(PRECISION)),
    ("peft_autocast_adapter_dtype", Class::NoEffect(PRECISION)),
    // Kernels and runtime.
    ("batch_flattening", Class::NoEffect(KERNELS)),
    ("chunked_cross_entropy", Class::NoEffect(KERNELS)),
    ("chunked_cross_entropy_num_chunks", Class::NoEffect(KERNELS)),
    ("experts_implementation", Class::NoEffect(KERNELS)),
    ("flash_attn_d512", Class::NoEffect(KERNELS)),
    ("flash_optimum", Class::NoEffect(KERNELS)),
    ("flex_attention", Class::NoEffect(KERNELS)),
    ("flex_attn_compile_kwargs", Class::NoEffect(KERNELS)),
    ("fused_attn_kernel", Class::NoEffect(KERNELS)),
    ("gc_collect_steps", Class::NoEffect(KERNELS)),
    ("gc_steps", Class::NoEffect(KERNELS)),
    ("gemma4_hybrid_attn_impl", Class::NoEffect(KERNELS)),
    ("include_tkps", Class::NoEffect(KERNELS)),
    ("include_tokens_per_second", Class::NoEffect(KERNELS)),
    ("large_head_attention", Class::NoEffect(KERNELS)),
    ("lora_embedding_kernel", Class::NoEffect(KERNELS)),
    ("lora_mlp_kernel", Class::NoEffect(KERNELS)),
    ("lora_o_kernel", Class::NoEffect(KERNELS)),
    ("lora_qkv_kernel", Class::NoEffect(KERNELS)),
    ("pad_to_multiple_of", Class::NoEffect(KERNELS)),
    ("profiler_steps", Class::NoEffect(KERNELS)),
    ("profiler_steps_start", Class::NoEffect(KERNELS)),
    ("sage_attention", Class::NoEffect(KERNELS)),
    ("sample_packing_mp_start_method", Class::NoEffect(KERNELS)),
    ("sdpa_varlen", Class::NoEffect(KERNELS)),
    ("tiled_mlp", Class::NoEffect(KERNELS)),
    ("tiled_mlp_num_shards", Class::NoEffect(KERNELS)),
    ("tiled_mlp_use_original_mlp", Class::NoEffect(KERNELS)),
    ("torch_compile_backend", Class::NoEffect(KERNELS)),
    ("torch_compile_mode", Class::NoEffect(KERNELS)),
    ("torch_compile_options", Class::NoEffect(KERNELS)),
    ("torch_empty_cache_steps", Class::NoEffect(KERNELS)),
    ("torchdistx_path", Class::NoEffect(KERNELS)),
    ("use_kernels", Class::NoEffect(KERNELS)),
    // Logging.
    ("comet_api_key", Class::NoEffect(LOGGING)),
    ("comet_experiment_config", Class::NoEffect(LOGGING)),
    ("comet_experiment_key", Class::NoEffect(LOGGING)),
    ("comet_mode", Class::NoEffect(LOGGING)),
    ("comet_online", Class::NoEffect(LOGGING)),
    ("comet_project_name", Class::NoEffect(LOGGING)),
    ("comet_workspace", Class::NoEffect(LOGGING)),
    ("hf_mlflow_log_artifacts", Class::NoEffect(LOGGING)),
    ("mlflow_experiment_name", Class::NoEffect(LOGGING)),
    ("mlflow_run_name", Class::NoEffect(LOGGING)),
    ("mlflow_tracking_uri", Class::NoEffect(LOGGING)),
    ("otel_metrics_host", Class::NoEffect(LOGGING)),
    ("otel_metrics_port", Class::NoEffect(LOGGING)),
    ("trackio_project_name", Class::NoEffect(LOGGING)),
    ("trackio_run_name", Class::NoEffect(LOGGING)),
    ("trackio_space_id", Class::NoEffect(LOGGING)),
    ("use_comet", Class::NoEffect(LOGGING)),
    ("use_mlflow", Class::NoEffect(LOGGING)),
    ("use_otel_metrics", Class::NoEffect(LOGGING)),
    ("use_tensorboard", Class::NoEffect(LOGGING)),
    ("use_trackio", Class::NoEffect(LOGGING)),
    // The hub.
    ("hf_use_auth_token", Class::NoEffect("kiln reads HF_TOKEN from the environment for downloads")),
    ("hub_model_id", Class::NoEffect(HUB_PUSH)),
    ("hub_revision", Class::NoEffect(HUB_PUSH)),
    ("hub_strategy", Class::NoEffect(HUB_PUSH)),
    ("push_dataset_to_hub", Class::NoEffect(HUB_PUSH)),
    // Preprocessing that kiln does its own way.
    ("axolotl_config_path", Class::NoEffect(COMPUTED)),
    ("dataset_keep_in_memory", Class::NoEffect(COMPUTED)),
    ("is_preprocess", Class::NoEffect(COMPUTED)),
    ("num_dataset_shards_to_save", Class::NoEffect(COMPUTED)),
    ("preprocess_iterable", Class::NoEffect(COMPUTED)),
    ("remove_unused_columns", Class::NoEffect(COMPUTED)),
    ("sample_packing_eff_est", Class::NoEffect(COMPUTED)),
    ("skip_prepare_dataset", Class::NoEffect(COMPUTED)),
    ("total_num_tokens", Class::NoEffect(COMPUTED)),
    ("total_supervised_tokens", Class::NoEffect(COMPUTED)),
    ("save_safetensors", Class::NoEffect("kiln always writes safetensors")),
    ("tokenizer_legacy", Class::NoEffect(TOKENIZER_LOAD)),
    ("tokenizer_save_jinja_files", Class::NoEffect(TOKENIZER_LOAD)),
    ("tokenizer_use_fast", Class::NoEffect(TOKENIZER_LOAD)),
    // Preference and RL training.
    ("center_rewards_coefficient", Class::Refused(PREFERENCE)),
    ("dpo_generate_during_eval", Class::Refused(PREFERENCE)),
    ("dpo_loss_weights", Class::Refused(PREFERENCE)),
    ("dpo_norm_loss", Class::Refused(PREFERENCE)),
    ("dpo_padding_free", Class::Refused(PREFERENCE)),
    ("dpo_use_liger_kernel", Class::Refused(PREFERENCE)),
    ("dpo_use_logits_to_keep", Class::Refused(PREFERENCE)),
    ("dpo_use_weighting", Class::Refused(PREFERENCE)),
    ("ebft", Class::Refused(PREFERENCE)),
    ("max_prompt_len", Class::NoEffect("kiln applies sequence_len to each prompt + completion, as Axolotl does on TRL 1.x (it drops a pair longer than that); there is no separate prompt limit")),
    ("num_labels", Class::Refused(PREFERENCE)),
    ("precompute_ref_log_probs", Class::Refused(PREFERENCE)),
    ("process_reward_model", Class::Refused(PREFERENCE)),
    ("reward_model", Class::Refused(PREFERENCE)),
    ("rpo_alpha", Class::Refused(PREFERENCE)),
    ("trl", Class::Refused(PREFERENCE)),
    ("vllm", Class::Refused(PREFERENCE)),
    // Quantized training.
    ("fp8", Class::Refused(QUANTIZED)),
    ("gptq", Class::Refused(QUANTIZED)),
    ("model_quantization_config", Class::Refused(QUANTIZED)),
    ("model_quantization_config_kwargs", Class::Refused(QUANTIZED)),
    ("qat", Class::Refused(QUANTIZED)),
    ("quantization", Class::Refused(QUANTIZED)),
    ("quantize_moe_experts", Class::Refused(QUANTIZED)),
    ("use_onebitllms", Class::Refused(QUANTIZED)),
    // Optimizer and schedule variants.
    ("adam_beta3", Class::Refused(OPTIMIZER)),
    ("adam_epsilon2", Class::Refused(OPTIMIZER)),
    ("dion_lr", Class::Refused(OPTIMIZER)),
    ("dion_momentum", Class::Refused(OPTIMIZER)),
    ("dion_rank_fraction", Class::Refused(OPTIMIZER)),
    ("dion_rank_multiple_of", Class::Refused(OPTIMIZER)),
    ("embedding_lr", Class::Refused(OPTIMIZER)),
    ("embedding_lr_scale", Class::Refused(OPTIMIZER)),
    ("jagged_restart_anneal_steps", Class::Refused(OPTIMIZER)),
    ("jagged_restart_steps", Class::Refused(OPTIMIZER)),
    ("jagged_restart_warmup_steps", Class::Refused(OPTIMIZER)),
    (
        "loraplus_lr_embedding",
        Class::NoEffect("LoRA+'s rate for embedding LoRA layers: kiln's LoRA adapts linear layers only"),
    ),
    ("lr_div_factor", Class::Refused(OPTIMIZER)),
    ("lr_groups", Class::Refused(OPTIMIZER)),
    ("lr_scheduler_kwargs", Class::Refused(OPTIMIZER)),
    ("optim_args", Class::Refused(OPTIMIZER)),
    ("optim_target_modules", Class::Refused(OPTIMIZER)),
    ("qgalore_cos_threshold", Class::Refused(OPTIMIZER)),
    ("qgalore_gamma_proj", Class::Refused(OPTIMIZER)),
    ("qgalore_proj_bits", Class::Refused(OPTIMIZER)),
    ("qgalore_proj_group_size", Class::Refused(OPTIMIZER)),
    ("qgalore_proj_quant", Class::Refused(OPTIMIZER)),
    ("qgalore_proj_type", Class::Refused(OPTIMIZER)),
    ("qgalore_queue_size", Class::Refused(OPTIMIZER)),
    ("qgalore_rank", Class::Refused(OPTIMIZER)),
    ("qgalore_scale", Class::Refused(OPTIMIZER)),
    ("qgalore_update_proj_gap", Class::Refused(OPTIMIZER)),
    ("relora", Class::Refused(OPTIMIZER)),
    ("relora_cpu_offload", Class::Refused(OPTIMIZER)),
    ("relora_prune_method", Class::Refused(OPTIMIZER)),
    ("relora_prune_ratio", Class::Refused(OPTIMIZER)),
    ("trainer_cls", Class::Refused(OPTIMIZER)),
    // Training part of the model.
    ("freeze_mm_modules", Class::Refused(PARTIAL)),
    ("lisa_layers_attribute", Class::Refused(PARTIAL)),
    ("lisa_n_layers", Class::Refused(PARTIAL)),
    ("lisa_step_interval", Class::Refused(PARTIAL)),
    // Vocabulary and embeddings.
    ("added_tokens_overrides", Class::Refused(EMBEDDINGS)),
    ("fix_untrained_tokens", Class::Refused(EMBEDDINGS)),
    ("mean_resizing_embeddings", Class::Refused(EMBEDDINGS)),
    ("reinit_weights", Class::Refused(EMBEDDINGS)),
    ("resize_token_embeddings_to_32x", Class::Refused(EMBEDDINGS)),
    ("shrink_embeddings", Class::Refused(EMBEDDINGS)),
    ("tokens", Class::Refused(EMBEDDINGS)),
    // Architecture, positions, loss.
    ("cls_model_config", Class::Refused(ARCH)),
    ("eaft_alpha", Class::Refused(ARCH)),
    ("eaft_k", Class::Refused(ARCH)),
    ("overrides_of_model_config", Class::Refused(ARCH)),
    ("overrides_of_model_kwargs", Class::Refused(ARCH)),
    ("pose_max_context_len", Class::Refused(ARCH)),
    ("pose_num_chunks", Class::Refused(ARCH)),
    ("pose_split_on_token_ids", Class::Refused(ARCH)),
    ("rope_scaling", Class::Refused(ARCH)),
    ("s2_attention", Class::Refused(ARCH)),
    ("scaling_softmax", Class::Refused(ARCH)),
    ("scaling_softmax_bias", Class::Refused(ARCH)),
    ("scaling_softmax_factor", Class::Refused(ARCH)),
    ("use_eaft", Class::Refused(ARCH)),
    ("use_pose", Class::Refused(ARCH)),
    // PEFT variants.
    ("lora_alpha_pattern", Class::Refused(PEFT_VARIANT)),
    ("lora_fan_in_fan_out", Class::Refused(PEFT_VARIANT)),
    ("lora_rank_pattern", Class::Refused(PEFT_VARIANT)),
    ("lora_target_parameters", Class::Refused(PEFT_VARIANT)),
    ("peft", Class::Refused(PEFT_VARIANT)),
    ("peft_ensure_weight_tying", Class::Refused(PEFT_VARIANT)),
    ("peft_init_lora_weights", Class::Refused(PEFT_VARIANT)),
    ("peft_layer_replication", Class::Refused(PEFT_VARIANT)),
    ("peft_layers_pattern", Class::Refused(PEFT_VARIANT)),
    ("peft_layers_to_transform", Class::Refused(PEFT_VARIANT)),
    ("peft_trainable_token_indices", Class::Refused(PEFT_VARIANT)),
    // Which data is trained on.
    ("dataset_exact_deduplication", Class::Refused(DATA_SUBSET)),
    ("dataset_shard_idx", Class::Refused(DATA_SUBSET)),
    ("dataset_shard_num", Class::Refused(DATA_SUBSET)),
    ("pretraining_dataset", Class::Refused(PRETRAINING)),
    ("tokenizer_config", Class::Refused("a tokenizer other than the base model's (put its files in the model directory instead)")),
    ("image_resize_algorithm", Class::Refused(VISION)),
    ("image_size", Class::Refused(VISION)),
    ("processor_kwargs", Class::Refused(VISION)),
    ("processor_type", Class::Refused(VISION)),
    // Not supported yet; training is of the same kind without them.
    ("activation_offloading", Class::Later(CHECKPOINT_MEMORY)),
    ("gradient_checkpointing_kwargs", Class::NoEffect(CHECKPOINT_KWARGS)),
    ("layer_offloading", Class::Later(CHECKPOINT_MEMORY)),
    ("selective_checkpointing", Class::Later(CHECKPOINT_MEMORY)),
    ("auto_find_batch_size", Class::Later("finding the largest micro batch that fits (set micro_batch_size)")),
    ("bench_dataset", Class::Later(EVAL_EXTRA)),
    ("bench_split", Class::Later(EVAL_EXTRA)),
    ("do_bench_eval", Class::Later(EVAL_EXTRA)),
    ("do_causal_lm_eval", Class::Later(EVAL_EXTRA)),
    ("eval_causal_lm_metrics", Class::Later(EVAL_EXTRA)),
    ("eval_max_new_tokens", Class::Later(EVAL_EXTRA)),
    ("eval_sequence_len", Class::Later(EVAL_EXTRA)),
    ("eval_strategy", Class::Later(EVAL_EXTRA)),
    ("eval_table_size", Class::Later(EVAL_EXTRA)),
    ("evaluation_strategy", Class::Later(EVAL_EXTRA)),
    ("generate_samples", Class::Later(EVAL_EXTRA)),
    ("generation_do_sample", Class::Later(EVAL_EXTRA)),
    ("generation_max_new_tokens", Class::Later(EVAL_EXTRA)),
    ("generation_prompt_ratio", Class::Later(EVAL_EXTRA)),
    ("generation_temperature", Class::Later(EVAL_EXTRA)),
    ("generation_top_k", Class::Later(EVAL_EXTRA)),
    ("generation_top_p", Class::Later(EVAL_EXTRA)),
    ("num_generation_samples", Class::Later(EVAL_EXTRA)),
    ("loss_watchdog_patience", Class::Later(WATCHDOG)),
    ("loss_watchdog_threshold", Class::Later(WATCHDOG)),
    ("curriculum_sampling", Class::Later(ORDER)),
    ("dataloader_drop_last", Class::Later(ORDER)),
    ("max_packed_sequence_len", Class::Later(PACKING)),
    ("multipack_real_batches", Class::Later(PACKING)),
    ("sample_packing_bin_size", Class::Later(PACKING)),
    ("sample_packing_group_size", Class::Later(PACKING)),
    ("sample_packing_sequentially", Class::Later(PACKING)),
    ("shuffle_before_merging_datasets", Class::Later(ORDER)),
    ("pretrain_multipack_attn", Class::Later(PRETRAINING)),
    ("pretrain_multipack_buffer_size", Class::Later(PRETRAINING)),
    ("pretraining_sample_concatenation", Class::Later(PRETRAINING)),
    ("streaming", Class::Later(PRETRAINING)),
    ("streaming_multipack_buffer_size", Class::Later(PRETRAINING)),
    ("dynamic_checkpoint", Class::Later(CHECKPOINT_POLICY)),
    ("save_first_step", Class::Later(CHECKPOINT_POLICY)),
    ("save_only_model", Class::Later(CHECKPOINT_POLICY)),
    ("save_strategy", Class::Later(CHECKPOINT_POLICY)),
    ("llama4_linearized_experts", Class::Later(MOE)),
    ("role_boundaries", Class::Refused("custom role boundaries for the loss mask (kiln finds each turn by rendering the template)")),
    ("tokenizer_use_mistral_common", Class::Later("mistral-common tokenization (kiln reads tokenizer.json)")),
];

/// Keys that are not in Axolotl's schema but appear in configs Axolotl published (older
/// spellings), and the key they stand for or their class.
pub const LEGACY: &[(&str, Class)] = &[
    ("attention", Class::NoEffect(KERNELS)),
    ("model_config", Class::Refused(ARCH)),
    ("model_kwargs", Class::Refused(ARCH)),
    ("torch_dtype", Class::NoEffect(PRECISION)),
    (
        "base_model_ignore_patterns",
        Class::NoEffect("kiln fetches the files a model needs (config, tokenizer, weights)"),
    ),
    ("gptq_disable_exllama", Class::Refused(QUANTIZED)),
    // Keys of newer plugins (expert parallelism, kernels, diffusion) seen in Axolotl's examples.
    ("expert_parallel_size", Class::NoEffect(DISTRIBUTED)),
    (
        "expert_parallel_token_capacity",
        Class::NoEffect(DISTRIBUTED),
    ),
    (
        "expert_parallel_num_nvl_bytes",
        Class::NoEffect(DISTRIBUTED),
    ),
    ("ple_cpu_offload", Class::NoEffect(DISTRIBUTED)),
    ("use_dsv4_kernels", Class::Later(MOE)),
    ("use_glm_dsa_kernels", Class::Later(MOE)),
    ("dsv4_fp4_grouped_mode", Class::Refused(QUANTIZED)),
    ("nvfp4_merge_aware", Class::Refused(QUANTIZED)),
    (
        "diffusion",
        Class::Refused("diffusion language-model training (a different objective)"),
    ),
    ("eta_min", Class::Refused(OPTIMIZER)),
    // `axolotl cloud` launcher files (Modal, Baseten) share the examples directory.
    (
        "debug",
        Class::NoEffect("printed tokenized samples: see `kiln preprocess --debug`"),
    ),
    ("timeout", Class::NoEffect(CLOUD)),
    ("timeout_preprocess", Class::NoEffect(CLOUD)),
    ("memory_preprocess", Class::NoEffect(CLOUD)),
    ("provider", Class::NoEffect(CLOUD)),
    ("gpu", Class::NoEffect(CLOUD)),
    ("gpu_count", Class::NoEffect(CLOUD)),
    ("node_count", Class::NoEffect(CLOUD)),
    ("memory", Class::NoEffect(CLOUD)),
    ("secrets", Class::NoEffect(CLOUD)),
    ("volumes", Class::NoEffect(CLOUD)),
];

/// One of Axolotl's plugins: its class names under `plugins:`, its key prefixes, and what
/// kiln does with its keys.
pub struct Plugin {
    pub name: &'static str,
    /// `axolotl.integrations.<module>.<Class>`.
    pub class: &'static str,
    /// Exact keys and key prefixes (ending in `_`).
    pub keys: &'static [&'static str],
    pub class_of_keys: Class,
}

pub const PLUGINS: &[Plugin] = &[
    Plugin {
        name: "Liger kernels",
        class: "axolotl.integrations.liger.LigerPlugin",
        keys: &["liger_"],
        class_of_keys: Class::NoEffect("kiln's own fused RMSNorm, SwiGLU, RoPE and cross-entropy ops do this job (same result)"),
    },
    Plugin {
        name: "Cut Cross-Entropy",
        class: "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin",
        keys: &["cut_cross_entropy", "cut_cross_entropy_"],
        class_of_keys: Class::NoEffect("kiln's fused cross-entropy op (one pass over the logits, its own backward) does this job (same result)"),
    },
    Plugin {
        name: "kernels (ScatterMoE, SonicMoE)",
        class: "axolotl.integrations.kernels.KernelsPlugin",
        keys: &["use_scattermoe", "use_sonicmoe"],
        class_of_keys: Class::Later(MOE),
    },
    Plugin {
        name: "SwanLab",
        class: "axolotl.integrations.swanlab.SwanLabPlugin",
        keys: &["use_swanlab", "swanlab_"],
        class_of_keys: Class::NoEffect(LOGGING),
    },
    Plugin {
        name: "LLM Compressor",
        class: "axolotl.integrations.llm_compressor.LLMCompressorPlugin",
        keys: &["llmcompressor"],
        class_of_keys: Class::Refused("sparse fine-tuning with llm-compressor recipes"),
    },
    Plugin {
        name: "Spectrum",
        class: "axolotl.integrations.spectrum.SpectrumPlugin",
        keys: &["spectrum_"],
        class_of_keys: Class::Refused(PARTIAL),
    },
    Plugin {
        name: "knowledge distillation",
        class: "axolotl.integrations.kd.KDPlugin",
        keys: &["kd_"],
        class_of_keys: Class::Refused(DISTILL),
    },
    Plugin {
        name: "Grokfast",
        class: "axolotl.integrations.grokfast.GrokfastPlugin",
        keys: &["grokfast_"],
        class_of_keys: Class::Refused(OPTIMIZER),
    },
    Plugin {
        name: "lm-eval-harness",
        class: "axolotl.integrations.lm_eval.LMEvalPlugin",
        keys: &["lm_eval_"],
        class_of_keys: Class::Later(EVAL_EXTRA),
    },
    Plugin {
        name: "DenseMixer",
        class: "axolotl.integrations.densemixer.DenseMixerPlugin",
        keys: &["dense_mixer"],
        class_of_keys: Class::Later(MOE),
    },
];

/// The plugin whose keys `key` belongs to.
pub fn plugin_of_key(key: &str) -> Option<&'static Plugin> {
    PLUGINS.iter().find(|p| {
        p.keys.iter().any(|k| {
            if k.ends_with('_') {
                key.starts_with(k)
            } else {
                key == *k
            }
        })
    })
}

/// The class of a key kiln does not read: Axolotl's schema, a legacy spelling, or a plugin's.
pub fn class_of(key: &str) -> Option<Class> {
    TOP_LEVEL
        .iter()
        .chain(LEGACY)
        .find(|(k, _)| *k == key)
        .map(|(_, c)| *c)
        .or_else(|| plugin_of_key(key).map(|p| p.class_of_keys))
}

/// Dataset keys of Axolotl's schema (SFT, preference, stepwise, synthetic datasets) that kiln
/// does not read, and their class. Keys kiln reads are `resolve::DATASET_KEYS_HANDLED`.
pub const DATASET: &[(&str, Class)] = &[
    ("chosen_format", Class::Refused(PREFERENCE)),
    ("completion_format", Class::Refused(PREFERENCE)),
    ("field_completion", Class::Refused(PREFERENCE)),
    ("field_label", Class::Refused(PREFERENCE)),
    ("field_prompt", Class::Refused(PREFERENCE)),
    ("prompt_format", Class::Refused(PREFERENCE)),
    ("rejected_format", Class::Refused(PREFERENCE)),
    ("max_completion_length", Class::Refused(STEPWISE)),
    ("step_separator", Class::Refused(STEPWISE)),
    ("train_on_last_step_only", Class::Refused(STEPWISE)),
    ("length", Class::Refused(SYNTHETIC)),
    ("max_input_id", Class::Refused(SYNTHETIC)),
    ("min_input_id", Class::Refused(SYNTHETIC)),
    ("sequence_length", Class::Refused(SYNTHETIC)),
    ("seed", Class::Refused(SYNTHETIC)),
    ("logprobs_field", Class::Refused(DISTILL)),
    ("temperature", Class::Refused(DISTILL)),
    ("field_thinking", Class::Refused(THINKING)),
    ("split_thinking", Class::Refused(THINKING)),
    ("template_thinking_key", Class::Refused(THINKING)),
    (
        "field_tools",
        Class::Refused("tool definitions passed to the chat template"),
    ),
    ("message_field_training", Class::Refused(PER_MESSAGE)),
    ("message_field_training_detail", Class::Refused(PER_MESSAGE)),
    (
        "input_transform",
        Class::Refused("custom Python transforms of the records"),
    ),
    ("shards", Class::Refused(DATA_SUBSET)),
    ("shards_idx", Class::Refused(DATA_SUBSET)),
    ("skip", Class::Refused(DATA_SUBSET)),
    ("preprocess_shards", Class::NoEffect(COMPUTED)),
    ("additional_special_tokens", Class::Refused(EMBEDDINGS)),
    ("bos_token", Class::Refused(EMBEDDINGS)),
    ("eos_token", Class::Refused(EMBEDDINGS)),
    ("pad_token", Class::Refused(EMBEDDINGS)),
    ("unk_token", Class::Refused(EMBEDDINGS)),
    ("text_column", Class::Refused(PRETRAINING)),
    ("conversation", Class::Refused(FASTCHAT)),
    ("field_human", Class::Refused(FASTCHAT)),
    ("field_model", Class::Refused(FASTCHAT)),
    ("format", Class::Refused(USER_FORMAT)),
    ("no_input_format", Class::Refused(USER_FORMAT)),
    ("system_format", Class::Refused(USER_FORMAT)),
    ("system_prompt", Class::Refused(USER_FORMAT)),
    ("input_format", Class::Refused(USER_FORMAT)),
    (
        "train_on_eot",
        Class::Later(
            "a separate end-of-turn policy (kiln applies train_on_eos to every end-of-turn marker)",
        ),
    ),
];

/// A dataset key's class, for one kiln does not read.
pub fn dataset_class_of(key: &str) -> Option<Class> {
    DATASET.iter().find(|(k, _)| *k == key).map(|(_, c)| *c)
}

/// docs/config.md's table of every recognised key kiln does not read, generated from the lists
/// above.
pub fn reference_markdown() -> String {
    fn row(out: &mut String, key: &str, c: &Class) {
        let (what, why) = match c {
            Class::NoEffect(w) => ("no effect", *w),
            Class::Later(w) => ("not supported yet (warning)", *w),
            Class::Refused(w) => ("not supported yet (error)", *w),
        };
        out.push_str(&format!("| `{key}` | {what} | {why} |\n"));
    }
    let mut out = String::from("| key | kiln | why |\n|---|---|---|\n");
    let mut top: Vec<&(&str, Class)> = TOP_LEVEL.iter().chain(LEGACY).collect();
    top.sort_by_key(|(k, _)| *k);
    for (k, c) in top {
        row(&mut out, k, c);
    }
    out.push_str("\nPlugins (`plugins:` entries and their keys; a key ending in `_` stands for every key with that prefix):\n\n| plugin | keys | kiln | why |\n|---|---|---|---|\n");
    for p in PLUGINS {
        let (what, why) = match p.class_of_keys {
            Class::NoEffect(w) => ("no effect", w),
            Class::Later(w) => ("not supported yet (warning)", w),
            Class::Refused(w) => ("not supported yet (error)", w),
        };
        let keys: Vec<String> = p.keys.iter().map(|k| format!("`{k}`")).collect();
        out.push_str(&format!(
            "| {} (`{}`) | {} | {what} | {why} |\n",
            p.name,
            p.class,
            keys.join(", ")
        ));
    }
    out.push_str(
        "\nDataset keys (under each `datasets:` entry):\n\n| key | kiln | why |\n|---|---|---|\n",
    );
    let mut ds: Vec<&(&str, Class)> = DATASET.iter().collect();
    ds.sort_by_key(|(k, _)| *k);
    for (k, c) in ds {
        row(&mut out, k, c);
    }
    out
}
