"""MatFormer training of the bundled model on the pydoc corpus, and writing it in the Hugging Face layout.

Every step trains the full (E4B-shaped) model and one nested submodel on the same batch, and adds the two losses.
The submodels are the other 15 rows of Google's slicing table, the E2B slice among them, taken in a seeded shuffled
order that starts over after all 15, so each row trains on every 15th step on average. Because a submodel's
parameters are views of the full model's, its loss trains the FFN prefixes and the layers it keeps, which is what
makes the slices work after training.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from g3n_export.checkpoint import TensorSpec, open_checkpoint, write_checkpoint
from g3n_export.layout import TEXT_PREFIX, is_unused_kv_name, layer_index, text_shapes
from g3n_export.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_sentencepiece, train_sentencepiece, write_tokenizer_files
from g3n_export.training.corpus import heldout_json, load_pydoc_corpus
from g3n_export.training.evaluate import heldout_windows, perplexity, unigram_perplexity
from g3n_export.training.model import MODEL_PREFIX, Dims, Submodel, build_model, config_dict, text_config, text_name
from g3n_export.training.recipes import E2B_NAME, FULL_NAME, scaled_recipes

log = logging.getLogger(__name__)

HELDOUT_FILE = "heldout.json"
LOG_FILE = "training_log.json"
# Rows of the slicing table evaluated after training: the two ends and two intermediate sizes.
INTERMEDIATE_NAMES = ("Config for E2.49B (block-level)", "Config for E3.24B (block-level)")
EVALUATED_NAMES = (FULL_NAME, *INTERMEDIATE_NAMES, E2B_NAME)
GENERATION_PROMPTS = 3
GENERATION_TOKENS = 48


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of one training run (all recorded in the log)."""

    steps: int = 1000
    batch: int = 4
    seq_len: int = 128
    lr: float = 6e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    # One thread: with two OpenMP threads on two cores, any other job on the machine stalls every parallel region
    # (a full-model step on 4 x 256 tokens took 15 s instead of 2 s while other processes used about one core).
    threads: int = 1
    eval_every: int = 250
    holdout_every: int = 20
    # Initial weight of the RMSNorms that end each residual branch, and std of the token embeddings (see
    # `init_for_training`). transformers initializes them to 1 and 0.02.
    branch_norm_init: float = 0.05
    embed_init_std: float = 0.05


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(stream: torch.Tensor, s: TrainSettings, generator: torch.Generator) -> torch.Tensor:
    """Draw `batch` random windows of the training stream, each led by `<bos>` like every Gemma input."""
    starts = torch.randint(0, len(stream) - s.seq_len + 2, (s.batch,), generator=generator)
    rows = [torch.cat([torch.tensor([BOS_ID]), stream[o:o + s.seq_len - 1]]) for o in starts.tolist()]
    return torch.stack(rows)


# The RMSNorms applied to a branch's output just before it is added to the residual stream.
BRANCH_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm", "post_laurel_norm",
                "post_per_layer_input_norm")


def init_for_training(model, s: TrainSettings) -> None:
    """Scale down the residual branches and scale up the token embeddings of a freshly initialized model.

    transformers' initialization (norm weights 1, embeddings with std 0.02) suits loading trained weights, not
    training from scratch. Each of the 35 layers adds several branch outputs with RMS 1 to the residual stream, while
    the token embedding enters with RMS 0.02 x sqrt(hidden), 0.23 at hidden 128. The token's own embedding is then a
    small part of what later layers read, and a 540-step run from that start learned little more than bigram
    statistics.
    """
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, s.embed_init_std)
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 2)[-2] in BRANCH_NORMS:
                parameter.fill_(s.branch_norm_init)


def tie_placeholder_rows(model, vocab: int) -> None:
    """Make the embedding rows at and above `vocab` copies of the `<pad>` row, as in the released checkpoints."""
    with torch.no_grad():
        table = model.model.embed_tokens.weight
        table[vocab:] = table[PAD_ID]


def shipped_state(model) -> dict[str, torch.Tensor]:
    """Return the model's parameters rounded to bf16 (the shipped precision), keyed by text-relative names."""
    return {text_name(n): p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}


def load_state(config: dict[str, Any], state: dict[str, torch.Tensor]):
    """Build a float32 `Gemma3nForCausalLM` of `config` holding `state` (text-relative names) exactly."""
    model = build_model(config)
    result = model.load_state_dict({MODEL_PREFIX + k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"state does not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    return model.eval()


def kv_cache_check(model, ids: list[int], prefill: int) -> float:
    """Return the largest |logit| difference between a cache-free forward and prefill-then-decode with a cache.

    transformers 5 shares K/V between layers even without a cache, and this checks it on the trained weights. The decode part
    runs one token at a time past the sliding window, so the window and the KV-shared layers are both exercised.
    """
    x = torch.tensor([ids])
    with torch.no_grad():
        reference = model(input_ids=x, use_cache=False).logits
        out = model(input_ids=x[:, :prefill], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(prefill, x.shape[1]):
            out = model(input_ids=x[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    return (torch.cat(steps, dim=1) - reference).abs().max().item()


def generate_sample(model, sp, prompt: str, new_tokens: int = GENERATION_TOKENS) -> str:
    """Greedy continuation of `prompt` with transformers' `generate`, decoded to text (prompt excluded)."""
    ids = torch.tensor([[BOS_ID] + sp.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=EOS_ID,
                             pad_token_id=PAD_ID)
    return sp.decode(out[0, ids.shape[1]:].tolist())


def generation_prompts(paragraphs: list[str] | tuple[str, ...], count: int = GENERATION_PROMPTS) -> list[str]:
    """Return the first eight words of the first `count` held-out prose paragraphs.

    A prose paragraph has 20 or more words, starts with a capital letter and has no indented line, which excludes
    code examples, grammar rules and definition lists. Version notes ("Changed in", "New in") are skipped.

    Raises:
        ValueError: fewer than `count` held-out paragraphs qualify.
    """
    prompts = []
    for paragraph in paragraphs:
        words = paragraph.split()
        indented = any(line[:1].isspace() for line in paragraph.splitlines())
        note = paragraph.startswith(("Changed in", "New in"))
        if len(words) >= 20 and paragraph[0].isupper() and not indented and not note:
            prompts.append(" ".join(words[:8]))
        if len(prompts) == count:
            return prompts
    raise ValueError(f"only {len(prompts)} held-out paragraphs are long enough for a generation prompt, need {count}")


def run(out_dir: Path, dims: Dims, s: TrainSettings, *, force: bool = False,
        command: list[str] | None = None) -> dict[str, Any]:
    """Train the bundled model and write it, with tokenizer, held-out text and training log, to `out_dir`.

    `command` is recorded in the log as the command line that started the run (null when called from Python).
    """
    started = time.monotonic()
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(s.seed)
    generator = torch.Generator().manual_seed(s.seed)

    corpus = load_pydoc_corpus(s.holdout_every)
    staging = Path(tempfile.mkdtemp(prefix="g3n-bundled-"))
    tokenizer_files = write_tokenizer_files(train_sentencepiece(corpus.train, dims.vocab), staging)
    sp = load_sentencepiece(staging)
    train_ids: list[int] = []
    for text in corpus.train:
        train_ids += [BOS_ID] + sp.encode(text) + [EOS_ID]
    stream = torch.tensor(train_ids)
    windows = heldout_windows(sp, corpus.heldout, s.seq_len)
    scored_tokens = sum(len(w) - 1 for w in windows)
    log.info("corpus: %d training tokens, %d held-out tokens scored", len(train_ids), scored_tokens)

    config = config_dict(dims)
    source = text_config(config)
    recipes = scaled_recipes(source)
    model = build_model(config)
    init_for_training(model, s)
    tie_placeholder_rows(model, dims.vocab)
    model.train()
    submodels = {name: Submodel(r.plan(source), config) for name, r in recipes.items() if name != FULL_NAME}
    # Every row gets equal turns. A run that gave E2B every other step and the 14 other rows the rest left
    # "E2.49B (block-level)", which contains E2B, with a held-out perplexity 0.1 % above E2B's.
    submodel_order: list[str] = []

    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim != 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))

    losses: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for step in range(s.steps):
        lr = learning_rate(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(stream, s, generator)
        if not submodel_order:
            submodel_order = sorted(submodels)
            rng.shuffle(submodel_order)
        name = submodel_order.pop()

        full_loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        sub_loss = submodels[name](model, input_ids=batch, labels=batch, use_cache=False).loss
        (full_loss + sub_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tie_placeholder_rows(model, dims.vocab)

        elapsed = time.monotonic() - started
        losses.append({"step": step + 1, "full": round(full_loss.item(), 4), "submodel": round(sub_loss.item(), 4),
                       "recipe": name, "lr": lr, "elapsed_s": round(elapsed, 1)})
        if (step + 1) % 10 == 0:
            log.info("step %d/%d  loss full %.3f  %s %.3f  lr %.2e  %.0f s", step + 1, s.steps, full_loss.item(),
                     name, sub_loss.item(), lr, elapsed)
        if (step + 1) % s.eval_every == 0 and step + 1 < s.steps:
            entry = {"step": step + 1, "full": perplexity(model, windows),
                     "e2b": perplexity(model, windows, call=lambda **kw: submodels[E2B_NAME](model, **kw))}
            evals.append(entry)
            log.info("step %d  held-out perplexity: full %.2f, E2B %.2f", step + 1, entry["full"], entry["e2b"])
    train_seconds = time.monotonic() - started

    # Final numbers come from the bf16 weights as shipped, loaded into fresh float32 models of each sliced config.
    state = shipped_state(model)
    final = {}
    for name in EVALUATED_NAMES:
        plan = recipes[name].plan(source)
        sliced = {plan.target_name(k): plan.slice_tensor(k, v) for k, v in state.items()
                  if plan.target_name(k) is not None}
        final[name] = perplexity(load_state(plan.config_dict(config), sliced), windows)
        log.info("held-out perplexity %-36s %.3f", name, final[name])
    unigram = unigram_perplexity(train_ids, windows, dims.vocab)
    log.info("held-out perplexity of the unigram baseline: %.3f", unigram)

    shipped = load_state(config, state)
    samples = []
    for prompt in generation_prompts(corpus.heldout):
        samples.append({"prompt": prompt, "greedy_continuation": generate_sample(shipped, sp, prompt)})
        log.info("greedy generation: %r -> %r", prompt, samples[-1]["greedy_continuation"])
    kv_diff = kv_cache_check(shipped, max(windows, key=len), prefill=64)
    log.info("max |logit| difference with and without KV cache: %.2e", kv_diff)

    record = {
        "command": command,
        "settings": asdict(s),
        "dims": asdict(dims),
        "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "corpus": {"source": "pydoc_data/topics.py", "python_version": corpus.python_version,
                   "sha256": corpus.sha256, "topics": len(corpus.train), "heldout_paragraphs": len(corpus.heldout),
                   "heldout_file": HELDOUT_FILE, "train_tokens": len(train_ids),
                   "heldout_tokens_scored": scored_tokens},
        "recipes": {name: {"layers_to_skip": list(r.layers_to_skip), "ffn_widths": list(r.ffn_widths)}
                    for name, r in recipes.items()},
        "heldout_perplexity": {"note": "bf16 weights as shipped, float32 compute", "window": s.seq_len,
                               "E4B": final[FULL_NAME], "E2B": final[E2B_NAME],
                               "intermediates": {n: final[n] for n in INTERMEDIATE_NAMES},
                               "unigram_baseline": unigram},
        "kv_cache_max_abs_logit_diff": kv_diff,
        "generation": {"new_tokens": GENERATION_TOKENS, "samples": samples},
        "train_seconds": round(train_seconds, 1),
        "eval": evals,
        "loss": losses,
    }
    (staging / LOG_FILE).write_text(json.dumps(record, indent=1) + "\n")
    (staging / HELDOUT_FILE).write_text(heldout_json(corpus))
    (staging / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}, indent=2) + "\n")

    write_model(out_dir, config, state, extra_files=[*tokenizer_files, staging / LOG_FILE, staging / HELDOUT_FILE,
                                                     staging / "generation_config.json"], force=force)
    verify_written(out_dir, windows, final[FULL_NAME])
    log.info("wrote %s in %.0f s", out_dir, time.monotonic() - started)
    return record


def write_model(out_dir: Path, config: dict[str, Any], state: dict[str, torch.Tensor], *, extra_files: list[Path],
                force: bool) -> None:
    """Write the bf16 weights under `model.language_model.` names, in the order of `layout.text_shapes`.

    transformers 5 creates no k_proj/v_proj/k_norm in KV-shared layers, so the checkpoint gets zeros there: the
    released checkpoints carry these tensors, and zeros make any implementation that wrongly reads them fail loudly.
    """
    tc = text_config(config)
    shapes = text_shapes(tc)
    specs = [TensorSpec(TEXT_PREFIX + name, torch.bfloat16, shape) for name, shape in shapes.items()]

    def produce(spec: TensorSpec) -> torch.Tensor:
        name = spec.name[len(TEXT_PREFIX):]
        if name in state:
            return state[name]
        if name in zero_filled:
            return torch.zeros(spec.shape, dtype=torch.bfloat16)
        raise KeyError(f"the trained model has no tensor {name!r}")

    zero_filled = {n for n in shapes if is_unused_kv_name(n) and tc.is_kv_shared(layer_index(n))}
    mismatch = (set(shapes) - zero_filled) ^ set(state)
    if mismatch:
        raise RuntimeError(f"trained tensors and checkpoint layout disagree: {sorted(mismatch)[:5]}")
    write_checkpoint(out_dir, config, specs, produce, extra_files=extra_files, force=force)


def verify_written(out_dir: Path, windows: list[list[int]], expected_ppl: float) -> None:
    """Reload the written folder with `open_checkpoint` and transformers and check the full model's perplexity."""
    from transformers import Gemma3nForCausalLM

    open_checkpoint(out_dir)
    model, info = Gemma3nForCausalLM.from_pretrained(out_dir, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"transformers did not load every weight of {out_dir}: {info}")
    ppl = perplexity(model, windows)
    if abs(ppl - expected_ppl) > 1e-6 * expected_ppl:
        raise RuntimeError(f"perplexity of the written model is {ppl}, but the trained model gave {expected_ppl}")
