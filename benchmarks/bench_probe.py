"""Cost of probing one checkpoint: the analyzer's path vs a naive TransformerLens path
vs one plain HF forward.

Three ways to get the reference-split metric table of one checkpoint (the model
booted once, outside the timing):

- ``ours``: what ``workbench.analysis.analyzer`` does: ``run_with_cache`` restricted by
  ``names_filter`` to ``blocks.{i}.hook_resid_post`` and ``blocks.{i}.attn.hook_pattern``,
  then ``compute_probe_metrics``, which reads out only the scored positions, in
  chunks, one layer at a time.
- ``naive``: ``run_with_cache`` with no filter (every hook of the model cached), then
  every layer's logits at every position materialised at once as ``(L, N, T, V)``
  and their log-softmax, lens statistics over all positions then masked; the
  attention metrics are the same shared code as ``ours``.
- ``capture``: the first half of ``ours`` alone (the filtered ``run_with_cache`` and
  the read-out check), to separate the cost of TransformerLens from the metric math.
- ``forward``: one plain HF forward (SDPA, no hidden states, no attention): the floor.

Timing: variants interleaved (order rotated each repeat) so that background load hits
them alike; the median of ``--repeats`` is reported with ratios. Memory: peak resident
memory measured in a fresh subprocess per variant: the resident high-water mark
(``VmHWM`` of /proc/self/status; ``ru_maxrss`` elsewhere) after the variant minus the
same after booting the model and running one plain forward (so loading
and library start-up are excluded); on CUDA, ``torch.cuda.max_memory_allocated`` above
the same baseline. ``tracemalloc`` does not see torch's allocations, hence RSS.

Sizes: ``tiny`` = the embedded tiny preset with the character tokenizer; ``32k`` = a
random Qwen3 with hidden 256, 4 layers and a 32,000-token vocabulary. Both use 16
probe prompts of about 64 tokens (prompt 16..32 tokens, left-padded, then the
response).

Usage::

    python benchmarks/bench_probe.py [--sizes tiny 32k qwen3-0.6b] [--repeats 5] [--threads 1] [--device cpu]
        [--json FILE] [--causal]

Each size is first measured against the **floor**: what any correct implementation must
do for the same splits (one forward per split that yields the hidden states and the
attention patterns the attention metrics read, eager attention, ``output_attentions``; one
read-out per layer at the scored positions; the greedy decode with the same sampler), in a
plain HF process,
against the analyzer's ``probe_checkpoint`` (boot excluded) with its stage breakdown
(``workbench.analysis.memory.StageSeconds``: decode, capture, lens, attention, write),
each side in a fresh process for its peak memory; ``--json`` writes those figures.
``qwen3-0.6b`` (Qwen3-0.6B's body, random init, bf16 on disk) is measured only this way.

``--causal`` also measures what the causal analyses add to one checkpoint (a third side in
its own process: the analyzer with early exit at the default exit layers, the learned lens,
and patching from a start model of the same shape and another seed), each in its own stage
(``exit``, ``lens_fit``, ``lens_read``, ``patch``), and the whole against the default probe.

``--threads 1`` (the default) gives the most stable numbers on a shared machine;
``--threads 0`` keeps torch's default thread count.

``--smoke`` runs the same code on the tiny preset with 2 probe prompts, 1 repeat, both
floor sides and then every variant's memory in one subprocess, one after the other (a
check that it runs, not numbers to report).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.presets import preset_config  # noqa: E402
from workbench.analysis.probe_runner import probe_batch  # noqa: E402
from trainer.tokenizer import build_char_tokenizer  # noqa: E402
from workbench.measures import metrics as wm  # noqa: E402
from workbench.analysis.analyzer import bridge_probe_inputs  # noqa: E402
from workbench.analysis.memory import peak_rss_mb  # noqa: E402
from workbench.models.readout import LogitLens  # noqa: E402
from workbench.models.structure import find_readout  # noqa: E402
from workbench.measures.probing import ProbeInputs, _attention_metrics, compute_probe_metrics  # noqa: E402

VARIANTS = ("ours", "capture", "naive", "forward")
N_PROMPTS, SEQ_LEN = 16, 64


def make_config(size: str, tokenizer):
    from transformers import Qwen3Config

    if size == "tiny":
        return preset_config("tiny", tokenizer)
    if size == "32k":
        return Qwen3Config(
            vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    if size == "qwen3-0.6b":  # Qwen3-0.6B's body: 28 layers, 16 heads, 8 KV heads, vocabulary 151,936
        return Qwen3Config(
            vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    raise SystemExit(f"unknown size {size!r} (tiny, 32k, qwen3-0.6b)")


def make_records(vocab: int, seed: int = 0) -> list[dict]:
    """16 probe records of SEQ_LEN tokens: a 16..32-token prompt, then the response."""
    rng = random.Random(seed)
    records = []
    for _ in range(N_PROMPTS):
        prompt_len = rng.randint(16, 32)
        ids = [rng.randrange(4, vocab) for _ in range(SEQ_LEN)]
        records.append({"prompt_ids": [1] + ids[: prompt_len - 1],
                        "reference_ids": ids[prompt_len - 1 : SEQ_LEN - 1] + [2]})
    return records


def setup(size: str, device: str, folder: Path):
    """Save a random model of ``size`` to ``folder``; boot it with HF and TransformerLens."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(size, tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").to(device).eval()
    bridge = TransformerBridge.boot_transformers(  # as the analyzer boots a checkpoint
        str(folder), device=device, dtype=torch.float32,
        tokenizer=AutoTokenizer.from_pretrained(folder),
    )
    bridge.eval()
    batch = probe_batch(make_records(model.config.vocab_size), pad_id=0)
    return hf, bridge, {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def run_ours(bridge, batch):
    return compute_probe_metrics(bridge_probe_inputs(bridge, batch))


@torch.no_grad()
def run_naive(bridge, batch):
    """Cache everything, materialise (L, N, T, V) lens logits, mask at the end."""
    n_layers = bridge.cfg.n_layers
    logits, cache = bridge.run_with_cache(
        batch["input_ids"], attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
    )
    resid = torch.stack([cache[f"blocks.{i}.hook_resid_post"] for i in range(n_layers - 1)])
    lens_logits = torch.cat([bridge.unembed(bridge.ln_final(resid)), logits[None]])  # (L, N, T, V)
    logp = lens_logits.float().log_softmax(-1)  # (L, N, T, V)
    vocab = logp.shape[-1]
    mask = batch["scored"].reshape(-1)
    targets = batch["targets"].reshape(-1)
    final = logp[-1].reshape(-1, vocab)
    lens = {}
    for layer in range(n_layers):
        stats = wm.lens_position_stats(logp[layer].reshape(-1, vocab), final, targets)
        lens[layer] = {k: wm.masked_mean(v.float(), mask) for k, v in stats.items()}
    inputs = ProbeInputs(
        hidden=[cache[f"blocks.{i}.hook_resid_post"] for i in range(n_layers - 1)],
        final_logits=logits, lens=LogitLens.of_bridge(bridge),
        targets=batch["targets"], mask=batch["scored"],
        attentions=[cache[f"blocks.{i}.attn.hook_pattern"] for i in range(n_layers)],
        attention_mask=batch["attention_mask"].bool(),
    )
    return lens, _attention_metrics(inputs, head_match=True)


@torch.no_grad()
def run_forward(hf, batch):
    return hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch["position_ids"]).logits


def call(variant: str, hf, bridge, batch):
    if variant == "ours":
        return run_ours(bridge, batch)
    if variant == "capture":
        with torch.no_grad():
            return bridge_probe_inputs(bridge, batch)
    if variant == "naive":
        return run_naive(bridge, batch)
    return run_forward(hf, batch)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(size: str, device: str, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        hf, bridge, batch = setup(size, device, Path(tmp))
        for variant in VARIANTS:  # warm-up
            call(variant, hf, bridge, batch)
        times = {v: [] for v in VARIANTS}
        for r in range(repeats):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                sync(device)
                start = time.perf_counter()
                call(variant, hf, bridge, batch)
                sync(device)
                times[variant].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return int(peak_rss_mb() * 2**20)  # VmHWM: this process's own peak (workbench.analysis.memory)


def child_memory(size: str, device: str, variants: list[str]) -> None:
    """Print the peak memory of each variant above the post-load baseline (one JSON line
    each). Several variants run one after the other, the peak reset before each (--smoke)."""
    with tempfile.TemporaryDirectory() as tmp:
        hf, bridge, batch = setup(size, device, Path(tmp))
        run_forward(hf, batch)
        for variant in variants:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            elif len(variants) > 1 and Path("/proc/self/clear_refs").exists():
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
            baseline = _peak_bytes(device)
            call(variant, hf, bridge, batch)
            print(json.dumps({"variant": variant, "peak_mib": (_peak_bytes(device) - baseline) / 2**20}), flush=True)


def child_rows(args: list[str]) -> list[dict]:
    """The JSON lines that this script prints when run with ``args`` in a fresh process."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def measure_memory(size: str, device: str, variant: str, threads: int) -> float:
    """The peak MiB of ``variant`` above the loaded model, in a fresh process."""
    rows = child_rows(["--child", variant, "--sizes", size, "--device", device, "--threads", str(threads),
                       "--n-prompts", str(N_PROMPTS)])
    return rows[-1]["peak_mib"]


# ---------------------------------------------------------------------------
# The analyzer against its floor (what any correct implementation must do)
# ---------------------------------------------------------------------------

GREEDY_TOKENS = 32  # greedy split length of the floor measurement
FLOOR_SIDES = ("analyzer", "floor")
#: Sizes measured against the floor only: the naive variant's (L, N, T, V) tensor does not fit.
FLOOR_ONLY = ("qwen3-0.6b",)


def save_model(size: str, folder: Path, seed: int = 0) -> int:
    """A random-init model of ``size`` in ``folder`` (bf16 on disk at real shapes); its vocabulary."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    config = make_config(size, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    if size in FLOOR_ONLY:
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config.vocab_size


def floor_pass(model, records: list[dict], *, max_new_tokens: int, device: str = "cpu") -> dict[str, float]:
    """The floor of one checkpoint's analysis, in a plain HF model loaded with eager attention
    (``attn_implementation="eager"``, so that its forward yields the attention patterns the
    attention metrics read; SDPA never materialises them): the greedy decode with the
    analyzer's sampler, then per split one forward with hidden states and attention patterns
    and one read-out per layer (final norm, unembedding, log-softmax) at the scored positions.
    Returns its stages' seconds (``decode``, ``forward``, ``lens``); CUDA synchronised."""
    from workbench.analysis.probe_runner import greedy_responses, probe_batch, probe_splits

    norm, head = find_readout(model)
    stages = {"decode": 0.0, "forward": 0.0, "lens": 0.0}
    with torch.no_grad():
        t = time.perf_counter()
        greedy = greedy_responses(model, records, pad_id=0, eos_id=2, max_new_tokens=max_new_tokens)
        sync(device)
        stages["decode"] = time.perf_counter() - t
        for _split, split_records, responses in probe_splits(records, greedy=greedy):
            batch = {k: v.to(device) for k, v in probe_batch(split_records, 0, responses).items()}
            t = time.perf_counter()
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], output_hidden_states=True, output_attentions=True)
            sync(device)
            stages["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            scored = batch["scored"]
            for hidden in out.hidden_states[1:-1]:  # one read-out per layer at the scored positions
                head(norm(hidden[scored])).float().log_softmax(-1)
            out.logits[scored].float().log_softmax(-1)
            sync(device)
            stages["lens"] += time.perf_counter() - t
            del out
    return stages


def child_side(side: str, folder: Path, vocab: int) -> None:
    """Probe the model in ``folder`` one way, in this process; print seconds, stages and the
    peak resident memory above the loaded model (JSON). ``causal``: the analyzer with the
    causal analyses on (early exit at the default layers, the learned lens, patching from the
    start model saved beside ``folder``), each in its own stage."""
    records = make_records(vocab)
    if side in ("analyzer", "causal"):
        from workbench.analysis.analyzer import _boot, _patch_table, load_decoder, probe_checkpoint
        from workbench.analysis.early_exit import default_exit_layers
        from workbench.analysis.memory import StageSeconds

        stages = StageSeconds()
        with stages("boot"):
            bridge, tokenizer = _boot(folder, "cpu", torch.float32)
            decoder = load_decoder(folder, "cpu", torch.float32, share_with=bridge.original_model)
            base = _boot(folder.with_name("start"), "cpu", torch.float32)[0] if side == "causal" else None
        n_layers = bridge.cfg.n_layers
        causal = {"exit_layers": default_exit_layers(n_layers, [n_layers // 2]), "learned_lens": True}
        baseline = _peak_bytes("cpu")
        start = time.perf_counter()
        tables = probe_checkpoint(bridge, tokenizer, records, run="bench", step=0, detail_prompts=4, greedy=True,
                                  max_new_tokens=GREEDY_TOKENS, decoder=decoder, stages=stages,
                                  **(causal if side == "causal" else {}))
        if side == "causal":
            with stages("patch"):
                tables["patch"] = _patch_table(base, bridge, decoder, tokenizer, records, run="bench", step=0,
                                               max_new_tokens=GREEDY_TOKENS)
        with stages("write"), tempfile.TemporaryDirectory() as out:
            for kind, table in tables.items():
                table.to_parquet(Path(out) / f"{kind}.parquet")
        seconds = time.perf_counter() - start
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
        baseline = _peak_bytes("cpu")
        start = time.perf_counter()
        stages = floor_pass(model, records, max_new_tokens=GREEDY_TOKENS)
        seconds = time.perf_counter() - start
    peak = (_peak_bytes("cpu") - baseline) / 2**20
    growth = {k: round(v, 1) for k, v in getattr(stages, "peak_growth_mb", {}).items()}
    print(json.dumps({"side": side, "seconds": seconds, "stages": {k: round(v, 3) for k, v in stages.items()},
                      "peak_above_model_mb": round(peak, 1), "peak_rss_mb": round(_peak_bytes("cpu") / 2**20, 1),
                      "peak_growth_mb": growth}))


CAUSAL_STAGES = ("exit", "lens_fit", "lens_read", "patch")  # what --causal adds to a checkpoint's analysis


def _mean_side(runs: list[dict]) -> dict:
    """One side's rounds as one: mean seconds and stage seconds, the largest peaks."""
    out = dict(runs[-1])
    out["seconds"] = statistics.fmean(r["seconds"] for r in runs)
    out["stages"] = {k: round(statistics.fmean(r["stages"].get(k, 0.0) for r in runs), 3) for k in runs[0]["stages"]}
    for key in ("peak_rss_mb", "peak_above_model_mb"):
        out[key] = max(r[key] for r in runs)
    return out


def analyzer_against_floor(size: str, threads: int, smoke: bool = False, causal: bool = False,
                           rounds: int = 1) -> dict:
    """The analyzer's time on one checkpoint of ``size`` against the floor, each side in a fresh
    process: ``ratio_to_floor`` (probing, boot excluded, over the floor), the stage breakdown
    and peak memory. ``rounds`` > 1 runs the two sides in turn, analyzer first then floor
    first (ABBA...), so that a machine that speeds up or slows down during the measurement
    moves both: the seconds and stages are the rounds' means, ``round_ratios`` each round's
    own ratio (the spread). ``smoke``: one process runs both sides and then every variant's
    memory (``child_memory``, the peak reset before each), one after the other:
    ``variant_peak_mib``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        vocab = save_model(size, folder)
        if causal:  # the start model patching patches from: the same shape, another seed
            save_model(size, Path(tmp) / "start", seed=1)
        weights_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
        sides, peaks = {}, {}
        common = ["--folder", str(folder), "--vocab", str(vocab), "--threads", str(threads),
                  "--n-prompts", str(N_PROMPTS)]
        if smoke:
            sides_run = (*FLOOR_SIDES, "causal") if causal else FLOOR_SIDES
            runs = [["--side", ",".join(sides_run), "--child", ",".join(VARIANTS), "--sizes", size]]
        else:
            order = [FLOOR_SIDES if i % 2 == 0 else FLOOR_SIDES[::-1] for i in range(max(1, rounds))]
            runs = [["--side", side] for pair in order for side in pair] + ([["--side", "causal"]] if causal else [])
        for run in runs:
            for row in child_rows([*run, *common]):
                if "side" in row:
                    sides.setdefault(row.pop("side"), []).append(row)
                else:
                    peaks[row["variant"]] = row["peak_mib"]
    probing_s = [a["seconds"] - a["stages"].get("write", 0.0) for a in sides["analyzer"]]
    round_ratios = [round(a / f["seconds"], 3) for a, f in zip(probing_s, sides["floor"])]
    sides = {side: _mean_side(runs_) for side, runs_ in sides.items()}
    analyzer, floor = sides["analyzer"], sides["floor"]
    probing = statistics.fmean(probing_s)
    return {"ratio_to_floor": probing / floor["seconds"], "round_ratios": round_ratios,
            "analyzer_s": probing, "floor_s": floor["seconds"],
            "analyzer_stages": analyzer["stages"], "floor_stages": floor["stages"],
            "peak_rss_mb": analyzer["peak_rss_mb"], "peak_above_model_mb": analyzer["peak_above_model_mb"],
            "peak_growth_mb": analyzer.get("peak_growth_mb", {}),
            "floor_peak_rss_mb": floor["peak_rss_mb"], "weights_mb_on_disk": round(weights_mb, 1),
            "weights_mb": round(weights_mb * (2 if size in FLOOR_ONLY else 1), 1),  # fp32 in memory
            "probe_set": f"{N_PROMPTS} prompts x {SEQ_LEN} tokens, greedy {GREEDY_TOKENS} tokens",
            **({"variant_peak_mib": peaks} if smoke else {}),
            **(_causal_costs(sides["causal"], analyzer) if causal else {})}


def _causal_costs(causal: dict, analyzer: dict) -> dict:
    """What the causal analyses add to one checkpoint's analysis: each one's seconds, and the
    whole (boot and write excluded) over the default probe's."""
    added = {k: causal["stages"].get(k, 0.0) for k in CAUSAL_STAGES}
    default = analyzer["seconds"] - analyzer["stages"].get("write", 0.0)
    whole = causal["seconds"] - causal["stages"].get("write", 0.0)
    return {"causal_stages": causal["stages"], "causal_added_s": added, "causal_s": whole,
            "causal_over_default": whole / default, "causal_peak_rss_mb": causal["peak_rss_mb"]}


def main(argv: list[str] | None = None) -> None:
    global N_PROMPTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "32k"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable numbers on a shared machine;"
                             " 0: leave torch's default, usually one per core)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the analyzer-against-floor figures here")
    parser.add_argument("--n-prompts", type=int, default=N_PROMPTS, help="probe prompts (of SEQ_LEN tokens)")
    parser.add_argument("--floor-rounds", type=int, default=1,
                        help="rounds of the analyzer against the floor, sides in turn (ABBA); means and each round's ratio")
    parser.add_argument("--causal", action="store_true",
                        help="also measure what early exit, the learned lens and patching add to a checkpoint")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny preset, 2 prompts, 1 repeat, fewer subprocesses: checks the code runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # variants, comma-separated
    parser.add_argument("--side", help=argparse.SUPPRESS)  # floor sides, comma-separated
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats, args.n_prompts = ["tiny"], 1, 2
    N_PROMPTS = args.n_prompts
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.side or args.child:  # a child process: the floor sides, then the variants' memory
        for side in args.side.split(",") if args.side else []:
            child_side(side, Path(args.folder), args.vocab)
        if args.child:
            child_memory(args.sizes[0], args.device, args.child.split(","))
        return
    floors = {}
    for size in args.sizes:
        r = floors[size] = analyzer_against_floor(size, args.threads, smoke=args.smoke, causal=args.causal,
                                                  rounds=args.floor_rounds)
        breakdown = ", ".join(f"{k} {v:.2f}" for k, v in r["analyzer_stages"].items())
        floor = ", ".join(f"{k} {v:.2f}" for k, v in r["floor_stages"].items())
        print(f"{size}: analyzer {r['analyzer_s']:.2f} s against floor {r['floor_s']:.2f} s = "
              f"{r['ratio_to_floor']:.2f}x (target 1.3x; rounds {r['round_ratios']}); "
              f"peak RSS {r['peak_rss_mb']:.0f} MB, floor's {r['floor_peak_rss_mb']:.0f} MB "
              f"(weights {r['weights_mb']:.0f} MB); stages: {breakdown}; floor: {floor}")
        growth = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_growth_mb"].items())
        print(f"  peak resident memory raised by each stage (MB): {growth}")
        if args.causal:
            added = ", ".join(f"{k} {v:.2f} s" for k, v in r["causal_added_s"].items())
            print(f"  causal analyses: {r['causal_s']:.2f} s = {r['causal_over_default']:.2f}x the default probe "
                  f"(added: {added}); peak RSS {r['causal_peak_rss_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(floors, indent=2))
    args.sizes = [s for s in args.sizes if s not in FLOOR_ONLY]
    if not args.sizes:
        return
    print(f"device={args.device} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"probe set {N_PROMPTS} x {SEQ_LEN} tokens")
    header = f"{'size':>5} {'variant':>8} {'median s':>9} {'vs forward':>10} {'peak MiB':>9}"
    print(header)
    for size in args.sizes:
        times = time_variants(size, args.device, args.repeats)
        peaks = floors[size]["variant_peak_mib"] if args.smoke else {}  # measured beside the floor
        for variant in VARIANTS:
            peak = peaks[variant] if args.smoke else measure_memory(size, args.device, variant, args.threads)
            print(f"{size:>5} {variant:>8} {times[variant]:9.4f} "
                  f"{times[variant] / times['forward']:9.1f}x {peak:9.1f}")
        print(f"{size:>5} naive / ours = {times['naive'] / times['ours']:.1f}x,"
              f" ours / forward = {times['ours'] / times['forward']:.1f}x")


if __name__ == "__main__":
    main()
