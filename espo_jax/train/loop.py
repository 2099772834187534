"""The RL loop: rollout -> rewards -> scoring pass -> advantages -> updates -> eval -> checkpoint.

One step k (k = 1..num_steps), everything derived from (seed, k):
  1. prompts: the k-th block of ``prompts_per_step`` from a seeded per-epoch permutation of
     the training set;
  2. G responses per prompt under the current policy (pi_old),
     key = fold_in(PRNGKey(seed), k); DAPO dynamic sampling drops prompt groups with equal
     rewards and refills from seeded extra draws (bounded tries);
  3. rewards (+ DAPO overlong shaping);
  4. scoring pass: old log-probs and old-policy entropy at the sampling temperature
     (+ reference log-probs when train.beta > 0); then, once per rollout, the
     sampler-vs-scorer check, ESPO's entropy groups and the rollout-correction weights
     (``score_phase``);
  5. advantages (objectives.compute_advantages);
  6. num_epochs x num_minibatches jitted updates (exact micro-batch accumulation); update
     u = epoch * num_minibatches + j records ``minibatch{u}/...`` (clip fractions, ratio
     deviation); update 0 is on-policy (``first_minibatch/ratio_dev_max`` ~ 0);
  7. the metrics record ``step = k``; greedy eval every eval.every steps (also at step 0,
     before the first update, and after the last); checkpoint every checkpoint.every steps
     and at the end. A workdir with a checkpoint resumes from it; SIGTERM finishes the
     current step, checkpoints and returns.

``run`` reads top to bottom in banner sections (set-up, restore, then per step: rollout,
score, update, evaluate, checkpoint; finish); the values it passes along are typed
(``batches.RolloutBatch`` -> ``batches.ScoredBatch`` -> minibatches). Steps 1-3 live in
``rollout_phase``, the once-per-rollout extras of step 4 in ``score_phase``, loading in
``setup``, checks in ``validate``, the final export in ``export``.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from espo_jax.objectives import compute_advantages
from espo_jax.rollout.engine import engine_kwargs
from espo_jax.rollout.engine_sharding import decode_model, sharded_engine_fn
from espo_jax.train import checkpoint as ckpt_lib
from espo_jax.train import mesh as mesh_lib
from espo_jax.train import packing
from espo_jax.train import report, writers
from espo_jax.train import resume as resume_lib
from espo_jax.train import validate as validate_lib
from espo_jax.train.batches import ScoredBatch
from espo_jax.train.distributed import device_put_global, setup_distributed, to_host
from espo_jax.train.evaluate import evaluate
from espo_jax.train.export import export_final_policy
from espo_jax.train.optim import learning_rate_schedule, make_optimizer
from espo_jax.train.preemption import StopSignal
from espo_jax.train.rollout_phase import PromptOrder, PromptSource, collect
from espo_jax.train.score_phase import score_extras
from espo_jax.train.setup import load_policy, objective_hparams
from espo_jax.train.state import create_state, state_shardings
from espo_jax.train.step import make_score_fn, make_train_step
from espo_jax.train.tasks import build_task, stop_token_ids


class NonFiniteError(RuntimeError):
    """Raised after train.max_nonfinite_in_a_row non-finite updates in a row."""


def run(config, workdir) -> dict:
    """Train according to ``config`` in ``workdir`` (resuming from its checkpoint if any).
    Returns a small summary dict (steps done, eval accuracies, wall time, stop reason)."""
    t_start = time.perf_counter()
    # ------------------------------------------------------------------------ set-up --
    setup_distributed(config)
    workdir = writers.workdir_path(workdir)  # local or gs://, never a local "gs:" dir
    # Everything a config can get wrong fails here, before weights or data are loaded.
    validate_lib.validate(config, num_devices=jax.device_count(), workdir=workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=int(config.checkpoint.keep))
    latest = ckpt.latest_step()
    changes = resume_lib.check(workdir, config, latest) if latest is not None else {}
    config_name = None
    if jax.process_index() == 0 and (latest is None or changes):
        config_name = resume_lib.save_config(workdir, config, latest)

    mesh = mesh_lib.make_mesh(config.mesh)
    task = build_task(config.task, int(config.seed), eval_seed=int(config.eval.seed))
    model, tok = load_policy(config, mesh)
    tx = make_optimizer(config.train)
    with_ref = config.train.beta > 0
    shardings = state_shardings(model, tx, mesh, with_ref=with_ref,
                                param_shardings_fn=mesh_lib.param_shardings,
                                opt_shardings_fn=mesh_lib.opt_state_shardings)
    state = create_state(model, tx, with_ref=with_ref, shardings=shardings)
    vocab = int(model.config.vocab_size)
    del model

    chunk, temp = int(config.score.chunk_size), float(config.rollout.temperature)
    micro = validate_lib.micro_batch_size(config, mesh_lib.batch_divisor(mesh))
    batch_sh = mesh_lib.batch_sharding(mesh)
    hparams = objective_hparams(config, vocab)
    replay = bool(config.model.routing_replay)
    # Traced under the mesh so activations can be pinned to the batch axes.
    score_fn = mesh_lib.under_mesh(make_score_fn(
        state.graphdef, chunk_size=chunk, temperature=temp, micro_batch_size=micro,
        param_shardings=shardings.params, rest_shardings=shardings.rest,
        batch_sharding=batch_sh), mesh)
    train_step = mesh_lib.under_mesh(make_train_step(
        tx, config.objective.name, hparams, chunk_size=chunk, temperature=temp,
        micro_batch_size=micro, state_shardings=shardings, batch_sharding=batch_sh,
        routing_replay=replay, moe_aux_loss_coef=float(config.train.moe_aux_loss_coef)), mesh)
    lr_schedule = learning_rate_schedule(float(config.train.lr), int(config.train.warmup_steps))
    decode_fn = mesh_lib.sharded_decode_fn(mesh)
    budget = int(config.train.max_tokens_per_row)

    def packed(arrays):
        """train.max_tokens_per_row > 0: the packed rows of a (mini)batch (``train.packing``),
        in micro-batches of (micro-batch size) rows, balanced over micro-batches and batch
        devices by token count; else None. A packed row costs what one unpacked sequence of
        max_tokens_per_row tokens costs, so the micro-batch memory is unchanged."""
        if budget <= 0:
            return None
        return packing.pack(arrays["prompt_tokens"], arrays["prompt_mask"], arrays["tokens"],
                            arrays["mask"], max_tokens_per_row=budget, rows_per_micro=micro,
                            num_devices=mesh_lib.batch_divisor(mesh)).arrays()
    prompts = PromptSource(config=config, task=task, tokenizer=tok,
                           order=PromptOrder(len(task.train), int(config.seed)),
                           stop_ids=tuple(stop_token_ids(tok, config.model.path)),
                           decode_fn=decode_fn, engine_fn=sharded_engine_fn(mesh),
                           batch_devices=mesh_lib.batch_divisor(mesh))
    eval_key = jax.random.fold_in(jax.random.PRNGKey(int(config.eval.seed)), 2**30)

    def to_device(tree):
        """Host arrays (the same full batch on every host) -> global device arrays: each
        process copies the rows its own devices hold (any device order)."""
        return device_put_global(tree, mesh)

    def run_eval(step):
        t = time.perf_counter()
        m = evaluate(state.compute_model(), task, tok, config,
                     key=jax.random.fold_in(eval_key, step), decode_fn=decode_fn)
        m["time_eval_s"] = time.perf_counter() - t
        return m

    # ----------------------------------------------------------------------- restore --
    restored = ckpt.restore(state)
    start, nonfinite_run = 0, 0
    if restored is not None:
        start, state, meta = restored
        nonfinite_run = int(meta.get("nonfinite_in_a_row", 0))
        print(f"Resuming from checkpoint at step {start} in {ckpt.directory}", flush=True)
    writer = writers.MetricWriter(workdir, tensorboard=bool(config.log.tensorboard))
    writer.truncate_after(start)
    if restored is not None and start < int(config.num_steps):
        writer.write_event(resume_lib.record(changes, start, config_name))

    num_steps = int(config.num_steps)
    max_nonfinite = int(config.train.max_nonfinite_in_a_row)
    last_eval = {}
    if start == 0:
        last_eval = run_eval(0)
        writer.write(0, last_eval)
    stop_reason = None
    step = start
    bar = _progress(config, start, num_steps)
    # The engine's slots (rollout.max_concurrent[_per_device]); 0: one static batch.
    slots = engine_kwargs(config.rollout, prompts.batch_devices)["max_concurrent"] or 0
    with StopSignal() as stop:
        for step in range(start + 1, num_steps + 1):
            t0 = time.perf_counter()
            # ------------------------------------------------------------- rollout --
            policy = state.compute_model()  # one compute-dtype copy per rollout
            if slots:
                policy = decode_model(policy)  # TP-only (else replicated) decode weights
            rollout, rollout_info = collect(prompts, policy, step)
            del policy
            t1 = time.perf_counter()

            # --------------------------------------------------------------- score --
            pt, pm, tk = to_device((rollout.prompt_tokens, rollout.prompt_mask, rollout.tokens))
            # MoE routing replay: pi_old on the experts the sampler used.
            routed = (to_device(rollout.routed_experts)
                      if replay and rollout.routed_experts is not None else None)
            pack = packed(dict(prompt_tokens=rollout.prompt_tokens, mask=rollout.mask,
                               prompt_mask=rollout.prompt_mask, tokens=rollout.tokens))
            pack = None if pack is None else to_device(pack)
            old_logp, entropy = score_fn(state.params, state.rest, pt, pm, tk, routed, pack)
            ref_logp = (score_fn(state.ref_params, state.rest, pt, pm, tk, routed, pack)[0]
                        if with_ref else None)
            adv = compute_advantages(jnp.asarray(rollout.rewards), int(config.rollout.group_size),
                                     estimator=config.advantage.estimator,
                                     gradable=jnp.asarray(rollout.gradable),
                                     valid_only=bool(config.advantage.valid_only))
            old_logp, entropy = to_host(old_logp), to_host(entropy)
            extra, score_metrics = score_extras(config, hparams, rollout.mask,
                                                rollout.sampler_logp, old_logp, entropy)
            scored = ScoredBatch(rollout=rollout, old_logp=old_logp, entropy=entropy,
                                 advantages=to_host(adv),
                                 ref_logp=None if ref_logp is None else to_host(ref_logp),
                                 groups=extra.get("groups"), is_weights=extra.get("is_weights"))
            t2 = time.perf_counter()

            # -------------------------------------------------------------- update --
            last_logp = np.zeros_like(old_logp)
            updates = []
            for _, rows, arrays in scored.minibatches(
                    seed=int(config.seed), step=step, num_epochs=int(config.train.num_epochs),
                    num_minibatches=int(config.train.num_minibatches)):
                pack = packed(arrays)
                if pack is not None:
                    arrays = {**arrays, **pack}
                state, m, logp = train_step(state, to_device(arrays))
                m = jax.device_get(m)
                last_logp[rows] = to_host(logp)
                updates.append(m)
                if m["nonfinite"] == 0:
                    nonfinite_run = 0
                    continue
                nonfinite_run += 1
                print(f"WARNING: step {step}: non-finite loss/gradient (loss={float(m['loss'])}, "
                      f"grad_norm={float(m['grad_norm'])}); update skipped "
                      f"({nonfinite_run} in a row)", flush=True)
                if nonfinite_run >= max_nonfinite:
                    break
            t3 = time.perf_counter()
            metrics = {**_mean_metrics(updates), **_rollout_metrics(scored, config),
                       "lr": float(lr_schedule(int(state.step))),
                       "optimizer_steps": int(state.step), "rollout_slots": slots,
                       "time_rollout_s": t1 - t0,
                       "time_score_s": t2 - t1, "time_update_s": t3 - t2,
                       **score_metrics, **rollout_info}

            # ------------------------------------------------------------ evaluate --
            every = int(config.eval.every)
            if step == num_steps or (every > 0 and step % every == 0):
                last_eval = run_eval(step)
                metrics.update(last_eval)
            metrics["time_step_s"] = time.perf_counter() - t0
            writer.write(step, metrics)
            if (config.dump.every and step % int(config.dump.every) == 0
                    and jax.process_index() == 0):
                from espo_jax.train import dumps  # noqa: PLC0415
                ratios = np.exp(np.where(rollout.mask > 0, last_logp - old_logp, 0.0))
                dumps.write_runner_dump(workdir / "dumps" / f"step_{step:06d}", step=step,
                                        scored=scored, ratios=ratios, task=task,
                                        tokenizer=tok, config=config, vocab_size=vocab)

            # ---------------------------------------------------------- checkpoint --
            diverged = nonfinite_run >= max_nonfinite
            stop_now = stop.agree(step)  # collective: every host stops at the same step
            if (stop_now or diverged or step == num_steps
                    or step % max(1, int(config.checkpoint.every)) == 0):
                ckpt.save(step, state, {"nonfinite_in_a_row": nonfinite_run,
                                        "seed": int(config.seed)})
            _update_bar(bar, step, metrics, last_eval)
            if diverged:
                bar.close()
                writer.close()
                ckpt.close()
                raise NonFiniteError(
                    f"stopping at step {step}: {nonfinite_run} non-finite updates in a row "
                    f"(train.max_nonfinite_in_a_row={max_nonfinite}); the last finite "
                    f"parameters are checkpointed at step {step}. Lower train.lr or check the "
                    "rewards/advantages.")
            if stop_now:
                stop_reason = f"SIGTERM after step {step}"
                break

    # ------------------------------------------------------------------------ finish --
    bar.close()
    if step >= num_steps and ckpt.latest_step() != step:
        ckpt.save(step, state, {"nonfinite_in_a_row": nonfinite_run, "seed": int(config.seed)})
    ckpt.close()
    writer.close()
    wall = time.perf_counter() - t_start
    if stop_reason is not None:
        print(f"Stopped by SIGTERM: checkpoint saved at step {step} in {ckpt.directory}; "
              "rerun the same command to resume.", flush=True)
        return {"step": step, "stopped": stop_reason, "wall_time_s": wall}
    if jax.process_index() == 0:
        report.write_plots(workdir)
        report.write_summary(workdir, config, wall_time_s=wall)
    out = export_final_policy(state, config, tok, workdir)  # collective: every process
    recs = writers.read_metrics(workdir / "metrics.jsonl", events=False)
    accs = [(r["step"], r["eval_accuracy"]) for r in recs if "eval_accuracy" in r]
    print(f"Done: {step} steps in {wall:.1f} s; eval accuracy "
          + " -> ".join(f"{a:.3f} (step {s})" for s, a in (accs[:1] + accs[-1:]))
          + f"; final policy in {out}", flush=True)
    return {"step": step, "wall_time_s": wall, "eval_accuracy": accs, "final_policy": str(out)}


# ----------------------------------------------------------------------- metrics --
# Per-update metrics also recorded under minibatch{u}/ (u = update index within the step):
# on-policy and off-policy updates are then seen apart instead of averaged together.
def _per_update_key(k: str) -> bool:
    return "clip_frac" in k or k in ("ratio_dev_max", "moe/router_agreement")


def _mean_metrics(records: list[dict]) -> dict:
    """Means over the step's updates (min/max for *_min/*_max keys), plus each update's
    clip fractions / ratio deviation under minibatch{u}/ and first_minibatch/."""
    out = {}
    for u, r in enumerate(records):
        out.update({f"minibatch{u}/{k}": float(v) for k, v in r.items() if _per_update_key(k)})
    out["first_minibatch/ratio_dev_max"] = float(records[0]["ratio_dev_max"])
    out["first_minibatch/clip_frac"] = float(records[0]["clip_frac"])
    for k in records[0]:
        vals = np.asarray([float(r[k]) for r in records])
        if k.endswith("_min"):
            out[k] = float(vals.min())
        elif k.endswith("_max"):
            out[k] = float(vals.max())
        elif k == "nonfinite":
            out["nonfinite_updates"] = float(vals.sum())
        else:
            out[k] = float(vals.mean())
    return out


def _rollout_metrics(scored: ScoredBatch, config) -> dict:
    """Rewards, lengths, entropy and advantages of one scored rollout."""
    ro = scored.rollout
    mask, r = ro.mask, ro.rewards
    lengths = mask.sum(-1)
    g = int(config.rollout.group_size)
    return dict(
        reward_mean=float(r.mean()), reward_std=float(r.std()),
        correct_mean=float(ro.correct.mean()), gradable_frac=float(ro.gradable.mean()),
        groups_all_equal_frac=float((r.reshape(-1, g).std(1) == 0).mean()),
        response_len_mean=float(lengths.mean()), response_len_max=float(lengths.max()),
        entropy_mean=float((scored.entropy * mask).sum() / max(mask.sum(), 1.0)),
        advantage_abs_mean=float(np.abs(scored.advantages).mean()))


# ---------------------------------------------------------------------- progress --
def _progress(config, start: int, total: int):
    from tqdm.auto import tqdm  # noqa: PLC0415

    disable = not bool(config.log.progress) or jax.process_index() != 0
    return tqdm(total=total, initial=start, disable=disable, desc="ESPO" if
                config.objective.name == "espo" else config.objective.name.upper(),
                dynamic_ncols=True)


def _update_bar(bar, step: int, metrics: dict, last_eval: dict) -> None:
    post = {"reward": f"{metrics.get('reward_mean', float('nan')):.3f}",
            "clip": f"{metrics.get('clip_frac', float('nan')):.4f}"}
    if "eval_accuracy" in last_eval:
        post["acc"] = f"{last_eval['eval_accuracy']:.3f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)
    if bar.disable:
        print(f"step {step}/{bar.total} " + " ".join(f"{k}={v}" for k, v in post.items()),
              flush=True)

