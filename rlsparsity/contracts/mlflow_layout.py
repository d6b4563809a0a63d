"""The MLflow layout every writer and reader shares (docs/DESIGN.md, "MLflow layout").

One experiment per sweep; a parent run per sweep invocation; one nested run per trial;
analysis and diff runs beside them. Run kinds, tag keys, artifact paths and the summary
metric names are spelled here once, so the sweep driver, the learner, the overlap job and
the diff CLI cannot drift apart.
"""

from __future__ import annotations

from typing import Final

# The embedded default: a local SQLite store in the working directory, no server needed.
DEFAULT_TRACKING_URI: Final = "sqlite:///mlruns.db"

# --- tags
KIND_TAG: Final = "rlsparsity.kind"  # one of the kinds below
LABEL_TAG: Final = "rlsparsity.label"  # a trial's label, e.g. grpo/add/s0
GRID_AXES_TAG: Final = "rlsparsity.grid_axes"  # JSON list of the sweep's grid axes
SWEEP_RUN_TAG: Final = "rlsparsity.sweep_run_id"  # on analysis runs: the sweep they analysed
ERROR_TAG: Final = "rlsparsity.error"  # on a FAILED run: what failed
ANALYSIS_TAG: Final = "rlsparsity.analysis"  # on analysis runs: which analysis
MASK_ARTIFACT_TAG: Final = "rlsparsity.mask_artifact"  # on analysis runs: which trial masks
PLUGINS_TAG: Final = "rlsparsity.plugins"  # modules imported in every process of the sweep
SUBNETWORK_TAG: Final = "rlsparsity.subnetwork"  # on masked trials: learned, random_global, ...
SUBNETWORK_SOURCE_TAG: Final = "rlsparsity.subnetwork_source"  # the source trial's run id, or mask file
STAGE_TAG: Final = "rlsparsity.stage"  # on a study's stage sweeps: full, learned, random_global, ...
STAGE_KEY_TAG: Final = "rlsparsity.stage_key"  # hash of the stage's spec: a finished one is reused
SPEC_KEY_TAG: Final = "rlsparsity.spec_key"  # on sweep runs: hash of the spec, checked by --resume
PARENT_TAG: Final = "mlflow.parentRunId"  # MLflow's own nesting tag
# MLflow 3's UI opens an experiment in its GenAI view unless told it holds model training:
# every experiment the platform creates carries this tag, so runs open on metrics and artifacts.
EXPERIMENT_KIND_TAGS: Final = {"mlflow.experimentKind": "custom_model_development"}

# --- run kinds (values of KIND_TAG)
KIND_SWEEP: Final = "sweep"
KIND_TRIAL: Final = "trial"
KIND_ANALYSIS: Final = "analysis"
KIND_DIFF: Final = "diff"
KIND_STUDY: Final = "study"  # a staged subnetwork study; its stages' sweep runs nest under it
KIND_REPORT: Final = "report"  # a reproduction report (`rlsparsity report`)

# Tags every trial run carries besides its kind and label (the factors analyses group by).
TRIAL_FACTOR_TAGS: Final = ("seed", "data_seed", "dataset", "algorithm", "model", "base_hash", "git_commit")
# A hub model's commit (the sha its snapshot was resolved to), on the sweep's and each trial's run.
MODEL_REVISION_TAG: Final = "model_revision"

# --- artifact paths
MASK_DIR: Final = "masks"
OVERLAP_DIR: Final = "overlap"
CLOSENESS_ARTIFACT: Final = "subnetwork/closeness.json"  # a study's RQ2/RQ3 table
REPORT_DIR: Final = "report"
DIFF_DIR: Final = "diff"
# A trial's final weights: a Hugging Face model directory (bf16 view, config, tokenizer).
# Its manifest is uploaded last: a weights directory without one is incomplete.
WEIGHTS_DIR: Final = "weights"
WEIGHTS_MANIFEST: Final = "rlsparsity_weights.json"
WEIGHTS_FORMAT: Final = "rlsparsity.weights/1"


# A trial's masks: the bf16 view's bitwise mask against θ0 directly under MASK_DIR, every
# other series in a folder of its own: one per further criterion (its slug), and the
# dynamics (SINCE_PREV: against the previous mask step; EVER: changed at any step).
BF16_SLUG: Final = "bf16"
SINCE_PREV: Final = "since_prev"
EVER: Final = "ever"
DRIFT_DIR: Final = "drift"
PLOTS_DIR: Final = "plots"


def criterion_slug(spec: str) -> str:
    """A criterion's name in metric keys and artifact folders: bitwise (on the bf16 view) ->
    bf16, masters -> masters, abs:1e-5 -> abs_1e-5 (MLflow keys take no ':')."""
    return BF16_SLUG if spec == "bitwise" else spec.replace(":", "_")


def mask_file_name(step: int | None) -> str:
    """A trial's mask file at `step`; None is the final mask."""
    return "final.arrow" if step is None else f"step_{step:06d}.arrow"


def mask_dir(series: str = BF16_SLUG) -> str:
    """The artifact folder of a mask series: a criterion's slug, SINCE_PREV or EVER."""
    return MASK_DIR if series == BF16_SLUG else f"{MASK_DIR}/{series}"


def mask_artifact_path(step: int | None, series: str = BF16_SLUG) -> str:
    """The artifact path of a trial's mask at `step` (None: the final one) in `series`."""
    return f"{mask_dir(series)}/{mask_file_name(step)}"


# --- metric names
# A trial's summary, logged once at its last step and returned to Tune; `SUMMARY_METRICS`
# is what the sweep's result and its table read.
SUMMARY_METRICS: Final = (
    "test_accuracy_before",
    "test_accuracy_after",
    "test_answer_accuracy_before",
    "test_answer_accuracy_after",
    "test_preference_accuracy_before",
    "test_preference_accuracy_after",
    "train_reward_first",
    "train_reward_last",
    "train_loss_first",
    "train_loss_last",
    "final/sparsity_bf16",
    "final/changed_frac_masters",
    "sync_bytes_total",
    "sync_dense_bytes_total",
    "reward",
)
FINAL_PREFIX: Final = "final/"  # mask metrics of the final checkpoint
