"""Column contracts of the tables that the trainer, analyzer and dashboard share.

Every metric table is *tidy*: one row per value, keyed by
``(run, step, layer, head, ref_layer, metric, split)``.

- ``layer``: 1..L as in docs/metrics.md (output of block l; L = final layer).
- ``head``: attention head index, or ``-1`` for a value over all heads / not per head.
- ``ref_layer``: the other layer of a pairwise value (``attn_js`` matrix,
  ``attn_head_match``), or ``-1``.
- ``split``: ``"reference"`` (teacher-forced reference completions of the probe set),
  ``"greedy"`` (the model's own greedy completions), ``"sampled_correct"`` and
  ``"sampled_wrong"`` (k sampled completions per probe prompt, split by the verifier).
- ``source``: ``"probe"`` (trainer's built-in, HF) or ``"analyzer"`` (TransformerLens).

Also the probes' one default that every entry point shares (:data:`DEFAULT_PROBE_MAX_NEW_TOKENS`).
"""

# Greedy (and sampled) probe completion length when nothing says otherwise: a run records
# its own in run.json (``probe_max_new_tokens``); this is for everything else.
DEFAULT_PROBE_MAX_NEW_TOKENS = 64

METRIC_COLUMNS = ["run", "step", "layer", "head", "ref_layer", "metric", "value", "split", "source"]

# Per-prompt drill-down detail written by the analyzer (bounded number of prompts).
TOPK_COLUMNS = ["run", "step", "prompt", "layer", "position", "k", "token_id", "token", "prob"]
CELL_COLUMNS = ["run", "step", "prompt", "layer", "position", "token", "target", "metric", "value"]
ATTN_COLUMNS = ["run", "step", "prompt", "layer", "head", "query", "key", "weight"]
# Weight drift from the start (workbench/measures/drift.py): one row per (module, block, kind) per checkpoint.
DRIFT_COLUMNS = ["run", "step", "module", "block", "kind", "rel_change", "changed_bf16", "n_params"]

# The learned-lens control (analysis/step-N-lens.parquet): the lens metrics of an intermediate
# layer read through a learned read-out, ``lens`` naming it (docs/metrics.md); the logit lens's
# own rows stay in the metrics table (lens "logit").
LENS_COLUMNS = METRIC_COLUMNS + ["lens"]
# Activation patching across checkpoints (analysis/step-N-patch.parquet): per layer and
# component (block, attn, mlp), the share of the checkpoint's change that patching recovers.
PATCH_COLUMNS = ["run", "step", "layer", "component", "metric", "value", "split"]

# Sampled probe completions (probe_samples.parquet): one row per sequence.
SAMPLE_COLUMNS = ["step", "prompt", "sample", "response_ids", "correct"]

SPLITS = ("reference", "greedy", "sampled_correct", "sampled_wrong")
# The outcome-conditioned pair: a metric's correct-minus-wrong gap is
# value(sampled_correct) - value(sampled_wrong) at the same step and layer.
OUTCOME_SPLITS = ("sampled_correct", "sampled_wrong")
# Rows (layer 0, head -1) giving how many sequences a split holds.
N_SAMPLES = "n_samples"

# Lens metrics per layer (averaged over probe positions).
LENS_METRICS = {
    "lens_kl": ("KL(p^L || p^l), nats (tuned-lens direction)", "lower = closer to final layer"),
    "lens_js": ("JSD(p^l, p^L), nats, bounded by ln 2", "lower = closer to final layer"),
    "top1_agree": ("fraction of positions with argmax p^l == argmax p^L", "higher = closer"),
    "final_rank": ("rank (0 = top) of the final layer's top-1 token under p^l", "lower = closer"),
    "target_rank": ("rank (0 = top) of the actual next token under p^l", "lower = better"),
    "target_nll": ("-log p^l(actual next token), nats", "lower = better"),
    "entropy": ("H(p^l), nats", "lower = more confident"),
    "prediction_depth": ("smallest l with argmax p^m == argmax p^L for all m >= l (mean)", "lower = decided earlier"),
}
ATTN_METRICS = {
    "attn_js_final": ("JSD(mean_h a^l, mean_h a^L) (head=-1), or per head", "lower = looks where the final layer looks"),
    "attn_js": ("JSD(mean_h a^l, mean_h a^m), layer x layer (ref_layer = m)", "lower = more similar"),
    "attn_head_match": ("mean JSD after Hungarian matching of heads of l to heads of m", "lower = more similar"),
    "attn_head_identity": ("mean JSD with heads matched by index (beside attn_head_match)", "lower = more similar"),
    "attn_entropy": ("row entropy / log(number of keys), in [0, 1]", "lower = more focused"),
    "bos_mass": ("attention weight on the first token", "higher = more attention sink"),
}
# Early exit (workbench/analysis/early_exit.py): greedy decoding from blocks 1..l read through
# the final norm and unembedding; split "greedy".
EXIT_METRIC_INFO = {
    "exit_accuracy": ("share of probe prompts answered correctly when exiting after block l", "higher = the layer can do the task"),
    "exit_agree": ("share of probe prompts whose exit answer equals the full model's", "higher = closer to the full model"),
    "exit_length": ("mean completion length (tokens) when exiting after block l", ""),
}
PATCH_METRIC_INFO = {
    "patch_recovered": ("1 - KL(p_B || p_A patched at l) / KL(p_B || p_A)", "1 = the change lives up to here"),
    "patch_recovered_logp": ("share of the answer tokens' log-prob change the patch recovers", "1 = all of it"),
    "patch_kl_base": ("KL(p_B || p_A): how much the checkpoint changed the predictions, nats", ""),
}
METRIC_INFO = {**LENS_METRICS, **ATTN_METRICS, **EXIT_METRIC_INFO, **PATCH_METRIC_INFO}
