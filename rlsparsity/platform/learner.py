"""The learner of one trial, as a component: `setup()`, `step(i)` for i = 1..steps, `finish()`.

It owns the policy (float32 masters), the frozen θ0 reference, the algorithm's side models,
their optimizers and schedules, the bf16 sync state and the mask recorder. It imports
neither Ray nor MLflow: the rollout engines come in as a `Rollout` (Ray actors, or one
in-process engine), metrics and masks go out through a `Sink`. `train_worker` runs it under
Ray Train; tests and `make gpu-check` run it bare.

After every optimizer step rank 0 diffs the bf16 view, sends the changed entries to the
rollout engines, and every k steps writes the bf16 mask against θ0. Under DDP all ranks
hold identical weights, so rank 0 speaks for them; under FSDP every rank diffs and masks
its own rows and rank 0 gathers the changed entries and the mask bits
(`rlsparsity.platform.sharding`), so no rank holds the whole model twice.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from rlsparsity.analysis.drift import Drift, DriftHistogram
from rlsparsity.analysis.rank import RankResult, final_update_rank
from rlsparsity.analysis.tables import write_csv
from rlsparsity.analysis.trial_plots import drift_png, layer_matrix_png, over_steps_png
from rlsparsity.contracts.layers import layer_of, matrix_type
from rlsparsity.contracts.mlflow_layout import (
    DRIFT_DIR,
    EVER,
    FINAL_PREFIX,
    PLOTS_DIR,
    SINCE_PREV,
    WEIGHTS_DIR,
    WEIGHTS_MANIFEST,
    mask_file_name,
)
from rlsparsity.platform.algorithms import Models, get_algorithm
from rlsparsity.platform.algorithms.common import forward_chunks, logprobs_no_grad
from rlsparsity.platform.engines import Rollout
from rlsparsity.platform.evaluation import (
    first_last,
    held_out_pairs,
    preference_accuracy,
    served_accuracy,
)
from rlsparsity.platform.learner_state import LearnerParts, load_state, save_state
from rlsparsity.platform.mask_recorder import MaskRecorder, Recorded
from rlsparsity.platform.micro_batches import accumulate_gradients
from rlsparsity.platform.models import load_model, load_tokenizer, tied_groups
from rlsparsity.platform.models.saving import save_bf16_model, weights_choice, write_manifest
from rlsparsity.platform.optimization import Optimized, lr_schedule, make_optimizer, minibatch_rows
from rlsparsity.platform.sharding import Layout, Ranks, full_state_dict, local
from rlsparsity.platform.sources import StepContext, formatted, get_source
from rlsparsity.platform.subnetwork import SubnetworkMask, build_mask
from rlsparsity.platform.tasks import REWARDS, get_task
from rlsparsity.platform.trial_spec import TrialSpec
from rlsparsity.platform.weight_sync import Bf16SyncState, choose_patch, patch_tensors


class Sink(Protocol):
    """Where rank 0 sends metrics and mask files (the trial's MLflow run, or a folder)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path, artifact_dir: str) -> None: ...

    def log_artifacts(self, path: Path, artifact_dir: str) -> None: ...


@dataclass
class LocalSink:
    """Metrics in memory and artifacts copied under `root`: for a learner run without MLflow."""

    root: Path
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: Path, artifact_dir: str) -> None:
        dest = Path(self.root) / artifact_dir
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / Path(path).name)

    def log_artifacts(self, path: Path, artifact_dir: str) -> None:
        shutil.copytree(path, Path(self.root) / artifact_dir, dirs_exist_ok=True)


class Learner:
    """One trial's learner on one rank. `rollout` is built from the weights the engines serve
    (a restarted Ray actor is resynced from them; None on a rank that does not hold them
    whole); `wrap` prepares a trained module for DDP or FSDP, `wrap_frozen` the reference."""

    def __init__(
        self,
        spec: TrialSpec,
        model_path: str | Path,
        *,
        base: dict[str, Any],
        rollout: Callable[[list[tuple[str, torch.nn.Parameter]]], Rollout],
        sink: Sink | None = None,
        target: dict[str, Any] | None = None,
        rank: int = 0,
        world: int = 1,
        threads: int = 1,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        wrap_frozen: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        subnetwork_mask: str | Path | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.spec, self.model_path, self.base = spec, str(model_path), base
        self.make_rollout, self.sink, self.target = rollout, sink, dict(target or {})
        self.rank, self.world, self.threads = rank, world, threads
        self.wrap = wrap or (lambda m: m)
        self.wrap_frozen = wrap_frozen or (lambda m: m)
        self.subnetwork_mask = subnetwork_mask  # the source mask file of training.subnetwork
        # Where the models train (Ray Train's `get_device()` under Ray); every model, batch,
        # the sync state and the recorder live there, and only patches and packed mask bits
        # come back to the host.
        self.device = torch.device(device or "cpu")
        self.leader = rank == 0
        self.step_done = 0

    # ----------------------------------------------------------------------------- setup
    def setup(self, resume_from: str | Path | None = None) -> None:
        """Build the models, optimizers and engines at θ0, then either measure θ0 (a fresh
        start) or load a `save_state` folder and continue after its step."""
        spec, t = self.spec, self.spec.training
        torch.set_num_threads(self.threads)
        torch.manual_seed(spec.seed)
        self.tok = load_tokenizer(self.model_path)
        self.task = get_task(spec.dataset)
        self.algo = get_algorithm(spec.algorithm)
        self.source = get_source(self.algo.source)
        self.acfg = spec.algo_config

        # fp32: float32 masters whose bf16 view the engines hold; bf16: the weights are bf16.
        policy = load_model(self.model_path, dtype=torch.bfloat16 if t.precision == "bf16" else torch.float32)
        policy.to(self.device)
        with torch.no_grad():  # θ0 is the bf16 view of the checkpoint, as the rollout engines hold it
            for p in policy.parameters():
                p.copy_(p.to(torch.bfloat16))
        self.policy, tied = policy, tied_groups(policy)
        # One frozen θ0 per learner serves every use (KL penalty, DPO's reference, PRIME's PRM).
        reference = copy.deepcopy(policy).eval().requires_grad_(False) if t.kl_coef > 0 or self.algo.uses_reference else None
        if t.gradient_checkpointing:  # after the reference's copy, which never runs a backward
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.train()  # transformers checkpoints only in train mode
        aux = self.algo.aux(policy, self.acfg, t) if self.algo.aux else {}
        for a in aux.values():
            a.module.to(self.device)  # a side model's new layers (PPO's value head) start on the CPU
        self.aux_modules = {k: a.module for k, a in aux.items()}
        self.models = Models(self.wrap(policy), None if reference is None else self.wrap_frozen(reference),
                             {k: self.wrap(a.module) for k, a in aux.items()})
        # After wrapping: FSDP replaces the parameters with sharded ones (DTensors).
        self.named = list(policy.named_parameters())
        self.local = [(n, local(p)) for n, p in self.named]  # this rank's rows: all of them unless sharded
        self.sharded = any(local(p) is not p for _, p in self.named)
        self.layout = Layout.of(self.named, self.rank, self.world, self.sharded)
        self.ranks = Ranks(self.rank, self.world, self.device, self.sharded)
        self.keeps_state = self.leader or self.sharded  # the ranks that diff and mask (their rows)
        self.save_weights = weights_choice(t, sum(p.numel() for _, p in self.named))
        self.subnet = None
        if t.subnetwork is not None:
            masks = build_mask(t.subnetwork, self.named, mask_path=self.subnetwork_mask, base=self.base, tied=tied)
            self.subnet = SubnetworkMask(self.named, masks)
        # The policy's optimizer first, then each side model's own.
        # A subnetwork's weight decay is applied at its entries only, outside the optimizer.
        # The optimizer axis is the policy's: side models keep their own AdamW settings.
        trained = [(policy, t.lr, 0.0 if self.subnet else t.weight_decay, t.max_grad_norm, None)]
        trained += [(a.module, a.lr, a.weight_decay, a.max_grad_norm, "adamw") for a in aux.values()]
        self.optimized = []
        for module, lr, wd, max_norm, kind in trained:
            opt = make_optimizer(list(module.parameters()), lr, wd, t, kind)
            self.optimized.append(Optimized(list(module.parameters()), opt, lr_schedule(opt, t), max_norm))
        self.shuffle = torch.Generator().manual_seed(spec.seed)
        self.curves: dict[str, list[float]] = {"reward": [], "loss": []}  # for the first-vs-last summary
        self.sync_bytes = self.dense_bytes = 0
        self.history: list[Recorded] = []  # every mask step's counts, for the curves over steps
        if self.keeps_state:
            self.sync_state = Bf16SyncState(self.local)
            self.recorder = MaskRecorder(self.local, base=self.base, tied=tied,
                                         criteria=t.masks.parsed_criteria(), dynamics=t.masks.dynamics)
        if self.leader:
            self.test = formatted(self.task.problems("test", t.eval_problems, seed=10_000), spec, self.task, self.tok)
        if resume_from is not None:
            self._restore(Path(resume_from))
        self.rollout = self.make_rollout(self._served())
        # The engines may hold other weights: a restarted learner's actors kept training's.
        self.rollout.reset(self.step_done)
        if resume_from is None:
            if self.leader:
                self.before = self.evaluate()
                self.pref_pairs = held_out_pairs(self.rollout, self.tok, self.test, t.max_new_tokens, REWARDS[t.reward])
            if self.keeps_state:  # sharded, the forwards are collective: every rank measures
                self.pref_pairs = self.ranks.broadcast_json(self.pref_pairs if self.leader else None)
                accuracy = preference_accuracy(policy, self.tok, self.pref_pairs)
            if self.leader:
                self.before["test_preference_accuracy"] = accuracy
                self.before["test_preference_pairs"] = len(self.pref_pairs)
                self._log({f"{k}_before": v for k, v in self.before.items()}, step=0)

    def _served(self) -> list[tuple[str, torch.Tensor]] | None:
        """The weights a restarted rollout actor is resynced from: the policy's parameters, or
        sharded (a collective), rank 0's host copy of the bf16 view that every sync patches."""
        if not self.sharded:
            return self.named
        served = self.ranks.host_bf16(self.named, self.local)
        self.served = dict(served or [])
        return served

    def _state_parts(self) -> LearnerParts:
        aux = {f"aux.{k}": [(n, local(p)) for n, p in m.named_parameters()] for k, m in self.aux_modules.items()}
        return LearnerParts({"policy": self.local, **aux}, [o.optimizer for o in self.optimized],
                            [o.schedule for o in self.optimized], {"shuffle": self.shuffle},
                            self.recorder.state_tensors() if self.keeps_state else {})

    def save_state(self, directory: str | Path) -> None:
        """Rank 0 (sharded: every rank, its own rows): everything a restarted learner needs
        to continue after `step_done`."""
        extra = {
            "curves": self.curves, "sync_bytes": self.sync_bytes, "dense_bytes": self.dense_bytes,
            "before": self.before, "pref_pairs": self.pref_pairs, "history": [r.to_json() for r in self.history],
        } if self.leader else None
        shard = (self.rank, self.world) if self.sharded else None
        save_state(Path(directory), self._state_parts(), step=self.step_done, label=self.spec.label, extra=extra, shard=shard)

    def _restore(self, directory: Path) -> None:
        shard = (self.rank, self.world) if self.sharded else None
        step, extra = load_state(directory, self._state_parts(), label=self.spec.label, steps=self.spec.training.steps, shard=shard)
        self.step_done = step
        if self.keeps_state:
            self.pref_pairs = [tuple(pair) for pair in extra["pref_pairs"]]
            self.sync_state = Bf16SyncState(self.local)  # what the engines get in full next
        if self.leader:
            self.curves, self.before = extra["curves"], extra["before"]
            self.sync_bytes, self.dense_bytes = extra["sync_bytes"], extra["dense_bytes"]
            self.history = [Recorded.from_json(r) for r in extra["history"]]
            self._log({"resumed_from_step": float(step)}, step=step)

    def evaluate(self) -> dict[str, float]:
        t = self.spec.training
        return served_accuracy(self.rollout, self.tok, self.test, t.max_new_tokens, REWARDS[t.reward])

    # ------------------------------------------------------------------------------ step
    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (or PPO-style epochs × minibatches of them); rank 0 then syncs
        the engines and records. Returns the step's metrics."""
        t0 = time.perf_counter()
        ctx = StepContext(self.spec, step, self.rank, self.world, self.rollout, self.tok, self.task)
        batch, metrics = self.source(ctx)
        batch = batch.to(self.device)
        acfg, updates = self.acfg, self.acfg.epochs * self.acfg.minibatches
        with torch.no_grad(), self._autocast():
            if updates > 1 and batch.tokens is not None:  # the behaviour policy of later passes
                batch.old_logps = logprobs_no_grad(self.policy, batch.tokens, forward_chunks(len(batch), acfg, self.spec.training))
            if self.algo.prepare:
                batch = self.algo.prepare(self.models, batch, acfg, self.spec.training)
        zero_weight = metrics.get("pairs", 1) == 0  # a stand-in batch that must change nothing
        records = self.keeps_state and (step % self.spec.training.masks.every == 0 or step == self.spec.training.steps)
        # The drift diagnostic needs the last step's update: keep the weights before it.
        before = {n: p.detach().clone() for n, p in self.local} if records and self.spec.training.masks.drift else None
        for _ in range(acfg.epochs):
            for rows in minibatch_rows(len(batch), acfg.minibatches, batch.group_size, self.shuffle):
                minibatch = batch.select(rows) if updates > 1 else batch
                loss, loss_metrics = accumulate_gradients(self.algo, self.models, minibatch, acfg, self.spec.training,
                                                          scale=0.0 if zero_weight else 1.0, autocast=self._autocast)
                metrics.update(self._update())
        for o in self.optimized:
            o.schedule.step()
        metrics.update(loss=loss.item(), lr=self.optimized[0].schedule.get_last_lr()[0], **loss_metrics)
        self.step_done = step
        if self.keeps_state:
            metrics.update(self._sync(step))
            if records:
                metrics.update(self._record(step, before))
        if self.leader:
            metrics["rollout_restarts"] = self.rollout.restarts
            metrics["step_time_s"] = time.perf_counter() - t0
            self._log(metrics, step)
            for key, curve in self.curves.items():
                if key in metrics:
                    curve.append(metrics[key])
        return metrics

    def _autocast(self) -> contextlib.AbstractContextManager:
        """precision amp: the forward passes in bf16 autocast over float32 masters (the
        backward runs in the dtypes autocast chose); otherwise nothing."""
        if self.spec.training.precision == "amp":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _update(self) -> dict[str, float]:
        """Clip and step every optimizer on the accumulated gradients, then clear them."""
        if self.subnet is not None:
            self.subnet.mask_grads()
        norms = {}
        for i, o in enumerate(self.optimized):
            if o.max_grad_norm is not None:  # sharded, the norm is a DTensor: local() is its whole value
                norm = torch.nn.utils.clip_grad_norm_(o.params, o.max_grad_norm)
                norms["grad_norm" if i == 0 else f"grad_norm_aux{i}"] = local(norm).item()
            if i == 0 and self.subnet is not None:
                self.subnet.decay(o.optimizer.param_groups[0]["lr"], self.spec.training.weight_decay)
            o.optimizer.step()
            o.optimizer.zero_grad(set_to_none=True)
        return norms

    def _sync(self, step: int) -> dict[str, float]:
        r = self.spec.rollout.sync
        t_diff = time.perf_counter()
        patch = self.sync_state.diff(self.local, on_changed=self.recorder.mark_changed)
        if self.sharded:  # rank 0 gets every rank's changed rows
            patch = self.ranks.gather_patch(patch, self.local, self.layout, r.mode, r.dense_above)
            if patch is None:
                return {}
            patch_tensors(self.served, patch)  # what a restarted actor gets
        else:
            patch = choose_patch(patch, self.named, r.mode, r.dense_above)
        t_send = time.perf_counter()
        self.rollout.sync(patch, version=step)
        self.sync_bytes += patch.nbytes
        self.dense_bytes += patch.dense_bytes
        # diff: the learner finding the changed bf16 entries; send: object store, apply in
        # every engine and the round trip, until all engines hold the new weights.
        return {
            "sync_bytes": patch.nbytes, "sync_dense_bytes": patch.dense_bytes,
            "step_changed_frac_bf16": patch.changed / (patch.dense_bytes / 2),
            "sync_diff_s": t_send - t_diff, "sync_send_s": time.perf_counter() - t_send,
        }

    def _record(self, step: int, before: dict[str, torch.Tensor] | None) -> dict[str, float]:
        """Rank 0 at a mask step: every mask series (and its table), the drift diagnostic."""
        final = step == self.spec.training.steps
        gather = (lambda bits, names: self.ranks.gather_bits(bits, names, self.layout)) if self.sharded else None
        with tempfile.TemporaryDirectory(prefix="rlsparsity-mask-") as workdir:
            recorded, files = self.recorder.record(self.local, Path(workdir), step, final=final, target=self.target,
                                                   shapes=self.layout.shapes, gather=gather)
            if before is not None:
                files += self._drift(step, before, Path(workdir))
            if not self.leader:
                return {}
            self._log_all(files)
        self.history.append(recorded)
        metrics = recorded.metrics()
        if before is not None:
            metrics.update(self.last_drift.metrics())
        if self.subnet is not None:
            self.check_subnetwork()
            metrics["subnetwork_density"] = self.subnet.density
        return metrics

    def _drift(self, step: int, before: dict[str, torch.Tensor], workdir: Path) -> list[tuple[Path, str]]:
        drift = Drift(step)
        for name, p in self.local:
            drift.add(self.recorder.base_bf16(name), before[name], p.detach())
        drift.set_counts(self.ranks.sum_ints(drift.counts()))  # sharded: every rank's rows
        if not self.leader:
            return []
        self.last_drift = drift
        stem = Path(mask_file_name(None if step == self.spec.training.steps else step)).stem
        table = write_csv(drift.table_rows(), workdir / DRIFT_DIR / f"{stem}.csv")
        png = drift_png(DriftHistogram.labels(), [drift.since_theta0.zero, *drift.since_theta0.bins],
                        [drift.last_step.zero, *drift.last_step.bins], workdir / DRIFT_DIR / f"{stem}.png",
                        title=f"{self.spec.label}, step {step}: distance from changing the bf16 view")
        return [(table, DRIFT_DIR), (png, DRIFT_DIR)]

    def _log_all(self, files: list[tuple[Path, str]]) -> None:
        """Offer every file to the sink before raising the first failure: a sink that keeps
        what it cannot send (the tracker's spool, with its server down) then keeps the whole
        mask step, not only the file that met the outage (the rest were lost before)."""
        if self.sink is None:
            return
        failed: list[BaseException] = []
        for path, artifact_dir in files:
            try:
                self.sink.log_artifact(path, artifact_dir)
            except Exception as e:  # noqa: BLE001 - re-raised below, once every file was offered
                failed.append(e)
        if failed:
            raise failed[0]

    def check_subnetwork(self) -> None:
        """Rank 0: fail the trial if any policy entry outside the subnetwork left θ0."""
        theta0 = self.recorder.base_master
        for view in (None, torch.bfloat16):
            moved = self.subnet.outside_changes(theta0, view)
            if moved:
                where = "float32 masters" if view is None else "bf16 view"
                raise RuntimeError(f"subnetwork training moved entries outside the mask in the {where}: {moved}")

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.sink is not None:
            self.sink.log_metrics(metrics, step)

    # ---------------------------------------------------------------------------- finish
    def finish(self) -> dict[str, float]:
        """Rank 0: the trial's summary (held-out accuracy after, first vs last curves, sync
        totals, final mask metrics), logged at the last step and returned. Other ranks: {}
        (sharded, they take part in the collective forwards and gathers first)."""
        if not self.keeps_state:
            return {}
        t = self.spec.training
        accuracy = preference_accuracy(self.policy, self.tok, self.pref_pairs)
        rank = self._update_rank()
        weights_bytes = self._save_weights() if self.save_weights == "final" else None
        if not self.leader:
            return {}
        after = self.evaluate()
        after["test_preference_accuracy"] = accuracy
        summary = {f"{k}_before": v for k, v in self.before.items()}
        summary.update({f"{k}_after": v for k, v in after.items()})
        for key, curve in self.curves.items():
            if curve:
                summary[f"train_{key}_first"], summary[f"train_{key}_last"] = first_last(curve)
        summary.update(sync_bytes_total=self.sync_bytes, sync_dense_bytes_total=self.dense_bytes)
        summary.update(self.history[-1].metrics(FINAL_PREFIX))
        summary.update(self._final_figures(rank))
        if weights_bytes is not None:
            summary["weights_bytes"] = weights_bytes
        self._log({k: v for k, v in summary.items() if not k.endswith("_before")}, step=t.steps)
        return summary

    def _update_rank(self) -> RankResult | None:
        """The update rank of the final bf16 view (the paper's Table 2), on rank 0. Sharded,
        each matrix and its θ0 are gathered whole in turn, on every rank (a collective)."""
        if not self.sharded:
            return final_update_rank(self.recorder.base_bf16, self.named) if self.leader else None
        return self.ranks.update_rank(self.named, self.local, self.recorder.base_bf16)

    def _final_figures(self, rank: RankResult) -> dict[str, float]:
        """Rank 0 at the end: the per-layer × matrix sparsity of every criterion, the curves
        over mask steps, and the update rank of the final checkpoint."""
        last, label = self.history[-1], self.spec.label
        key = lambda n: (layer_of(n), matrix_type(n))  # noqa: E731
        criteria = [c.slug for c in self.recorder.criteria]
        steps = [r.step for r in self.history]
        with tempfile.TemporaryDirectory(prefix="rlsparsity-plots-") as workdir:
            out = Path(workdir)
            layer_matrix_png({s: {k: 1 - c / n for k, (c, n) in last.series[s].grouped(key).items()} for s in criteria},
                             out / "layer_matrix_sparsity.png", title=f"{label}: sparsity per layer and matrix")
            over_steps_png(steps, {s: [1 - r.series[s].changed_frac for r in self.history] for s in criteria},
                           out / "sparsity_over_steps.png", title=f"{label}: sparsity by criterion")
            if self.recorder.dynamics:
                over_steps_png(steps, {s: [r.series[s].changed_frac for r in self.history] for s in (SINCE_PREV, EVER)},
                               out / "dynamics_over_steps.png", ylabel="% of entries changed",
                               title=f"{label}: changed since the previous mask step, and ever changed")
            (out / "update_rank.json").write_text(json.dumps(rank.to_dict(), indent=1))
            self._log_all([(f, PLOTS_DIR) for f in sorted(out.iterdir())])
        return {} if rank.mean is None else {f"{FINAL_PREFIX}update_rank_frac": rank.mean}

    def _save_weights(self) -> float:
        """Log the final bf16 view as a Hugging Face directory; its manifest goes last, so
        a reader never takes a partly uploaded directory for a complete one. Sharded, the
        weights are first gathered whole onto rank 0's host (a collective)."""
        model = self.policy
        if self.sharded:
            state = full_state_dict(self.policy)
            if not self.leader:
                return 0.0
            model = load_model(self.model_path, dtype=torch.float32)
            model.load_state_dict(state)
        if self.sink is None:
            return 0.0
        with tempfile.TemporaryDirectory(prefix="rlsparsity-weights-") as workdir:
            model_dir = Path(workdir) / WEIGHTS_DIR
            files = save_bf16_model(model, self.tok, model_dir)
            info = {"base": self.base, "target": {**self.target, "step": self.step_done}}
            if self.subnet is not None:
                info["subnetwork"] = {"kind": self.spec.training.subnetwork.kind, "density": self.subnet.density}
            manifest = write_manifest(files, model_dir, Path(workdir) / WEIGHTS_MANIFEST, info)
            self.sink.log_artifacts(model_dir, WEIGHTS_DIR)
            self.sink.log_artifact(manifest, WEIGHTS_DIR)
            return float(sum(f.stat().st_size for f in files))


def run_learner(
    learner: Learner,
    *,
    after_step: Callable[[int, dict[str, float]], None] | None = None,
    resume_from: str | Path | None = None,
) -> dict[str, float]:
    """The whole recipe: setup, every step, finish. `after_step(step, metrics)` runs on
    every rank after each step (Ray Train's barrier, progress reports and checkpoints);
    `resume_from` is a `Learner.save_state` folder to continue from."""
    learner.setup(resume_from)
    metrics: dict[str, float] = {}
    for step in range(learner.step_done + 1, learner.spec.training.steps + 1):
        metrics = learner.step(step)
        if after_step is not None:
            after_step(step, metrics)
    return {**metrics, **learner.finish()}
