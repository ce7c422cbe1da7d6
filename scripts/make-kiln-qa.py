#!/usr/bin/env python3
"""Writes pipelines/data/kiln-qa.jsonl: question/answer pairs about kiln's own commands and
config keys, in OpenAI chat format. Facts the base model cannot know, so a fine-tune shows."""
import json, os, random

FACTS = [
    ("kiln run", ["What does `kiln run` do?", "How do I build my pipeline with kiln?", "Which kiln command rebuilds only what changed?", "What happens when I type kiln run config.yml?"],
     "`kiln run config.yml` builds every stale stage in dependency order and reuses every fresh one from the cache. Run it twice with nothing changed and it does no work."),
    ("kiln plan", ["What does `kiln plan` show?", "How can I see which kiln stages are stale?", "How do I find out why kiln wants to rebuild a stage?"],
     "`kiln plan config.yml` prints one line per stage: its name, a short key, fresh or stale, and for a stale stage the exact reason, such as `learning_rate changed 2e-4 → 1e-4`."),
    ("kiln plan --json", ["How do I get the kiln plan as JSON?", "Is there a machine-readable kiln plan?"],
     "Use `kiln plan config.yml --json`. It prints {\"stages\": [...]} with name, kind, key, state, reason and deps for every stage."),
    ("kiln validate", ["How do I check a kiln config without building anything?", "What does `kiln validate` do?"],
     "`kiln validate config.yml` checks types, unknown keys and unsupported keys, reports every problem at once with file, line and a fix, and builds nothing."),
    ("kiln preprocess", ["What does `kiln preprocess` do?", "How do I tokenize my datasets with kiln?", "Which kiln command prints token statistics?"],
     "`kiln preprocess config.yml` fetches, tokenizes and packs the data, then prints samples per dataset, dropped and truncated counts, token counts, sequence-length percentiles, packing efficiency and batches per epoch."),
    ("preprocess --debug", ["How can I see which tokens kiln trains on?", "How do I inspect the loss mask in kiln?"],
     "Run `kiln preprocess config.yml --debug`. It shows tokenized examples with each token's id and label; masked tokens have label -100. Add `--json` for one JSON object per example."),
    ("kiln dag", ["How do I draw the kiln stage graph?", "Can kiln output Graphviz?"],
     "`kiln dag config.yml --dot` prints the stage graph in Graphviz dot format; pipe it to `dot -Tpng` to draw it."),
    ("--target", ["How do I build only one kiln stage?", "What does `--target` do in kiln?"],
     "`kiln run config.yml --target tokenize[0]` builds that stage and everything it needs, nothing else. A kind name like `--target pack` means every stage of that kind."),
    ("--set", ["How do I override a config key from the command line in kiln?", "Can I change learning_rate without editing the kiln config?"],
     "Use `--set key=value`, repeatable: `kiln run config.yml --set learning_rate=1e-4`. Nested keys work too: `--set datasets[0].type=completion`."),
    ("--force", ["How do I force kiln to rebuild a stage?", "What does `kiln run --force` do?"],
     "`kiln run config.yml --force pack` rebuilds the pack stage even though it is fresh; the new entry replaces the old one atomically."),
    ("cache ls", ["How do I list kiln's cache?", "What does `kiln cache ls` show?"],
     "`kiln cache ls` lists every cache entry with its key, stage name, kind, size and creation time."),
    ("cache du", ["How much disk does the kiln cache use?", "What does `kiln cache du` do?"],
     "`kiln cache du` prints disk usage of the cache grouped by stage kind, and the total."),
    ("cache gc", ["How do I clean up the kiln cache?", "What does `kiln cache gc` do?"],
     "`kiln cache gc --keep config.yml` removes every entry that config's current plan does not use; `--older-than 30d` limits it to old entries and `--dry-run` only shows what would go."),
    ("cache verify", ["How do I check the kiln cache for corruption?", "What does `kiln cache verify` do?"],
     "`kiln cache verify` re-hashes every file of every entry against its manifest and reports corruption; `--fix` quarantines damaged entries so the next run rebuilds them."),
    ("cache dir", ["Where does kiln keep its cache?", "How do I move the kiln cache?"],
     "In `cache/` by default. Set `cache_dir:` in the config or the KILN_CACHE environment variable to put it elsewhere."),
    ("stage key", ["How does kiln decide a stage is stale?", "What is a kiln stage key?"],
     "Each stage has a key: a blake3 hash of its kind, its version, the parameters it reads, its input files' contents and its upstream stages' output digests. A stage is stale when no finished cache entry has its key."),
    ("early cutoff", ["What is early cutoff in kiln?", "If a rebuilt kiln stage produces the same bytes, what happens downstream?"],
     "Downstream stages hash their upstream's output digest, so when a rebuilt stage produces identical bytes, everything after it stays fresh. That is early cutoff."),
    ("learning_rate fresh", ["Does changing learning_rate make kiln re-tokenize?", "If I change the learning rate, does kiln redo the data stages?"],
     "No. learning_rate is read only by training, so fetch, tokenize and pack stay fresh and are reused from the cache."),
    ("sequence_len stale", ["What does changing sequence_len rebuild in kiln?", "Does kiln re-tokenize when sequence_len changes?"],
     "Yes. sequence_len is read by tokenize (to drop or truncate long samples) and by pack (the bin size), so both become stale, and everything after them."),
    ("seed", ["Which kiln stages read `seed`?", "What does the seed key do in kiln?"],
     "`seed` drives the shuffle of merged datasets and the train/validation split in the pack stage, so changing it makes pack stale but leaves tokenize fresh."),
    ("sample_packing", ["What does `sample_packing` do in kiln?", "How does kiln pack samples?"],
     "With `sample_packing: true`, the pack stage fits samples into bins of sequence_len tokens with best-fit decreasing, keeps sample boundaries, and restarts position ids per sample so samples never attend to each other."),
    ("val_set_size", ["What does `val_set_size` mean in kiln?", "How do I hold out a validation split in kiln?"],
     "`val_set_size` is a fraction like 0.05 or a count like 100. kiln splits that many samples off deterministically after the seeded shuffle."),
    ("train_on_inputs", ["What does `train_on_inputs` do?", "Does kiln train on the prompt tokens?"],
     "By default no: prompt tokens get label -100. Set `train_on_inputs: true` to put loss on every token."),
    ("excess_length_strategy", ["What happens to samples longer than sequence_len in kiln?", "What does `excess_length_strategy` do?"],
     "`excess_length_strategy` is `drop` by default; `truncate` cuts samples to sequence_len and `raise` stops with an error naming the record. kiln counts what it dropped or truncated."),
    ("alpaca", ["What is the alpaca format in kiln?", "Which fields does kiln's alpaca type read?"],
     "Alpaca records have `instruction`, optional `input`, and `output`. kiln renders the Alpaca prompt and trains only on the output and the end-of-sequence token."),
    ("completion", ["What is kiln's completion format?", "How do I train on raw text with kiln?"],
     "Use `type: completion`; each record's `text` field (or the one named by `field:`) is trained on entirely."),
    ("chat_template", ["How do I train on chat conversations with kiln?", "What does `type: chat_template` do?"],
     "`type: chat_template` renders each `messages` list with the model's real Jinja chat template and trains on the assistant turns only, unless `roles_to_train` says otherwise."),
    ("sharegpt", ["Does kiln read ShareGPT data?", "How do I use conversations with from and value in kiln?"],
     "Yes: use `type: chat_template` with `field_messages: conversations` and `message_property_mappings: {role: from, content: value}`, or `type: sharegpt`, which sets those for you."),
    ("input_output", ["What is the input_output format in kiln?", "How do I choose exactly which text segments carry loss?"],
     "Use `type: input_output` with a `segments` list of {text, label}; segments with `label: false` are masked, the rest are trained."),
    ("roles_to_train", ["What does `roles_to_train` do?", "Can kiln train on user turns too?"],
     "`roles_to_train` lists the roles whose turns carry loss; the default is [assistant]. Add `user` to train on user turns as well."),
    ("train_on_eos", ["What does `train_on_eos` do in kiln?", "Does kiln train the end-of-turn token?"],
     "`train_on_eos: turn` (the default) trains the end-of-turn token after every trained turn; `last` only after the last one, `all` everywhere, `none` never."),
    ("gguf", ["Can kiln load a GGUF file?", "How does kiln get a tokenizer from a GGUF model?"],
     "Yes. Point `base_model` at a .gguf file; the fetch stage rebuilds tokenizer.json and tokenizer_config.json, chat template included, from the GGUF metadata."),
    ("hub", ["Can kiln download models from the Hugging Face Hub?", "How does kiln fetch a hub model?"],
     "Yes: write a hub id like `HuggingFaceTB/SmolLM2-135M-Instruct` as base_model. kiln resolves the revision to a commit, pins it in the stage record, and honours HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE."),
    ("unknown key", ["What does kiln do with a misspelled config key?", "What happens if I write learning_rat in a kiln config?"],
     "kiln stops with an error naming the file, line and key, and suggests the closest key: did you mean `learning_rate`?"),
    ("not supported", ["What does kiln do with Axolotl keys it does not support?", "Will kiln reject my Axolotl config?"],
     "kiln recognises every Axolotl key. One it does not handle yet gets a `not supported yet` warning, or an error with `strict: true`. Explicit nulls count as absent."),
    ("corruption", ["What if a kiln cache file gets corrupted?", "Does kiln notice a flipped byte in the cache?"],
     "Yes. `kiln cache verify` finds it, and a run that reads a damaged entry quarantines it and rebuilds it."),
    ("interrupt", ["What happens if I kill kiln in the middle of a stage?", "Is it safe to press Ctrl-C during kiln run?"],
     "Nothing is lost or half-written. Stages build in a temporary directory and are published by an atomic rename, so an interrupted stage leaves no entry that looks finished; the next run rebuilds it."),
    ("binary format", ["How does kiln store tokenized data?", "What is kiln's token file format?"],
     "As little-endian arrays that can be memory-mapped: tokens.u32, trained.u8, offsets.u64 and sources.u32, with a JSON header. docs/formats.md describes them."),
    ("multiple datasets", ["Can kiln combine several datasets?", "How does kiln merge datasets?"],
     "Yes. Each dataset is fetched and tokenized on its own, so editing one only re-tokenizes that one; the pack stage merges them and shuffles with `seed`."),
    ("exit codes", ["What exit codes does kiln use?", "How does kiln signal a config error?"],
     "kiln exits 0 on success, 1 when a stage fails, and 2 for a config or usage error."),
    ("what is kiln", ["What is kiln?", "Describe kiln in one sentence."],
     "kiln fine-tunes open LLMs from one YAML file like Axolotl, but as a build system: the config becomes a graph of content-hashed stages and only stale stages run."),
    ("micro_batch_size", ["How is the effective batch size computed in kiln?", "What do micro_batch_size and gradient_accumulation_steps do?"],
     "The effective batch is micro_batch_size × gradient_accumulation_steps; preprocess prints the resulting batches and optimizer steps per epoch."),
    ("threads", ["How do I set kiln's thread count?", "How many threads does kiln use?"],
     "All cores by default; set `num_threads:` in the config or KILN_NUM_THREADS in the environment."),
]

def main():
    rng = random.Random(1234)
    rows = []
    for _, questions, answer in FACTS:
        for q in questions:
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
            rows.append({"messages": [{"role": "user", "content": q.replace("kiln", "Kiln", 1) if q.startswith("What is kiln") is False else q}, {"role": "assistant", "content": answer}]})
    # Paraphrase variety: lower-case and question-mark-free variants.
    extra = []
    for r in rows[::2]:
        q = r["messages"][0]["content"]
        extra.append({"messages": [{"role": "user", "content": q.rstrip("?").lower()}, r["messages"][1]]})
    rows += extra
    seen, unique = set(), []
    for r in rows:
        k = r["messages"][0]["content"]
        if k not in seen:
            seen.add(k)
            unique.append(r)
    rng.shuffle(unique)
    out = os.path.join(os.path.dirname(__file__), "..", "pipelines", "data", "kiln-qa.jsonl")
    with open(out, "w") as f:
        for r in unique:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(unique)} rows -> {out}")

main()
